"""Generation throughput: `roll generate` against a plain per-prompt `model.generate` loop.

Both sample the same prompts (one version's 64 train prompts × G = 8, at most 48 new tokens, T = 1) from the
same model, each measurement in a fresh subprocess so peak RSS is its own. roll's time is the whole stage
(`stages.generate.run`: model load, prompts read, sampling, Parquet commit); the baseline's is only the
generate loop, with the model already loaded. The pairs alternate, so drift hits both alike.

    python bench/generate_throughput.py [--repeats 3] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS, GROUP, MAX_NEW = 64, 8, 48


def worker_roll(run_dir: str) -> dict:
    from roll.policy import load_policy
    from roll.stages.generate import GenerateConfig, run
    from roll.store import Run

    # the baseline loads its model before its clock starts; here a throw-away load pays the one-off imports
    # of transformers' model code, and the stage's own load, prompt read and Parquet commit stay timed
    load_policy(Run(run_dir).policy_dir(0))
    started = time.perf_counter()
    summary = run(GenerateConfig(run=Path(run_dir), prompts=PROMPTS, group_size=GROUP, max_new_tokens=MAX_NEW, force=True))
    return {"seconds": time.perf_counter() - started, "sequences": summary["rows"], "tokens": summary["tokens"],
            "sampling_seconds": summary["seconds"]}


def worker_loop(run_dir: str) -> dict:
    import torch

    from roll.policy import load_policy
    from roll.stages.generate import version_prompt_ids
    from roll.store import Run

    run = Run(run_dir)
    model, tokenizer = load_policy(run.policy_dir(0))
    prompts = run.read_prompts().to_pylist()
    text = {p["prompt_id"]: p["prompt"] for p in prompts}
    ids = version_prompt_ids([p["prompt_id"] for p in prompts if p["split"] == "train"], 0, PROMPTS, 0)
    torch.manual_seed(0)
    started, tokens = time.perf_counter(), 0
    with torch.no_grad():
        for pid in ids:
            enc = tokenizer(text[pid], return_tensors="pt")
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=GROUP, max_new_tokens=MAX_NEW,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():  # count up to and including EOS, as roll's num_tokens does
                tokens += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
    return {"seconds": time.perf_counter() - started, "sequences": PROMPTS * GROUP, "tokens": tokens}


def measure(kind: str, run_dir: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, "--run", run_dir],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="checkpoint directory [default: the embedded model]")
    parser.add_argument("--worker", choices=["roll", "loop"], help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (worker_roll if args.worker == "roll" else worker_loop)(args.run)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    import torch

    from roll.runs import InitConfig, init_run

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = str(Path(tmp) / "run")
        init_run(InitConfig(run=Path(run_dir), model=args.model))
        results = {"roll": [], "loop": []}
        for repeat in range(args.repeats):
            for kind in ("roll", "loop"):
                results[kind].append(measure(kind, run_dir))
                r = results[kind][-1]
                print(f"repeat {repeat}: {kind:4s} {r['seconds']:.2f} s  {r['tokens'] / r['seconds']:.0f} tok/s  "
                      f"{r['peak_rss_mb']:.0f} MB", file=sys.stderr)

    def med(kind, key):
        return statistics.median(r[key] for r in results[kind])

    def rate(kind, what):
        return statistics.median(r[what] / r["seconds"] for r in results[kind])

    ratios = [a["seconds"] / b["seconds"] for a, b in zip(results["loop"], results["roll"])]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
          f"{PROMPTS} prompts × G={GROUP}, ≤{MAX_NEW} new tokens, T=1; {args.repeats} alternating repeats\n")
    print("| engine | median s | min–max s | tokens/s | sequences/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, label in (("roll", "roll generate (whole stage)"), ("loop", "per-prompt model.generate loop")):
        secs = [r["seconds"] for r in results[kind]]
        print(f"| {label} | {med(kind, 'seconds'):.2f} | {min(secs):.2f}–{max(secs):.2f} | {rate(kind, 'tokens'):.0f} | "
              f"{rate(kind, 'sequences'):.1f} | {med(kind, 'peak_rss_mb'):.0f} |")
    sampling = [a["seconds"] / b["sampling_seconds"] for a, b in zip(results["loop"], results["roll"])]
    print(f"\nspeed-up (loop time / roll whole-stage time) per pair: {', '.join(f'{x:.1f}×' for x in ratios)}; "
          f"median {statistics.median(ratios):.1f}×")
    print(f"speed-up (loop time / roll sampling time, without load and commit) per pair: "
          f"{', '.join(f'{x:.1f}×' for x in sampling)}; median {statistics.median(sampling):.1f}×")


if __name__ == "__main__":
    main()
