"""verify: extract each completion's final answer, compare it with the ground truth, commit verdicts.

Verdict shards mirror rollout shards (rollouts part-i-of-N → verdicts part-i-of-N), so `--shard j/M` of a
Slurm array takes the rollout shards whose index is j modulo M, and a rerun skips committed verdicts.
Reward is 1 for a correct answer, else 0, minus `format_penalty` when no final answer could be found; with
`--reward` (repeatable, weighted by `--reward-weight`) it is the weighted sum of that built-in `correct` term and
users' reward functions (roll/rewards.py), each term recorded in the verdict's `reward_terms`. Model output is
never evaluated as code; a verifier or reward function that hangs, raises or dies is timed out or stopped and
recorded as an error (reward term 0), never a dead stage. Changing `--reward` changes no committed verdict:
rerun with `--force`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import FLOAT32_MAX, TIMEOUT_MAX, check_ranges, option, rollout_shard_option, versions_option
from roll.store import Run, Shard


@dataclass(frozen=True)
class VerifyConfig:
    run: Path  # run directory
    versions: tuple[int, ...] | None = versions_option()
    shard: Shard = rollout_shard_option()
    verifier: str | None = option(None, "Verifier. [default: chosen from each prompt's task]", choices=("arith", "math"),
                                  show_default=False)
    timeout: float = option(5.0, "Hard bound in seconds on checking one answer, and on one call of a --reward function.",
                            min=0, min_open=True, max=TIMEOUT_MAX)
    workers: int = option(2, "Worker processes of the math verifier, and of each --reward function.", min=1, max=1024)
    format_penalty: float = option(0.0, "Subtracted from the reward when no final answer is found.", min=0,
                                   max=FLOAT32_MAX)
    reward: tuple[str, ...] | None = option(
        None, "Reward term (repeatable): correct (the verifier's), module:function or path/to/file.py:function, "
        "called as function(completion, answer, prompt_row). The reward is the weighted sum of the terms. "
        "[default: correct]", repeatable=True, show_default=False)
    reward_weight: tuple[float, ...] | None = option(
        None, "Weight of the --reward in the same place (repeatable). [default: 1 each]", repeatable=True,
        show_default=False, min=-FLOAT32_MAX, max=FLOAT32_MAX)
    force: bool = option(False, "Re-verify committed shards.")

def run(config: VerifyConfig) -> dict:
    """Verify every pending rollout shard; returns rows, accuracy, errors (rows with any error; reward_errors:
    rows with a reward term's) and seconds."""
    import pyarrow as pa

    from roll.progress import progress_bar
    from roll.rewards import CompositeReward, parse_terms
    from roll.store import SCHEMAS, read_table
    from roll.verifiers import make_verifier, verifier_for_task

    check_ranges(config)
    terms = parse_terms(config.reward, config.reward_weight)
    run_dir = Run(config.run)
    todo = run_dir.pending_shards("verdicts", run_dir.selected_versions(config.versions), config.shard, config.force)
    summary = {"run": str(run_dir.root), "shards": len(todo), "rows": 0, "correct": 0, "errors": 0, "reward_errors": 0}
    if not todo:
        return summary
    prompts = run_dir.read_prompts()
    prompt_row = {row["prompt_id"]: row for row in prompts.to_pylist()}
    answer = {pid: row["answer"] for pid, row in prompt_row.items()}
    task = {pid: row["task"] for pid, row in prompt_row.items()}
    started = time.perf_counter()
    verifiers = {}
    reward = CompositeReward(terms, config.timeout, config.workers, config.format_penalty)
    try:
        reward.start()  # a reward function that cannot be loaded stops the stage here, before any commit
        tables = [(version, name, read_table(path, "rollouts")) for version, name, path in todo]
        total = sum(t.num_rows for _, _, t in tables)
        with progress_bar("verify", total) as advance:
            for version, name, rollouts in tables:
                ids = rollouts.column("prompt_id").to_pylist()
                completions = rollouts.column("completion").to_pylist()
                unknown = sorted(set(ids) - answer.keys())
                if unknown:
                    raise RollError(f"{run_dir.version_dir('rollouts', version) / name}: prompt_id '{unknown[0]}' "
                                    f"is not in {run_dir.prompts_path}")
                kinds = [config.verifier or verifier_for_task(task[pid]) for pid in ids]
                verdicts = [None] * len(ids)
                for kind in sorted(set(kinds)):
                    if kind not in verifiers:
                        verifiers[kind] = make_verifier(kind, timeout_s=config.timeout, workers=config.workers)
                    rows = [i for i, n in enumerate(kinds) if n == kind]
                    for i, verdict in zip(rows, verifiers[kind].verify_many([completions[i] for i in rows],
                                                                            [answer[ids[i]] for i in rows])):
                        verdicts[i] = verdict
                scored = reward.score_many(completions, [answer[pid] for pid in ids], [prompt_row[pid] for pid in ids],
                                           verdicts)
                table = pa.table({
                    "policy_version": rollouts.column("policy_version"), "prompt_id": rollouts.column("prompt_id"),
                    "sample_index": rollouts.column("sample_index"), "reward": [s.reward for s in scored],
                    "correct": [v.correct for v in verdicts], "extracted_answer": [v.extracted_answer for v in verdicts],
                    "format_ok": [v.format_ok for v in verdicts],
                    "verifier": [f"{verifiers[n].name} {verifiers[n].version}" for n in kinds],
                    "milliseconds": [v.milliseconds for v in verdicts],
                    "error": ["; ".join(filter(None, (v.error, s.errors))) for v, s in zip(verdicts, scored)],
                    "generation_id": rollouts.column("generation_id"), "reward_terms": [s.terms for s in scored],
                }, schema=SCHEMAS["verdicts"])
                run_dir.commit_shard("verdicts", version, name, table)
                summary["rows"] += len(verdicts)
                summary["correct"] += sum(v.correct for v in verdicts)
                summary["errors"] += sum(bool(v.error or s.errors) for v, s in zip(verdicts, scored))
                summary["reward_errors"] += sum(bool(s.errors) for s in scored)
                advance(len(verdicts))
    finally:
        reward.close()
        for verifier in verifiers.values():
            verifier.close()
    summary["accuracy"] = round(summary["correct"] / summary["rows"], 4) if summary["rows"] else None
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary
