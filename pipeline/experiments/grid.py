"""The staleness experiments of EXPERIMENTS.md: variants × staleness kinds × seeds, one run directory a cell.

    python -m roll.pipeline.experiments.grid runs/grid --parallel 2 --threads 1        # every cell, resumable
    python -m roll.pipeline.experiments.grid runs/grid --only stable-pess-lag8-seed0   # one cell
    python -m roll.pipeline.experiments.grid runs/frontier --grid frontier             # the staleness frontier (below)

Each cell is `roll init` + `roll iterate` as subprocesses, with the same number of optimiser steps (24) and
of generated completions (24 × 64 prompts × 8) whatever its staleness:

    lagL        24 versions of one step, update v → v+1 on the rollouts of version v − L (clamped at 0)
    sync8       3 versions of 8 steps: version v samples 8 × 64 prompts once, its update takes 8 steps on
                disjoint slices of 64 prompts with π_b fixed (OAPL's sampler frozen, then synchronised)
    lag8-fresh  lag 8 with --fresh-optimizer (a new AdamW every update: roll's behaviour before DESIGN §3.1a)

Held-out pass@1 on the whole test split (500 prompts × 4 samples) at the start, the middle (12 steps; the
sync cells evaluate every version, 8 steps apart) and the end. Cells run seed-major, so an interrupted grid
still compares every objective on the seeds it reached; a cell whose iterate.json exists is done, and a
killed cell resumes where it stopped (every stage skips what is committed). Checkpoints that nothing needs
are deleted as the cell goes (`--keep-policies 1`).

The frontier grid (issue 20) asks the same question 96 optimiser steps out, with the peers' stale-data
objectives: variants {ppo, decoupled-ppo, m2po, pmd-mean, stable-pess, stable-pess-parent (--anchor parent),
oapl, oapl-shift (--shift 5)} × staleness {lag0, lag32, sync32 (--sample-every 32), offline96 (--sample-every
96)} × seeds, 96 steps of 32 prompts × 8 a cell (96 × 256 completions whatever the staleness), evaluated on the
whole test split (500 × 4) every 32 versions. At lag 0 (one step per update from π_b) decoupled-ppo and m2po are
ppo and the parent anchor is the behaviour anchor, exactly (tests/test_objectives.py, tests/test_train.py), so
they run only where they can differ. `--micro-batch 256` puts a step's 256 completions in one micro-batch, so
m2po's second-moment mask is taken over the whole step as in M2PO.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OBJECTIVES = ("ppo", "oapl", "pmd-mean", "stable-pess")
STEPS = 24
STALENESS = {  # name → roll iterate options
    "lag0": ["--iterations", str(STEPS), "--lag", "0", "--eval-every", str(STEPS // 2)],
    "lag8": ["--iterations", str(STEPS), "--lag", "8", "--eval-every", str(STEPS // 2)],
    "sync8": ["--iterations", str(STEPS // 8), "--sync-interval", "8", "--eval-every", "1"],
    "lag8-fresh": ["--iterations", str(STEPS), "--lag", "8", "--eval-every", str(STEPS // 2), "--fresh-optimizer"],
    "lag4": ["--iterations", str(STEPS), "--lag", "4", "--eval-every", str(STEPS // 2)],
}


FRONTIER_STEPS = 96
FRONTIER_STALENESS = {
    "lag0": ["--lag", "0"],
    "lag32": ["--lag", "32"],
    "sync32": ["--sample-every", "32"],
    "offline96": ["--sample-every", "96"],
}
FRONTIER_COMMON = ["--iterations", str(FRONTIER_STEPS), "--eval-every", str(FRONTIER_STEPS // 3), "--prompts", "32",
                   "--micro-batch", "256"]
# oapl's baseline V_β₁ = β₁·log mean e^{r/β₁} lies above the group mean r̄ by at most 0.48 for 0/1 rewards at
# β₁ = 0.2 (at a success rate near 0.2); s·β = 5 × 0.1 = 0.5 puts it below r̄ in every group (Asymmetric REINFORCE)
VARIANTS = {
    "ppo": ["--objective", "ppo"],
    "decoupled-ppo": ["--objective", "decoupled-ppo"],
    "m2po": ["--objective", "m2po"],
    "pmd-mean": ["--objective", "pmd-mean"],
    "stable-pess": ["--objective", "stable-pess"],
    "stable-pess-parent": ["--objective", "stable-pess", "--anchor", "parent"],
    "oapl": ["--objective", "oapl"],
    "oapl-shift": ["--objective", "oapl", "--shift", "5"],
}
EQUAL_AT_LAG0 = ("decoupled-ppo", "m2po", "stable-pess-parent")  # = ppo, ppo, stable-pess at lag 0 (tested)


def frontier_cells(seeds=(0, 1, 2)) -> list[tuple[str, str, int]]:
    """(variant, staleness, seed), staleness-major: every seed of lag 32 first (the predictions are about it, and a
    session's hours rarely cover the whole grid), then offline, synchronous and fresh data."""
    out = []
    for staleness in ("lag32", "offline96", "sync32", "lag0"):
        for seed in seeds:
            out += [(v, staleness, seed) for v in VARIANTS if not (staleness == "lag0" and v in EQUAL_AT_LAG0)]
    return out


def frontier_options(variant: str, staleness: str) -> list[str]:
    return [*VARIANTS[variant], *FRONTIER_COMMON, *FRONTIER_STALENESS[staleness]]


# The chain grid (issue 24; EXPERIMENTS.md, "Long chains"): ~185-token completions, sized from a measured
# 15.2 s an update at 16 prompts × 8 on one thread; lag 32 against lag 0, the frontier's two furthest-apart
# variants at lag32 beside ppo and stable-pess (the lag-0 equals are not rerun: tested equal)
CHAIN_VARIANTS = ("ppo", "stable-pess", "stable-pess-parent", "decoupled-ppo")
CHAIN_STEPS = 64
CHAIN_COMMON = ["--iterations", str(CHAIN_STEPS), "--eval-every", str(CHAIN_STEPS // 2), "--prompts", "16",
                "--micro-batch", "128"]


def chain_cells(seeds=(0, 1, 2)) -> list[tuple[str, str, int]]:
    """(variant, staleness, seed), staleness-major as the frontier: every seed of lag32, then lag0."""
    out = []
    for staleness in ("lag32", "lag0"):
        for seed in seeds:
            out += [(v, staleness, seed) for v in CHAIN_VARIANTS if not (staleness == "lag0" and v in EQUAL_AT_LAG0)]
    return out


def chain_options(variant: str, staleness: str) -> list[str]:
    return [*VARIANTS[variant], *CHAIN_COMMON, *FRONTIER_STALENESS[staleness]]


def cells(seeds=(0, 1, 2)) -> list[tuple[str, str, int]]:
    """(objective, staleness, seed), seed-major; lag 4 last (the issue's 'if time allows')."""
    out = []
    for seed in seeds:
        out += [(o, s, seed) for s in ("lag0", "lag8", "sync8") for o in OBJECTIVES]
        out += [("pg", "lag8", seed), ("stable-pess", "lag8-fresh", seed), ("ppo", "lag8-fresh", seed)]
    out += [(o, "lag4", seed) for seed in seeds for o in OBJECTIVES]
    return out


def cell_name(objective: str, staleness: str, seed: int) -> str:
    return f"{objective}-{staleness}-seed{seed}"


def staleness_options(objective: str, staleness: str) -> list[str]:
    return ["--objective", objective, *STALENESS[staleness]]


# grid → (its cells, a cell's `roll iterate` options, its `roll init` options)
GRIDS = {"staleness": (cells, staleness_options, []), "frontier": (frontier_cells, frontier_options, []),
         "chain": (chain_cells, chain_options, ["--task", "chain"])}


def run_cell(out: Path, objective: str, staleness: str, seed: int, threads: int, options=staleness_options,
             init_options=()) -> dict:
    run = out / cell_name(objective, staleness, seed)
    done = run / "iterate.json"
    if done.is_file():
        return {"cell": run.name, "skipped": True}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    roll = [sys.executable, "-m", "roll"]
    started = time.time()
    log = (out / "logs").joinpath(f"{run.name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as err:
        if not (run / "run.toml").is_file():
            subprocess.run([*roll, "init", "--run", str(run), *init_options], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=err)
        proc = subprocess.run([*roll, "iterate", "--run", str(run), "--seed", str(seed), "--keep-policies", "1",
                               *options(objective, staleness)],
                              env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    if proc.returncode != 0:
        return {"cell": run.name, "failed": proc.returncode}
    summary = json.loads(proc.stdout)
    summary["wall_seconds"] = round(time.time() - started, 1)
    summary["threads"] = threads
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return {"cell": run.name, "seconds": summary["wall_seconds"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--parallel", type=int, default=2, help="cells at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", action="append", default=None, help="run only this cell (repeatable)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="staleness")
    args = parser.parse_args(argv)
    make_cells, options, init_options = GRIDS[args.grid]
    todo = make_cells(tuple(int(s) for s in args.seeds.split(",")))
    if args.only:
        todo = [c for c in todo if cell_name(*c) in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda c: run_cell(args.out, *c, args.threads, options, init_options), todo):
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
