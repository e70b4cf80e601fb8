"""Stages as separate processes against `roll iterate` in one process, and the peak memory of each stage.

One iteration = generate → verify → score → train → evaluate. Separate: five `roll` commands per iteration,
each a fresh process (as a shell script or a Slurm job array runs them), so process start-up and imports
are paid five times. In-process: `roll iterate` (one process, models kept loaded between stages). Same
settings on both sides: 64 prompts × G = 8, at most 48 new tokens, stable-pess (so π_ref's forward pass is
skipped: `roll score --no-ref`, as iterate does), evaluation of the new version on `--eval-limit` held-out
prompts × k = 4. Alternating repeats; each repeat runs `--iterations` iterations on a fresh run and the
first iteration of each is dropped (one-off costs). Peak RSS per stage is the process's own maximum
resident set (wait4's ru_maxrss), for the separate processes.

With `--warm`, a third arm runs the same five commands with $ROLL_WARM set: each command's process hands
its work to a fresh fork of one `roll warm` process started before the repeats (its start-up, paid once per
shell or job, is reported beside the table, not added to the iterations).

    python bench/stage_processes.py [--repeats 3] [--iterations 4] [--eval-limit 32] [--prompts 64] [--warm]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

STAGES = ("generate", "verify", "score", "train", "evaluate")


def run_process(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    _, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err.decode()[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports kB


def separate(work: Path, iterations: int, eval_limit: int, prompts: int, env: dict) -> list[dict]:
    run = str(work / ("separate-warm" if "ROLL_WARM" in env else "separate"))
    roll = [sys.executable, "-m", "roll"]
    run_process([*roll, "init", "--run", run], env)
    per_iteration = []
    for version in range(iterations):
        commands = {
            "generate": ["generate", "--version", str(version), "--prompts", str(prompts)],
            "verify": ["verify", "--version", str(version)],
            "score": ["score", "--version", str(version), "--no-ref"],
            "train": ["train", "--version", str(version), "--objective", "stable-pess"],
            "evaluate": ["evaluate", "--version", str(version + 1), "--limit", str(eval_limit), "--k", "4"],
        }
        record = {}
        for stage, args in commands.items():
            record[stage], record[f"{stage}_rss_mb"] = run_process([*roll, *args, "--run", run], env)
        per_iteration.append(record)
    return per_iteration


def in_process(work: Path, iterations: int, eval_limit: int, prompts: int, env: dict) -> list[dict]:
    """`roll iterate` in one child process; its summary carries each iteration's stage times."""
    import json

    run = str(work / "inprocess")
    roll = [sys.executable, "-m", "roll"]
    run_process([*roll, "init", "--run", run], env)
    proc = subprocess.run([*roll, "iterate", "--run", run, "--iterations", str(iterations), "--objective",
                           "stable-pess", "--prompts", str(prompts), "--eval-every", "1", "--eval-limit", str(eval_limit), "--eval-k", "4"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"roll iterate failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])["stage_seconds"]


def start_warm(socket_path: str, env: dict) -> tuple[subprocess.Popen, float]:
    """Start `roll warm` on `socket_path`; (process, seconds until it accepts commands)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "roll", "warm", "--socket", socket_path], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # "roll: warm on PATH" once it listens
    if "warm on" not in line:
        raise SystemExit(f"roll warm did not start: {line}{proc.stderr.read()[-3000:]}")
    seconds = time.perf_counter() - started
    # the per-command log lines must be drained or the pipe fills and the warm process blocks
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--eval-limit", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64, help="prompts per iteration (× G = 8 completions)")
    parser.add_argument("--warm", action="store_true", help="also run the five commands through `roll warm`")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "ROLL_WARM"}
    env |= {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}

    arms = {"separate": lambda work: separate(work, args.iterations, args.eval_limit, args.prompts, env),
            "in_process": lambda work: in_process(work, args.iterations, args.eval_limit, args.prompts, env)}
    with tempfile.TemporaryDirectory() as warm_dir:
        if args.warm:
            warm_env = {**env, "ROLL_WARM": str(Path(warm_dir) / "roll.sock")}
            warm_proc, warm_startup = start_warm(warm_env["ROLL_WARM"], env)
            arms["warm"] = lambda work: separate(work, args.iterations, args.eval_limit, args.prompts, warm_env)
        totals = {name: [] for name in arms}
        records, ratios = [], {name: [] for name in arms if name != "in_process"}
        for repeat in range(args.repeats):
            with tempfile.TemporaryDirectory() as work:
                order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
                results = {name: arms[name](Path(work)) for name in order}
            per_iteration = {name: [sum(r[s] for s in STAGES) for r in results[name][1:]] for name in arms}
            for name in arms:
                totals[name] += per_iteration[name]
            records += results["separate"][1:]
            for name in ratios:
                ratios[name].append(statistics.median(per_iteration[name]) / statistics.median(per_iteration["in_process"]))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{name} {statistics.median(v):.2f} s/iteration"
                                                       for name, v in per_iteration.items())
                  + "; ratios " + ", ".join(f"{name} {r[-1]:.2f}" for name, r in ratios.items()), file=sys.stderr, flush=True)
        if args.warm:
            warm_proc.terminate()
            warm_proc.wait()

    print(f"\n{args.prompts} prompts × 8 per iteration; {args.repeats} alternating repeats × {args.iterations - 1} "
          f"measured iterations, eval on "
          f"{args.eval_limit} prompts × 4, {args.threads} threads\n")
    labels = {"separate": "five `roll` processes", "warm": "five `roll` processes, `ROLL_WARM` set",
              "in_process": "`roll iterate`, one process"}
    print("| | median s/iteration | min–max s |")
    print("|---|---:|---:|")
    for name, values in totals.items():
        print(f"| {labels[name]} | {statistics.median(values):.2f} | {min(values):.2f}–{max(values):.2f} |")
    print()
    for name, values in ratios.items():
        print(f"{labels[name]} / `roll iterate`, per repeat: {', '.join(f'{r:.2f}' for r in values)}; "
              f"median **{statistics.median(values):.2f}×**")
    if args.warm:
        print(f"\n`roll warm` start-up (imports + warm-up, once): {warm_startup:.2f} s")
    print()
    print("| stage (separate process) | median wall s | peak RSS MB |")
    print("|---|---:|---:|")
    for stage in STAGES:
        print(f"| {stage} | {statistics.median(r[stage] for r in records):.2f} | "
              f"{max(r[f'{stage}_rss_mb'] for r in records):.0f} |")


if __name__ == "__main__":
    main()
