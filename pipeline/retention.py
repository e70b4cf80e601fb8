"""gc: delete policy checkpoints that nothing still needs (`roll gc`, `roll iterate --keep-policies N`).

With its optimiser state a checkpoint is about three times the weights, and a long run would keep one per
version. A checkpoint is still needed, and kept, when it is

* v0 — π_ref, and the parent of every run;
* one of the latest N versions — the next update starts from the latest, and generation samples from it;
* evaluated — its held-out numbers stay reproducible;
* holding rollouts that are not yet verified and scored (whatever the lag): scoring needs the behaviour
  checkpoint, and those rollouts could never be trained on without it;
* inside a future update's lag window (behaviour versions ≥ latest − L − W + 1, DESIGN §3.1) while its
  rollouts are not generated yet.

Rollouts, verdicts, scores, steps, groups and evals are never deleted, nor a version's policy.json: it stays
as the record that the version was committed (parent, objective, data versions, optimiser steps).

gc runs under the run's `gc` lock (one gc at a time) and deletes each checkpoint under its own lock, deciding
again there whether it is needed: a stage reading it (generate, train) holds that lock shared, so gc waits for
it, and a stage that waited for gc finds the version deleted and says so. Deletion is rename, then remove
(`Run.remove_policy`); gc first sweeps what a killed gc or writer left (`Run.sweep`).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import VERSION_MAX, check_ranges, option
from roll.store import Run


@dataclass(frozen=True)
class GcConfig:
    run: Path  # run directory
    keep: int = option(3, "Keep the latest N policy versions.", min=1, max=VERSION_MAX)
    lag: int = option(0, "L of the updates still to come: unscored versions in their window are kept.", min=0,
                      max=VERSION_MAX)
    window: int = option(1, "W of the updates still to come.", min=1, max=VERSION_MAX)
    versions: tuple[int, ...] = option((), "Delete exactly this version (repeatable); refused if it is still needed. "
                                           "[default: every unneeded one]", flag="--version", repeatable=True,
                                       show_default=False, min=0, max=VERSION_MAX)
    dry_run: bool = option(False, "Say what would be deleted; delete nothing.")

def needed(run: Run, keep: int, lag: int, window: int, only: int | None = None) -> dict[int, str]:
    """Policy versions on disk that must stay (of them, only `only` when given), each with the first reason why."""
    versions = run.checkpoint_versions()
    if not versions:
        return {}
    from roll.store import Shard

    latest = versions[-1]
    evaluated = set(run.versions("evals"))
    generated = set(run.versions("rollouts"))
    reasons: dict[int, str] = {}
    for version in versions if only is None else [v for v in versions if v == only]:
        unscored = version in generated and bool(run.pending_shards("scores", [version], Shard(0, 1), False))
        if version == 0:
            reasons[version] = "v0 is π_ref and the run's start"
        elif version in versions[-keep:]:
            reasons[version] = f"one of the latest {keep}"
        elif version in evaluated:
            reasons[version] = "it is evaluated"
        elif unscored:
            reasons[version] = "its rollouts are not scored yet, and scoring needs this checkpoint"
        elif version not in generated and version >= latest - lag - window + 1:
            reasons[version] = "a future update's lag window reads it and its rollouts are not generated yet"
    return reasons


def run(config: GcConfig) -> dict:
    """Delete the unneeded checkpoints (or exactly `versions`); returns what was deleted and what was kept."""
    check_ranges(config)  # --keep at least 1: the latest version is the next update's start
    run_dir = Run(config.run)
    if not run_dir.exists():
        raise RollError(f"{run_dir.root}: no run here")
    with run_dir.lock("gc", "roll gc of this run"):
        swept = [] if config.dry_run else [str(p.relative_to(run_dir.root)) for p in run_dir.sweep()]
        kept = needed(run_dir, config.keep, config.lag, config.window)
        present = run_dir.checkpoint_versions()
        if config.versions:
            missing = [v for v in config.versions if v not in present]
            if missing:
                raise RollError(f"{run_dir.root}: policy version {missing[0]} does not exist; nothing deleted")
            blocked = [v for v in config.versions if v in kept]
            if blocked:
                raise RollError(f"{run_dir.root}: policy v{blocked[0]:04d} is still needed ({kept[blocked[0]]}); "
                                f"nothing deleted")
            doomed = sorted(config.versions)
        else:
            doomed = [v for v in present if v not in kept]
        deleted = doomed if config.dry_run else [v for v in doomed if collect(run_dir, v, config)]
    return {"run": str(run_dir.root), "deleted": deleted, "kept": sorted(kept), "dry_run": config.dry_run,
            **({"swept": swept} if swept else {})}


def collect(run_dir: Run, version: int, config: GcConfig) -> bool:
    """Delete one checkpoint under its lock, once no stage reads it, if it is still there and still unneeded
    (a generate that held it may have committed rollouts that must be scored first). Whether it deleted it."""
    with run_dir.policy_lock(version):
        if version not in run_dir.checkpoint_versions():
            return False
        why = needed(run_dir, config.keep, config.lag, config.window, only=version).get(version)
        if why:
            print(f"roll: gc keeps v{version:04d}: {why} (changed while gc waited for it)", file=sys.stderr)
            return False
        run_dir.remove_policy(version)
        return True
