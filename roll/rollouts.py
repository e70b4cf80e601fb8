"""Rollout rows: the one builder every backend uses, and the hf backend's sampling loop that fills them.

generate (both backends), evaluate and apo's version-0 supplement all sample through here, so a row means the
same thing wherever it was made (DESIGN §3.2: the rollouts table).
"""
from __future__ import annotations

import sys


def rollout_row(version: int, prompt_id: str, sample_index: int, prompt_token_ids, sample, completion: str,
                max_new_tokens: int, temperature: float, top_p: float, seed: int, backend: str) -> dict:
    """One row of the rollouts table from a `roll.sampling.Sample` (generation_id is stamped at commit)."""
    return {
        "policy_version": version, "prompt_id": prompt_id, "sample_index": sample_index, "completion": completion,
        "prompt_token_ids": prompt_token_ids, "token_ids": sample.token_ids, "behaviour_logprobs": sample.logprobs,
        "num_tokens": len(sample.token_ids), "finish_reason": sample.finish_reason,
        "stop_token_id": sample.stop_token_id, "max_new_tokens": max_new_tokens, "temperature": temperature,
        "top_p": top_p, "seed": seed, "backend": backend, "generation_id": "", "model_version": version,
        "source": "generate",
    }


def rollout_table(rows: list[dict]):
    """The rows as a pyarrow table of the rollouts schema."""
    import pyarrow as pa

    from roll.store import SCHEMAS

    return pa.Table.from_pylist(rows, schema=SCHEMAS["rollouts"])


def sample_rollouts(model, tokenizer, version: int, prompt_ids: list[str], prompt_tokens: list[list[int]], *,
                    group_size: int, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                    batch_size: int, backend: str, description: str):
    """Rollout rows (a pyarrow table) of `group_size` samples for each prompt, batched prompt-major. Row seeds
    come from (seed, version, prompt id, sample index): see `roll.sampling.group_seeds`."""
    from roll.progress import progress_bar
    from roll.sampling import completion_text, group_seeds, sample_batch, stop_token_ids

    stops = stop_token_ids(model.generation_config, tokenizer)
    prompts_per_batch = max(1, batch_size // group_size)
    rows = []
    with progress_bar(description, len(prompt_ids) * group_size, "sequences") as advance:
        for start in range(0, len(prompt_ids), prompts_per_batch):
            batch_ids = prompt_ids[start:start + prompts_per_batch]
            batch_prompts = prompt_tokens[start:start + prompts_per_batch]
            seeds = group_seeds(seed, version, batch_ids, group_size)
            samples = sample_batch(model, batch_prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, eos_id=stops, pad_id=tokenizer.pad_token_id,
                                   seeds=seeds, group_size=group_size)  # (prompts × G) rows, prompt-major
            for row, sample in enumerate(samples):
                prompt_index, sample_index = divmod(row, group_size)
                rows.append(rollout_row(version, batch_ids[prompt_index], sample_index, batch_prompts[prompt_index],
                                        sample, completion_text(tokenizer, sample), max_new_tokens, temperature,
                                        top_p, seeds[row], backend))
            advance(len(samples))
    return rollout_table(rows)


def prompt_tokens(prompts, tokenizer, prompt_ids: list[str]) -> list[list[int]]:
    """Token ids of the prompts `prompt_ids`, in order, from a run's prompts table."""
    from roll.policy import encode_prompts

    by_id = {pid: i for i, pid in enumerate(prompts.column("prompt_id").to_pylist())}
    texts, metadata = prompts.column("prompt").to_pylist(), prompts.column("metadata").to_pylist()
    return encode_prompts(tokenizer, [texts[by_id[pid]] for pid in prompt_ids], [metadata[by_id[pid]] for pid in prompt_ids])


def warn_if_cut(finish_reasons: list[str], max_new_tokens: int) -> None:
    """One line when more than a fifth of the completions hit the length limit: they end unfinished and
    mostly score 0, which looks like a weak policy rather than a short limit."""
    cut = sum(1 for reason in finish_reasons if reason == "length")
    if finish_reasons and cut / len(finish_reasons) > 0.2:
        print(f"roll: {cut} of {len(finish_reasons)} completions ({100 * cut / len(finish_reasons):.0f}%) reached "
              f"--max-new-tokens {max_new_tokens} unfinished; raise it if the task's answers are longer", file=sys.stderr)
