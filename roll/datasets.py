"""Bundled real datasets: GSM8K, MATH (train) with MATH-500, AIME 2024, AIME 2025 and AMC 2023 as prompts-table rows.

The JSONL files live under `roll.data.DATA_DIR` (sources, licences and checksums in data/SOURCES.md); each
line has `id`, `problem` and `answer` plus source fields. Rows come out in file order, so a prompt id
(`gsm8k-test-00042`) names the same problem on every machine. Answers are checked by the `math` verifier,
so the prompt asks for a `\\boxed{}` final answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from roll.data import DATA_DIR
from roll.errors import RollError

# name -> split -> file; then the source fields a row's metadata keeps (solutions stay in the files).
DATASETS: dict[str, dict[str, Path]] = {
    "gsm8k": {"train": DATA_DIR / "gsm8k" / "train.jsonl", "test": DATA_DIR / "gsm8k" / "test.jsonl"},
    # MATH's 7,470 training problems, evaluated on the MATH-500 test split (no problem in both)
    "math": {"train": DATA_DIR / "math" / "train.jsonl", "test": DATA_DIR / "math500" / "test.jsonl"},
    "math500": {"test": DATA_DIR / "math500" / "test.jsonl"},
    "aime24": {"test": DATA_DIR / "aime24" / "test.jsonl"},
    "aime25": {"test": DATA_DIR / "aime25" / "test.jsonl"},
    "amc23": {"test": DATA_DIR / "amc23" / "test.jsonl"},
}
KEPT_FIELDS = ("level", "subject", "year", "contest", "problem_number", "url")
INSTRUCTION = "Solve the problem. Put the final answer in \\boxed{}."

# Completion lengths a run of each task records in run.toml at `roll init`, used by generate and evaluate
# unless --max-new-tokens is given: GSM8K reference solutions run to a median of ~95 tokens (so 48 cut
# nearly all of them), MATH solutions are longer, competition problems longer still.
MAX_NEW_TOKENS = {"arith": 48, "gsm8k": 512, "math": 1024, "math500": 1024, "aime24": 2048, "aime25": 2048,
                  "amc23": 2048}
FILE_TASK_MAX_NEW_TOKENS = 512  # a user's own task file


def dataset_records(name: str) -> list[tuple[str, dict]]:
    """(split, source record) for every problem of a bundled dataset, in file order."""
    if name not in DATASETS:
        raise RollError(f"unknown dataset '{name}' (choose from: {', '.join(DATASETS)})")
    records = []
    for split, path in DATASETS[name].items():
        with open(path, encoding="utf-8") as f:
            records += [(split, json.loads(line)) for line in f if line.strip()]
    return records


def format_prompt(problem: str, tokenizer=None) -> tuple[str, bool]:
    """(prompt text, whether a chat template was applied) for one problem."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{problem}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, True
    # A base model continues text, so the prompt ends where the solution should begin.
    return f"{INSTRUCTION}\n\nProblem: {problem}\nSolution:", False


def dataset_rows(name: str, tokenizer=None) -> list[dict]:
    """Prompts-table rows (prompt_id, task, split, prompt, answer, metadata) of a bundled dataset."""
    rows, counts = [], {}
    for split, record in dataset_records(name):
        index = counts[split] = counts.get(split, -1) + 1
        prompt, chat = format_prompt(record["problem"], tokenizer)
        metadata = {"source_id": record["id"], "chat_template": chat}
        metadata.update({k: record[k] for k in KEPT_FIELDS if k in record})
        rows.append({
            "prompt_id": f"{name}-{split}-{index:05d}", "task": name, "split": split,
            "prompt": prompt, "answer": str(record["answer"]), "metadata": json.dumps(metadata),
        })
    return rows
