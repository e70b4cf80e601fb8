"""ope: how good is policy version V on rollouts older versions sampled — without sampling from V (DESIGN §7).

For each stale row (behaviour version d in the chosen range, verified) the sequence log-weight
ℓ = log π_V(y | x) − log π_b(y | x): π_V by teacher forcing through score's batched path (`score_rows`) at the
row's own temperature and top-p — the distribution V would sample from with the same sampler settings — and
π_b the sampler's stored `behaviour_logprobs`. With top-p < 1, a token outside V's nucleus gives ℓ = −∞
(weight 0, as V would never draw it), and completions V could draw but π_b's nucleus excluded are never
seen: the estimate then covers π_b's support only, which for rewards ≥ 0 biases it low (still a lower bound).

Rows go to `ope/version=V/from-dddd-<rollout file>` (one file per rollout file, so `--shard i/N` and Slurm
arrays split the work as score does, and a killed run resumes); once every file of the range is there, the
estimates (roll.ope.evaluate: LS estimate and lower bound, IPS, SNIPS, ESS) go to one `ope_summary` row.
A file is redone when its rollouts were regenerated; after retraining V itself (`roll train --force`) or
re-verifying with other settings, rerun with `--force`: the files do not record V's weights or the rewards'
settings.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import BATCH_MAX, VERSION_MAX, check_ranges, device_option, option, rollout_shard_option, version_option
from roll.store import Run, Shard, shard_index


@dataclass(frozen=True)
class OpeConfig:
    run: Path  # run directory
    version: int | None = version_option("Target policy version V. [default: the latest committed]")
    data_versions: tuple[int, int] | None = option(None, "Behaviour versions a..b of the stale rollouts. [default: V-1]",
                                                   show_default=False, min=0, max=VERSION_MAX)
    delta: float = option(0.05, "The lower bound holds with probability >= 1 - delta.", min=0, min_open=True, max=1,
                          max_open=True)
    lambda_rule: str = option("auto", "λ of logarithmic smoothing: auto (best of a fixed grid, union bound), sqrt "
                                      "(1/sqrt(n), the paper's code) or a number.", flag="--lambda")
    shard: Shard = rollout_shard_option()
    batch_size: int = option(64, "Sequences per forward pass.", min=1, max=BATCH_MAX)
    device: str = device_option()
    force: bool = option(False, "Recompute log-weights already committed.")

def check_config(config: OpeConfig) -> None:
    check_ranges(config)
    if config.lambda_rule not in ("auto", "sqrt"):
        try:
            value = float(config.lambda_rule)
        except ValueError:
            value = math.nan
        if not 0 < value <= 1e6:
            raise RollError(f"--lambda {config.lambda_rule}: choose auto, sqrt or a number > 0")


def data_range(run_dir: Run, version: int, data_versions: tuple[int, int] | None) -> tuple[int, int]:
    lo, hi = data_versions if data_versions is not None else (version - 1, version - 1)
    if lo < 0 or hi < lo:
        raise RollError(f"--data-versions {lo}..{hi}: need 0 ≤ a ≤ b (version {version} has no version before it)"
                        if version == 0 and data_versions is None else f"--data-versions {lo}..{hi}: need 0 ≤ a ≤ b")
    missing = [d for d in range(lo, hi + 1) if not run_dir.files("rollouts", d)]
    if missing:
        raise RollError(f"{run_dir.root}: no rollouts for data version {missing[0]}")
    return lo, hi


def units(run_dir: Run, lo: int, hi: int, shard: Shard) -> list[tuple[int, str, Path]]:
    """(data version, rollout file name, path) of this shard's rollout files, each checked to have current verdicts."""
    out = []
    for data_version in range(lo, hi + 1):
        for name, path in run_dir.files("rollouts", data_version).items():
            if shard_index(name) % shard.count != shard.index:
                continue
            verdicts = run_dir.version_dir("verdicts", data_version) / name
            generation = run_dir.generation_of("rollouts", data_version, name)
            if not verdicts.exists() or run_dir.generation_of("verdicts", data_version, name) != generation:
                raise RollError(f"{verdicts}: no verdicts for these rollouts (data version {data_version}); run "
                                f"`roll verify --version {data_version}` first")
            out.append((data_version, name, path))
    return out


def weighed(run_dir: Run, version: int, data_version: int, name: str) -> bool:
    """Whether rollout file `name` of `data_version` has its log-weights under `version`, made from the rollouts
    now committed (a file made from rollouts since regenerated is redone)."""
    path = run_dir.ope_rows_path(version, data_version, name)
    return path.exists() and run_dir.generation_of("ope", version, path.name) == run_dir.generation_of("rollouts", data_version, name)


def weigh(model, run_dir: Run, version: int, data_version: int, name: str, path: Path, batch_size: int):
    """The `ope` rows of one rollout file: log-weights of its completions under `model` (policy `version`)."""
    import pyarrow as pa

    from roll.sampling import score_rows
    from roll.store import SCHEMAS, read_table

    rollouts = read_table(path, "rollouts").to_pylist()
    verdicts = read_table(run_dir.version_dir("verdicts", data_version) / name, "verdicts")
    reward = {(p, j): r for p, j, r in zip(verdicts.column("prompt_id").to_pylist(),
                                          verdicts.column("sample_index").to_pylist(), verdicts.column("reward").to_pylist())}
    unweighable = next((row for row in rollouts if row["behaviour_logprobs"] is None), None)
    if unweighable is not None:  # an importance weight needs the sampler's own log-probs, not a stand-in
        raise RollError(f"{path}: prompt_id '{unweighable['prompt_id']}' sample {unweighable['sample_index']} was "
                        f"imported without the sampler's log-probs; roll ope needs them")
    target = score_rows(model, rollouts, batch_size)
    records = []
    for row, lp in zip(rollouts, target):
        key = (row["prompt_id"], row["sample_index"])
        if key not in reward:
            raise RollError(f"{run_dir.version_dir('verdicts', data_version) / name}: no verdict for prompt_id "
                            f"'{key[0]}' sample {key[1]}")
        if not 0.0 <= reward[key] <= 1.0:
            raise RollError(f"{run_dir.version_dir('verdicts', data_version) / name}: reward {reward[key]} of prompt_id "
                            f"'{key[0]}' sample {key[1]} is outside [0, 1]; the bound needs rewards in [0, 1]")
        target_sum, behaviour_sum = float(sum(lp)), float(sum(row["behaviour_logprobs"]))
        records.append({"target_version": version, "policy_version": data_version, "prompt_id": key[0],
                        "sample_index": key[1], "reward": reward[key], "num_tokens": row["num_tokens"],
                        "target_logprob_sum": target_sum, "behaviour_logprob_sum": behaviour_sum,
                        "log_weight": target_sum - behaviour_sum, "generation_id": row["generation_id"]})
    return pa.Table.from_pylist(records, schema=SCHEMAS["ope"])


def summarise(run_dir: Run, version: int, lo: int, hi: int, delta: float, rule: str) -> dict | None:
    """The estimates over every row of lo..hi, committed as one `ope_summary` row; None while files are missing."""
    import pyarrow as pa

    from roll.ope import evaluate
    from roll.store import SCHEMAS, read_table, write_table

    files = [(d, name) for d in range(lo, hi + 1) for name in run_dir.files("rollouts", d)]
    if not all(weighed(run_dir, version, d, name) for d, name in files):
        return None
    paths = [run_dir.ope_rows_path(version, d, name) for d, name in files]
    rows = pa.concat_tables([read_table(p, "ope") for p in paths])
    prompts = [f"{d}/{p}" for d, p in zip(rows.column("policy_version").to_pylist(), rows.column("prompt_id").to_pylist())]
    estimates = evaluate(rows.column("log_weight").to_numpy(), rows.column("reward").to_numpy(), prompts, delta,
                         rule if rule in ("auto", "sqrt") else float(rule))
    summary = {"target_version": version, "data_lo": lo, "data_hi": hi, **estimates, "lambda_rule": rule}
    settings = {"delta": delta, "lambda": rule}
    write_table(run_dir.ope_summary_path(version, lo, hi, settings), "ope_summary",
                pa.Table.from_pylist([summary], schema=SCHEMAS["ope_summary"]))
    return summary


def run(config: OpeConfig) -> dict:
    """Weigh this shard's stale rows under V, then (when the range is complete) write and return the estimates."""
    from roll.policy import load_policy, pick_device
    from roll.progress import progress_bar

    check_config(config)
    run_dir = Run(config.run)
    version = run_dir.latest_policy_version() if config.version is None else config.version
    policy_dir = run_dir.require_policy(version)
    lo, hi = data_range(run_dir, version, config.data_versions)
    in_sample = sorted(v for v in run_dir.trained_on(version) if lo <= v <= hi)
    if in_sample:  # the bound assumes V does not depend on the rows (EXPERIMENTS.md: at lag 4 it then missed)
        print(f"roll: version(s) {', '.join(map(str, in_sample))} of {lo}..{hi} trained v{version} or an ancestor: "
              f"the estimates are in-sample (optimistic) and the bound's guarantee does not hold", file=sys.stderr)
    todo = [u for u in units(run_dir, lo, hi, config.shard) if config.force or not weighed(run_dir, version, u[0], u[1])]
    started = time.perf_counter()
    rows = 0
    if todo:
        model, _ = load_policy(policy_dir, pick_device(config.device))
        with progress_bar(f"ope v{version} on {lo}..{hi}", len(todo), "files") as advance:
            for data_version, name, path in todo:
                table = weigh(model, run_dir, version, data_version, name, path, config.batch_size)
                run_dir.commit_shard("ope", version, run_dir.ope_rows_path(version, data_version, name).name, table)
                rows += table.num_rows
                advance()
    summary = summarise(run_dir, version, lo, hi, config.delta, config.lambda_rule)
    out = {"run": str(run_dir.root), "version": version, "data_versions": [lo, hi], "rows_weighed": rows,
           "seconds": round(time.perf_counter() - started, 3)}
    if summary is None:
        return {**out, "complete": False}
    return {**out, "complete": True, **{k: v for k, v in summary.items() if k not in ("target_version",)}}
