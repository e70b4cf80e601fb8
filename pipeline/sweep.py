"""sweep: objective × lag × seed as separate runs (each its own directory), then one report over them all.

Each cell is `roll init` + `roll iterate` in-process, in a directory named <objective>-lag<L>-seed<S>, so a
rerun after a crash resumes cell by cell (finished cells are skipped by the stages themselves).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from roll.options import SEED_MAX, VERSION_MAX, option
from roll.pipeline.iterate import IterateConfig
from roll.stages.generate import GenerateConfig
from roll.stages.train import TrainConfig


@dataclass(frozen=True)
class SweepConfig:
    out: Path = option(Path("runs/sweep"), "Parent directory of the runs (and of report/).")
    objectives: tuple[str, ...] = option(("ppo", "pg", "oapl", "pmd-mean", "stable-pess"), "Comma-separated objectives.")
    lags: tuple[int, ...] = option((0, 2, 4, 8), "Comma-separated lags L.", min=0, max=VERSION_MAX)
    seeds: tuple[int, ...] = option((0, 1, 2), "Comma-separated seeds.", min=0, max=SEED_MAX)
    iterate: IterateConfig | None = None  # the loop's settings; run, seed, objective and lag are set per cell
    model: str | None = option(None, "Checkpoint for v0. [default: the embedded model]", show_default=False)
    task: str = "arith"

def cell_name(objective: str, lag: int, seed: int) -> str:
    return f"{objective}-lag{lag}-seed{seed}"


def run(config: SweepConfig) -> dict:
    from roll.pipeline import iterate, report
    from roll.runs import InitConfig, init_run
    from roll.store import Run

    started, cells = time.perf_counter(), []
    base = config.iterate or IterateConfig(run=config.out)
    for objective in config.objectives:
        for lag in config.lags:
            for seed in config.seeds:
                root = Path(config.out) / cell_name(objective, lag, seed)
                if not Run(root).exists():
                    init_run(InitConfig(run=root, task=config.task, model=config.model))
                gen = replace(base.generate or GenerateConfig(run=root), run=root, seed=seed)
                trn = replace(base.train or TrainConfig(run=root), run=root, seed=seed, objective=objective, lag=lag)
                result = iterate.run(replace(base, run=root, generate=gen, train=trn))
                cells.append({"run": root.name, "evaluations": result["evaluations"], "seconds": result["seconds"]})
    summary = report.run(report.ReportConfig(runs=tuple(Path(config.out) / c["run"] for c in cells),
                                             out=Path(config.out) / "report"))
    return {"cells": cells, "report": summary["out"], "seconds": round(time.perf_counter() - started, 1)}
