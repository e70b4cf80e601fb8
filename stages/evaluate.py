"""evaluate: held-out accuracy of a policy version — pass@1 (mean over k samples), unbiased pass@k, maj@k.

The default held-out set is the run's own test split (named after its task, e.g. `arith`); `--dataset`
names a bundled dataset (gsm8k, math500, aime24, aime25, amc23), whose test split is built with the run's
tokenizer. Per-sample rows go to evals/version=V/<dataset>-<settings hash>.parquet (the `evals` view of
`roll sql`): each set of sampling settings has its own file and its rows carry them in `settings`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import (BATCH_MAX, COUNT_MAX, GROUP_MAX, TEMPERATURE_MAX, TIMEOUT_MAX, TOKENS_MAX, check_ranges,
                          device_option, option, seed_option, version_option)
from roll.metrics import majority_correct, pass_at_k
from roll.store import Run, write_table


@dataclass(frozen=True)
class EvaluateConfig:
    run: Path  # run directory
    version: int | None = version_option("Policy version to evaluate. [default: the latest committed]")
    dataset: str | None = option(None, "Bundled dataset (gsm8k, math, math500, aime24, aime25, amc23). [default: the run's "
                                       "test split]", show_default=False)
    k: int = option(4, "Samples per prompt.", min=1, max=GROUP_MAX)
    temperature: float = option(1.0, "Sampling temperature; 0 is greedy (then the k samples are identical).", min=0,
                                max=TEMPERATURE_MAX)
    top_p: float = option(1.0, "Nucleus sampling mass (1 = off).", min=0, min_open=True, max=1)
    max_new_tokens: int | None = option(None, "Completion length limit. [default: the dataset's or the run's, from its "
                                              "task: 48 arith, 512 gsm8k, 1024 math]", show_default=False, min=1,
                                        max=TOKENS_MAX)
    limit: int | None = option(None, "Evaluate only the first N prompts. [default: all]", show_default=False, min=1,
                               max=COUNT_MAX)
    batch_size: int = option(256, "Sequences per forward pass.", min=1, max=BATCH_MAX)
    seed: int = seed_option("Random seed of the sampler.")
    timeout: float = option(5.0, "Hard bound in seconds on checking one answer.", min=0, min_open=True, max=TIMEOUT_MAX)
    device: str = device_option()
    force: bool = option(False, "Re-evaluate a committed version and dataset.")

def held_out_prompts(run: Run, dataset: str | None, tokenizer) -> tuple[str, list[dict]]:
    """(dataset name, test prompts as rows) for the run's test split or a bundled dataset."""
    if dataset is None:
        rows = [r for r in run.read_prompts().to_pylist() if r["split"] == "test"]
        if not rows:
            raise RollError(f"{run.prompts_path}: no prompts in the test split; pass --dataset")
        return rows[0]["task"], rows
    from roll.datasets import DATASETS, dataset_rows

    if dataset not in DATASETS:
        raise RollError(f"unknown dataset '{dataset}' (choose from: {', '.join(DATASETS)})")
    rows = [r for r in dataset_rows(dataset, tokenizer) if r["split"] == "test"]
    return dataset, rows


def run(config: EvaluateConfig) -> dict:
    """Sample k completions per held-out prompt, verify them, commit per-sample rows, return the metrics."""
    from dataclasses import replace

    import pyarrow as pa

    from transformers import AutoTokenizer

    from roll.datasets import MAX_NEW_TOKENS
    from roll.memory import check_sampling
    from roll.policy import check_context, encode_prompts, load_policy, pick_device
    from roll.rollouts import sample_rollouts, warn_if_cut
    from roll.runs import run_max_new_tokens
    from roll.store import SCHEMAS, read_table
    from roll.verifiers import make_verifier, verifier_for_task

    check_ranges(config)
    run_dir = Run(config.run)
    # a bundled dataset's own length (AIME needs more than the run's GSM8K), else the run's
    length = config.max_new_tokens or (MAX_NEW_TOKENS.get(config.dataset) if config.dataset else None)
    config = replace(config, max_new_tokens=run_max_new_tokens(run_dir, length))
    version = run_dir.latest_policy_version() if config.version is None else config.version
    policy_dir = run_dir.require_policy(version)
    # the prompts are built, encoded and their memory estimated with the tokenizer alone, before any weight loads
    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    name, rows = held_out_prompts(run_dir, config.dataset, tokenizer)
    rows = rows[: config.limit] if config.limit else rows
    settings = {"k": config.k, "limit": config.limit, "temperature": config.temperature, "top_p": config.top_p,
                "max_new_tokens": config.max_new_tokens, "seed": config.seed}
    path = run_dir.eval_path(version, name, settings)
    if path.exists() and not config.force:
        # summarise the committed file instead of sampling again
        return {**summarise(read_table(path, "evals").to_pylist(), config.k), "version": version,
                "dataset": name, "path": str(path), "skipped": True}

    started = time.perf_counter()
    prompt_ids = encode_prompts(tokenizer, [r["prompt"] for r in rows], [r["metadata"] for r in rows])
    check_sampling(policy_dir, config.device, prompt_ids, group_size=config.k, batch_size=config.batch_size,
                   max_new_tokens=config.max_new_tokens, top_p=config.top_p, what=f"evaluate v{version} on {name}",
                   lower="--limit, --k, --max-new-tokens or --batch-size")
    model, tokenizer = load_policy(policy_dir, pick_device(config.device))
    check_context(model.config, prompt_ids, [r["prompt_id"] for r in rows], config.max_new_tokens)
    # the rollouts' own sampler and row seeds (roll.rollouts), k completions per held-out prompt
    sampled = sample_rollouts(model, tokenizer, version, [r["prompt_id"] for r in rows], prompt_ids, group_size=config.k,
                              max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                              top_p=config.top_p, seed=config.seed, batch_size=config.batch_size, backend="hf",
                              description=f"evaluate v{version} on {name}")
    completions, lengths = sampled.column("completion").to_pylist(), sampled.column("num_tokens").to_pylist()
    warn_if_cut(sampled.column("finish_reason").to_pylist(), config.max_new_tokens)
    answers = [r["answer"] for r in rows for _ in range(config.k)]
    with make_verifier(verifier_for_task(rows[0]["task"]), timeout_s=config.timeout) as verifier:
        verdicts = verifier.verify_many(completions, answers)
    records = [{"policy_version": version, "dataset": name, "prompt_id": rows[i // config.k]["prompt_id"],
                "sample_index": i % config.k, "correct": v.correct, "extracted_answer": v.extracted_answer,
                "num_tokens": n, "settings": json.dumps(settings, sort_keys=True)}
               for i, (v, n) in enumerate(zip(verdicts, lengths))]
    write_table(path, "evals", pa.Table.from_pylist(records, schema=SCHEMAS["evals"]))
    return {**summarise(records, config.k), "version": version, "dataset": name,
            "path": str(path), "skipped": False, "seconds": round(time.perf_counter() - started, 2)}


def summarise(records: list[dict], k: int) -> dict:
    """pass@1, pass@k and maj@k over prompts, from per-sample rows."""
    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt_id"], []).append(record)
    n_prompts = len(by_prompt)
    groups = list(by_prompt.values())
    k = min(k, min(len(g) for g in groups))
    return {
        "prompts": n_prompts, "k": k,
        "pass@1": round(sum(sum(r["correct"] for r in g) / len(g) for g in groups) / n_prompts, 4),
        f"pass@{k}": round(sum(pass_at_k(len(g), sum(r["correct"] for r in g), k) for g in groups) / n_prompts, 4),
        f"maj@{k}": round(sum(majority_correct([r["extracted_answer"] for r in g], [r["correct"] for r in g])
                              for g in groups) / n_prompts, 4),
    }
