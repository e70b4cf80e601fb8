"""One `roll iterate` update on the chain task against one on arith: seconds per stage and tokens, so that a
chain grid is sized from a measurement (issue 24, item 3).

Each task: a fresh run from its bundled model (`roll init --task T`), then `roll iterate --iterations 2` with the
default sampling and training settings (64 prompts × G = 8, stable-pess, lag 0; the task's completion length:
48 arith, 256 chain) and no evaluation; the second iteration is the one reported (the first pays one-off
costs: imports, first loads). Tokens are the version's sampled completion tokens (rollouts).

    python bench/chain_vs_arith.py [--repeats 1] [--out bench/results/chain_vs_arith.csv]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("generate", "verify", "score", "prepare", "train")


def one(task: str, root: Path) -> dict:
    run = root / task
    roll = [sys.executable, "-m", "roll"]
    subprocess.run([*roll, "init", "--run", str(run), "--task", task], check=True, capture_output=True)
    out = subprocess.run([*roll, "iterate", "--run", str(run), "--iterations", "2", "--eval-every", "0"],
                         check=True, capture_output=True, text=True).stdout
    second = json.loads(out)["stage_seconds"][1]
    from roll.store import Run, query

    tokens, rows, stopped = query(Run(run), "select sum(len(token_ids)), count(*), count(*) filter "
                                            "(where finish_reason = 'stop') from rollouts where policy_version = 1"
                                  ).fetchone()
    return {"task": task, **{s: second.get(s, 0.0) for s in STAGES},
            "iteration_s": round(sum(second.get(s, 0.0) for s in STAGES), 2),
            "rows": rows, "tokens": tokens, "tokens_per_row": round(tokens / rows, 1), "stopped": stopped}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/chain_vs_arith.csv"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for task in ("arith", "chain"):  # alternating
                results.append({"repeat": repeat, **one(task, Path(tmp) / str(repeat))})
                print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    for task in ("arith", "chain"):
        mine = [r for r in results if r["task"] == task]
        print(task, {k: statistics.median(r[k] for r in mine) for k in (*STAGES, "iteration_s", "tokens_per_row")})


if __name__ == "__main__":
    main()
