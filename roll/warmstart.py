"""warmstart: supervised training of a built-in task's bundled model on worked solutions.

The model (GPT-2 style, the embedded character-level tokenizer) starts from random weights and learns the
task's format and some arithmetic from worked solutions (loss on completion tokens only). Training stops as
soon as sampled pass@1 on the test split reaches `target_accuracy`: a deliberately weak policy, so RL has room
to improve it. `--task arith` writes data/default_model/ (d 192, 4 layers, 128 positions), `--task chain`
data/chain_model/ (1024 positions: chain:24's prompt and 768 new tokens fit), each with warmstart.json
recording the command, seed and measured accuracy.
"""
from __future__ import annotations

import json
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from roll.options import BATCH_MAX, COUNT_MAX, FLOAT32_MAX, check_ranges, option, seed_option


@dataclass(frozen=True)
class WarmstartConfig:
    task: str = option("arith", "Built-in task: arith (the embedded default model) or chain[:S] (the chain model).")
    out: Path | None = option(None, "Where to save the checkpoint. [default: the package's data/default_model, or "
                              "data/chain_model for chain]", show_default=False)
    d_model: int = option(192, "Width of the model.", min=8, max=4096)
    layers: int = option(4, "Transformer blocks.", min=1, max=64)
    seed: int = seed_option("Random seed: model init, batch order and evaluation sampling.")
    steps: int = option(3000, "Most supervised steps to take.", min=1, max=COUNT_MAX)
    batch_size: int = option(64, "Solved examples per step.", min=1, max=BATCH_MAX)
    lr: float = option(1e-3, "AdamW learning rate (after a 50-step linear warm-up).", min=0, min_open=True, max=FLOAT32_MAX)
    eval_every: int = option(100, "Measure sampled pass@1 every this many steps; 0 = never (and never stop early).",
                             min=0, max=COUNT_MAX)
    eval_prompts: int = option(200, "Test prompts per measurement (one sample each, T=1).", min=1, max=COUNT_MAX)
    target_accuracy: float = option(0.2, "Stop once sampled pass@1 reaches this (a deliberately weak policy).", min=0,
                                    max=1)


def solved_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + solution + EOS, prompt length) for each row."""
    examples = []
    for row in rows:
        prompt = tokenizer(row["prompt"])["input_ids"]
        solution = tokenizer(json.loads(row["metadata"])["solution"], add_special_tokens=False)["input_ids"]
        examples.append((prompt + solution + [tokenizer.eos_token_id], len(prompt)))
    return examples


def collate(examples, pad_id: int):
    """Right-padded (input_ids, labels) with labels −100 on prompt and padding: loss on completions only."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_len: len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, labels


def sampled_accuracy(model, tokenizer, rows: list[dict], seed: int, max_new_tokens: int) -> float:
    """Sampled pass@1 (T = 1, one sample per prompt) with the task's exact verifier."""

    from roll.sampling import sample_batch
    from roll.tasks import extract_arith_answer

    model.eval()
    prompts = [tokenizer(row["prompt"])["input_ids"] for row in rows]
    samples = sample_batch(model, prompts, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                           eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                           seeds=[seed * len(prompts) + i for i in range(len(prompts))])
    model.train()
    correct = sum(extract_arith_answer(tokenizer.decode(s.token_ids, skip_special_tokens=True)) == row["answer"]
                  for s, row in zip(samples, rows))
    return correct / len(rows)


def run(config: WarmstartConfig) -> dict:
    """Train, stop at the target accuracy (or the step limit), save; returns losses and accuracies."""
    import torch

    from roll.data import CHAIN_MODEL_DIR, DEFAULT_MODEL_DIR
    from roll.errors import RollError
    from roll.policy import build_default_model, build_default_tokenizer
    from roll.progress import progress_bar
    from roll.runs import task_max_new_tokens
    from roll.tasks import ARITH, arith_rows, chain_rows, chain_steps

    check_ranges(config)
    steps = chain_steps(config.task)
    if config.task != ARITH and steps is None:
        raise RollError(f"--task {config.task}: warmstart trains the built-in tasks' models: arith or chain[:S]")
    if config.d_model % 4:
        raise RollError(f"--d-model {config.d_model}: must be a multiple of the 4 attention heads")
    out = Path(config.out or (DEFAULT_MODEL_DIR if steps is None else CHAIN_MODEL_DIR))
    rows = arith_rows(seed=0) if steps is None else chain_rows(seed=0, steps=steps)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"][: config.eval_prompts]
    max_new_tokens = task_max_new_tokens(config.task)
    tokenizer = build_default_tokenizer()
    if steps is not None:
        tokenizer.model_max_length = 1024  # the chain model's context, saved with its tokenizer
    model = build_default_model(tokenizer, d_model=config.d_model, layers=config.layers, seed=config.seed,
                                positions=tokenizer.model_max_length)
    model.train()
    examples = solved_examples(tokenizer, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))
    rng = random.Random(config.seed)

    losses, evaluations, accuracy, started = [], [], None, time.perf_counter()
    with progress_bar("warmstart", config.steps, "steps") as advance:
        for step in range(1, config.steps + 1):
            input_ids, labels = collate(rng.sample(examples, config.batch_size), tokenizer.pad_token_id)
            loss = model(input_ids=input_ids, attention_mask=(input_ids != tokenizer.pad_token_id).long(),
                         labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            advance()
            if config.eval_every and step % config.eval_every == 0:
                accuracy = sampled_accuracy(model, tokenizer, test, seed=config.seed, max_new_tokens=max_new_tokens)
                evaluations.append({"step": step, "loss": losses[-1], "sampled_pass@1": accuracy})
                print(f"step {step}: loss {losses[-1]:.4f}, sampled pass@1 {accuracy:.3f}", file=sys.stderr, flush=True)
                if accuracy >= config.target_accuracy:
                    break

    model.eval()
    summary = {
        "command": "roll warmstart " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["warmstart"] else None,
        "config": {**asdict(config), "out": str(out)},
        "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
        "sampled_pass@1": accuracy, "eval_prompts": len(test), "evaluations": evaluations,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "warmstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "losses": losses}
