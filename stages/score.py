"""score: teacher-forced log-probs of each completion under its behaviour checkpoint and under π_ref.

`trainer_logprobs` are the behaviour checkpoint's log-probs recomputed with training numerics (a batched
teacher-forced forward pass, the same code the trainer differentiates), of the same sampling
distribution the sampler used (temperature, then top-p); `mismatch_max_abs` and `mismatch_kl` measure how
far they sit from the sampler's own `behaviour_logprobs`. `ref_logprobs` are π_ref's (version 0) at the
sampling temperature; with `ref=False` (`--no-ref`, and what train and iterate ask for when the objective
never reads π_ref) they are NULL and π_ref's forward pass is skipped. Group statistics (size, mean and std
of reward per prompt) come from the verdicts.
Score shards mirror rollout shards, like verify's.

Which checkpoint stands for π_b: the row's `model_version` (the version that sampled it: its own version for
roll's rows, `roll import --model-version M` for imported ones), or every row's `--behaviour-checkpoint M`
when given (rows imported without log-probs are filled this way). A row sampled elsewhere (no model version)
with its own imported log-probs keeps them as π_b, with no forward pass. `behaviour_checkpoint` records which
it was (null: the imported log-probs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import BATCH_MAX, check_ranges, device_option, option, rollout_shard_option, versions_option
from roll.store import Run, Shard


@dataclass(frozen=True)
class ScoreConfig:
    run: Path  # run directory
    versions: tuple[int, ...] | None = versions_option()
    shard: Shard = rollout_shard_option()
    batch_size: int = option(64, "Sequences per forward pass.", min=1, max=BATCH_MAX)
    device: str = device_option()
    ref: bool = option(True, "Also π_ref's log-probs (--no-ref: one forward pass fewer; train re-scores if its objective "
                             "needs them).")
    behaviour_checkpoint: int | None = option(None, "The version whose checkpoint's log-probs stand for the behaviour "
                                                    "policy of every row scored (rows imported without log-probs). "
                                                    "[default: the version that sampled each row]",
                                              show_default=False, min=0)
    force: bool = option(False, "Re-score committed shards.")

def group_stats(verdicts) -> dict[str, tuple[int, float, float]]:
    """prompt_id → (group size, mean reward, population std of reward)."""
    import statistics

    rewards: dict[str, list[float]] = {}
    for pid, reward in zip(verdicts.column("prompt_id").to_pylist(), verdicts.column("reward").to_pylist()):
        rewards.setdefault(pid, []).append(reward)
    return {pid: (len(r), statistics.fmean(r), statistics.pstdev(r)) for pid, r in rewards.items()}


def behaviour_checkpoint(row: dict, named: int | None, path: Path) -> int | None:
    """The version whose checkpoint stands for π_b of `row` (module docstring), or None: its imported log-probs."""
    if named is not None:
        return named
    if row["model_version"] is not None:
        return row["model_version"]
    if row["behaviour_logprobs"] is None:
        raise RollError(f"{path}: row of prompt_id '{row['prompt_id']}' sample {row['sample_index']} was imported "
                        f"without behaviour log-probs or a model version; name the checkpoint whose log-probs stand "
                        f"for the behaviour policy with `roll score --behaviour-checkpoint M`")
    return None


def run(config: ScoreConfig) -> dict:
    """Score every pending rollout shard; returns rows, worst mismatch and seconds."""
    import math

    import pyarrow as pa

    from roll.memory import check_scoring
    from roll.policy import load_policy, pick_device
    from roll.progress import progress_bar
    from roll.sampling import score_rows
    from roll.store import SCHEMAS, read_table

    check_ranges(config)
    run_dir = Run(config.run)
    todo = run_dir.pending_shards("scores", run_dir.selected_versions(config.versions), config.shard, config.force)
    summary = {"run": str(run_dir.root), "shards": len(todo), "rows": 0, "mismatch_max_abs": 0.0}
    if not todo:
        return summary
    device = pick_device(config.device)
    check_scoring(run_dir.require_policy(0), device, [path for _, _, path in todo], batch_size=config.batch_size,
                  models=2 if config.ref and any(version for version, _, _ in todo) else 1)
    started = time.perf_counter()
    ref_model = load_policy(run_dir.require_policy(0), device)[0] if config.ref else None
    behaviour = (0, ref_model) if config.ref else (None, None)  # (version, model) of the checkpoint in hand
    with progress_bar("score", len(todo), "shards") as advance:
        for version, name, path in todo:
            verdict_path = run_dir.version_dir("verdicts", version) / name
            if not verdict_path.exists():
                raise RollError(f"{verdict_path}: missing; run `roll verify` before `roll score`")
            if run_dir.generation_of("verdicts", version, name) != run_dir.generation_of("rollouts", version, name):
                raise RollError(f"{verdict_path}: made from rollouts that have since been regenerated; run `roll verify` "
                                f"before `roll score`")
            rollouts = read_table(path, "rollouts")
            stats = group_stats(read_table(verdict_path, "verdicts"))
            rows = rollouts.to_pylist()
            checkpoints = [behaviour_checkpoint(row, config.behaviour_checkpoint, path) for row in rows]
            trainer = [row["behaviour_logprobs"] for row in rows]  # kept where no checkpoint stands for π_b
            for checkpoint in sorted({c for c in checkpoints if c is not None}):
                if behaviour[0] != checkpoint:
                    behaviour = (checkpoint, load_policy(run_dir.require_policy(checkpoint), device)[0])
                where = [i for i, c in enumerate(checkpoints) if c == checkpoint]
                for i, logprobs in zip(where, score_rows(behaviour[1], [rows[i] for i in where], config.batch_size)):
                    trainer[i] = logprobs
            if not config.ref:
                ref = [None] * len(rows)
            elif all(c == 0 for c in checkpoints) and all(row["top_p"] == 1.0 for row in rows):
                ref = trainer  # π_ref is the behaviour checkpoint, at the same temperature: the same forward pass
            else:
                ref = score_rows(ref_model, rows, config.batch_size, top_p_override=1.0)
            columns = {column: [] for column in SCHEMAS["scores"].names}
            for row, t_lp, r_lp, checkpoint in zip(rows, trainer, ref, checkpoints):
                sampled = row["behaviour_logprobs"]
                diffs = None if sampled is None else [t - b for t, b in zip(t_lp, sampled)]
                if row["prompt_id"] not in stats:
                    raise RollError(f"{verdict_path}: no verdict for prompt_id '{row['prompt_id']}'")
                size, mean, std = stats[row["prompt_id"]]
                values = {
                    "policy_version": row["policy_version"], "prompt_id": row["prompt_id"],
                    "sample_index": row["sample_index"], "behaviour_logprob_sum": sum(t_lp),
                    "ref_logprob_sum": None if r_lp is None else sum(r_lp),
                    "mismatch_max_abs": None if diffs is None else max(map(abs, diffs), default=0.0),
                    # k3 estimator of KL(π_sampler ‖ π_trainer) per token, averaged over the completion
                    "mismatch_kl": None if diffs is None else sum(math.exp(d) - 1 - d for d in diffs) / max(len(diffs), 1),
                    "trainer_logprobs": t_lp, "ref_logprobs": r_lp,
                    "group_size": size, "group_reward_mean": mean, "group_reward_std": std,
                    "generation_id": row["generation_id"], "behaviour_checkpoint": checkpoint,
                }
                for column, value in values.items():
                    columns[column].append(value)
            run_dir.commit_shard("scores", version, name, pa.table(columns, schema=SCHEMAS["scores"]))
            summary["rows"] += len(rows)
            measured = [m for m in columns["mismatch_max_abs"] if m is not None]
            summary["mismatch_max_abs"] = max(summary["mismatch_max_abs"], max(measured, default=0.0))
            advance()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
