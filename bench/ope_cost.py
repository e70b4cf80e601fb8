"""`roll ope` against `roll score` over the same stale rows: wall time of each as a separate process.

One run of the default task: version 0 samples `--prompts` × G = 8 completions (5,000 rows by default with
625 prompts), they are verified, and one update makes v1. Then, alternating, `--repeats` times each:

    roll score --version 0 --force           v0's rows under v0 (π_ref is v0 too: one forward pass)
    roll ope --version 1 --data-versions 0..0 --force     v0's rows under v1, plus the estimates

Both run one teacher-forced forward pass over the same rows with the same batch size; ope adds reading the
verdicts, the log-weights and the summary. Reported: the medians and their ratio (the target is ≤ 1.2).

    python bench/ope_cost.py [--prompts 625] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def roll(*args: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "roll", *args], capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        raise SystemExit(f"roll {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=625)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = str(Path(tmp) / "run")
        roll("init", "--run", run)
        roll("generate", "--run", run, "--prompts", str(args.prompts))
        roll("train", "--run", run, "--objective", "stable-pess")  # verifies and scores v0 on the way
        times = {"score": [], "ope": []}
        for _ in range(args.repeats):
            times["score"].append(roll("score", "--run", run, "--version", "0", "--force"))
            times["ope"].append(roll("ope", "--run", run, "--version", "1", "--data-versions", "0..0", "--force"))
        from roll.store import Run, query

        rows = query(Run(run), "select count(*) from ope").fetchall()[0][0]
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"rows": rows, "seconds": times, "median_s": medians,
                      "ope_over_score": medians["ope"] / medians["score"]}, indent=1))


if __name__ == "__main__":
    main()
