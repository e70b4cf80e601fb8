"""Metrics sinks: the run's committed tables, mirrored as curves into TensorBoard, Weights & Biases or trackio.

The tables stay the source of truth. A sink is only ever fed from them — a version's `steps` rows once the
update that made it is committed, a version's `evals` once its evaluation is — by `version_scalars`, the
one function that turns tables into curves. `roll iterate --log-to` and `roll train --log-to` call it as they
commit; `roll report --to` (`replay`) calls it over every committed version of a run made with or without a
sink, so a run can be looked at after the fact and both paths draw the same numbers.

    train/<column>            every numeric column of `steps` (loss, entropy, kl_behaviour, lag_mean,
                              stale_steps_mean, …) at x = global_step + 1, the optimiser steps taken so far
    eval/<dataset>/pass@1     mean over held-out prompts of the share of correct samples, and
    eval/<dataset>/pass@k     unbiased pass@k (k from the evaluation's settings), at x = the optimiser steps
                              behind the evaluated version (0 for v0)

Each sink writes under the run (`Run.sink_dir`): TensorBoard event files in logs/tensorboard/, wandb's
directory in logs/wandb/ (offline unless WANDB_MODE says otherwise), trackio's database in logs/trackio/
(unless TRACKIO_DIR is set). Each backend is an optional extra; a missing one is refused in one line before
any work (`check_sinks`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

from roll.errors import RollError
from roll.store import Run, rows

SINKS = ("tensorboard", "wandb", "trackio")  # each the name of its package and of its extra

# columns of `steps` that are the x axis or keys, not curves
NOT_CURVES = {"policy_version", "step", "global_step"}

QUERIES = {
    "steps": "SELECT * FROM steps WHERE policy_version = $version ORDER BY global_step",
    # one row per (dataset, settings, prompt): n samples, c correct (pass@1 and pass@k are computed from these)
    "evals": """SELECT dataset, settings, prompt_id, count(*) AS n, sum(correct::INTEGER) AS c
                FROM evals WHERE policy_version = $version GROUP BY ALL ORDER BY dataset, settings, prompt_id""",
    # the optimiser steps behind version v (as `roll report`'s pass@1 axis)
    "steps_behind": "SELECT count(*) AS steps FROM steps WHERE policy_version <= $version",
}


@dataclasses.dataclass(frozen=True)
class Scalar:
    tag: str
    step: int
    value: float


def check_sinks(names, flag: str = "--log-to") -> None:
    """Refuse an unknown sink, or one whose package is not installed, in one line naming the extra to install.
    The package is found, not imported: wandb takes seconds to import and trackio reads TRACKIO_DIR at import."""
    for name in names:
        if name not in SINKS:
            raise RollError(f"{flag} {name}: choose from {', '.join(SINKS)}")
        if importlib.util.find_spec(name) is None:
            raise RollError(f"{flag} {name} needs the {name} package: pip install 'roll[{name}]'")


def version_scalars(run: Run, version: int, steps: bool = True, evals: bool = True) -> list[Scalar]:
    """The curves' points that version `version` adds: its update's `steps` rows, then its evaluations."""
    from roll.metrics import pass_at_k

    out = []
    for row in rows(run, QUERIES["steps"], version=version) if steps else ():
        for column, value in row.items():
            # a column an older file lacks reads as NULL (ADDED_COLUMNS): no point rather than a made-up one
            if column not in NOT_CURVES and isinstance(value, (int, float)):
                out.append(Scalar(f"train/{column}", row["global_step"] + 1, float(value)))
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows(run, QUERIES["evals"], version=version) if evals else ():
        groups.setdefault((row["dataset"], row["settings"]), []).append(row)
    if groups:
        x = rows(run, QUERIES["steps_behind"], version=version)[0]["steps"]
    for (dataset, settings), prompts in groups.items():
        k = min([json.loads(settings).get("k", 1)] + [p["n"] for p in prompts])
        out.append(Scalar(f"eval/{dataset}/pass@1", x, sum(p["c"] / p["n"] for p in prompts) / len(prompts)))
        if k > 1:
            out.append(Scalar(f"eval/{dataset}/pass@{k}", x,
                              sum(pass_at_k(p["n"], p["c"], k) for p in prompts) / len(prompts)))
    return out


def run_settings(run: Run, config=None) -> dict:
    """What a sink shows as the run's configuration: run.toml, and the command's resolved config when given."""
    from roll.runs import read_run_config

    settings = {"run": read_run_config(run)}
    if config is not None:
        settings["command"] = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return settings


class TensorBoard:
    def __init__(self, directory: Path, name: str, settings: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))
        self.writer.add_text("config", "```\n" + json.dumps(settings, indent=2) + "\n```")

    def log(self, scalars: list[Scalar]) -> None:
        for s in scalars:
            self.writer.add_scalar(s.tag, s.value, global_step=s.step)
        self.writer.flush()  # a reader (tensorboard, a test) sees each version as soon as it is committed

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, directory: Path, name: str, settings: dict):
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        # offline unless the user chose a mode (WANDB_MODE=online after `wandb login`): nothing leaves the
        # machine by default; `wandb sync RUN/logs/wandb/wandb/offline-run-*` uploads it later
        mode = None if os.environ.get("WANDB_MODE") else "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "roll"), name=name, group=name,
                              dir=str(directory), config=settings, mode=mode)

    def log(self, scalars: list[Scalar]) -> None:
        # one wandb.log per x: wandb's own step must not go backwards, and the points arrive ordered by x
        by_step: dict[int, dict] = {}
        for s in scalars:
            by_step.setdefault(s.step, {})[s.tag] = s.value
        for step, values in sorted(by_step.items()):
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, directory: Path, name: str, settings: dict):
        # trackio keeps its database in TRACKIO_DIR, read once at import: under the run unless the user set it
        os.environ.setdefault("TRACKIO_DIR", str(directory))
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "roll"), name=name, config=settings)

    def log(self, scalars: list[Scalar]) -> None:
        by_step: dict[int, dict] = {}
        for s in scalars:
            # trackio stores metrics as JSON, which has no NaN or infinity
            by_step.setdefault(s.step, {})[s.tag] = s.value if math.isfinite(s.value) else None
        for step, values in sorted(by_step.items()):
            self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


BACKENDS = {"tensorboard": TensorBoard, "wandb": Wandb, "trackio": Trackio}


class Sinks:
    """The sinks `names` of one run, open for one command: `log_version` after each commit, `close` at the end.
    With no names every method does nothing, so callers need no branch."""

    def __init__(self, run: Run, names, config=None, fresh: bool = False, flag: str = "--log-to"):
        check_sinks(names, flag)
        self.run, self.open = run, []
        settings = run_settings(run, config) if names else {}
        for name in dict.fromkeys(names):  # --log-to tensorboard twice is one sink
            directory = run.sink_dir(name)
            if fresh:  # a replay rebuilds the curves from the tables: the old copy goes, or every point is twice
                run.remove_tree(directory)
            self.open.append(BACKENDS[name](directory, run.root.name, settings))

    def log_version(self, version: int, steps: bool = True, evals: bool = True) -> int:
        """Log version `version`'s committed steps and/or evaluations; returns the points logged."""
        if not self.open:
            return 0
        scalars = version_scalars(self.run, version, steps, evals)
        for sink in self.open:
            sink.log(scalars)
        return len(scalars)

    def close(self) -> None:
        for sink in self.open:
            sink.close()
        self.open = []

    def __enter__(self) -> "Sinks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_update(config, version: int) -> None:
    """`roll train --log-to`: draw the committed update's steps (a TrainConfig `config`, version the new one)."""
    with Sinks(Run(config.run), config.log_to, config) as sinks:
        sinks.log_version(version, evals=False)


def replay(run: Run, names) -> dict:
    """Rebuild the sinks `names` of `run` from its tables (`roll report --to`): every committed version's steps,
    then its evaluations, in version order (so each curve's x only grows), into fresh directories."""
    versions = sorted(set(run.policy_versions()) | set(run.versions("evals")))
    with Sinks(run, names, fresh=True, flag="--to") as sinks:
        points = sum(sinks.log_version(v) for v in versions)
    return {"run": str(run.root), "sinks": {name: str(run.sink_dir(name)) for name in dict.fromkeys(names)},
            "versions": len(versions), "points": points}
