"""Tasks: where prompts and their ground-truth answers come from.

The embedded default, `arith`, is a synthetic multi-step arithmetic task with exact integer answers. A
problem chains 3–5 single-digit operands with + and −; the solved form writes each intermediate result on its
own line, so a short written trace helps a small model far more than guessing the total at once:

    prompt      Q: 12+7-5+3
    completion  12+7=19
                19-5=14
                14+3=17
                answer: 17

A task may also be a JSONL or Parquet file of the user's own with `prompt` (or `problem`) and `answer`
columns; `id`/`prompt_id` is optional. As with the bundled datasets, a checkpoint with a chat template gets each
prompt wrapped in it, as the user's turn (a row marked `"chat_template": true` is taken as wrapped already).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow as pa

from roll.datasets import DATASETS, dataset_rows
from roll.errors import RollError

ARITH = "arith"
ARITH_TRAIN_SIZE = 5000
ARITH_TEST_SIZE = 500
ANSWER_RE = re.compile(r"answer:\s*(-?\d+)\s*$")


def arith_problem(rng: random.Random) -> tuple[str, str, str]:
    """One problem: (expression, solution trace, answer).

    3–5 single-digit operands; a − is drawn only where the running total stays ≥ 0, so every intermediate
    result is a non-negative integer below 46. (Two-digit operands kept the 1.8 M model under 5 % sampled
    pass@1 after 2,000 supervised steps: too slow a warm start for a CPU.)
    """
    operands = [rng.randint(1, 9) for _ in range(rng.choice((3, 4, 5)))]
    total, lines, expression = operands[0], [], str(operands[0])
    for value in operands[1:]:
        op = rng.choice("+-") if total >= value else "+"
        new = total + value if op == "+" else total - value
        lines.append(f"{total}{op}{value}={new}")
        expression += f"{op}{value}"
        total = new
    return expression, "\n".join(lines + [f"answer: {total}"]), str(total)


def arith_prompt(expression: str) -> str:
    return f"Q: {expression}\n"


def arith_rows(seed: int = 0) -> list[dict]:
    """Seeded train and test splits; no expression appears in both."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    for split, size in (("train", ARITH_TRAIN_SIZE), ("test", ARITH_TEST_SIZE)):
        count = 0
        while count < size:
            expression, solution, answer = arith_problem(rng)
            if expression in seen:
                continue
            seen.add(expression)
            rows.append({
                "prompt_id": f"arith-{split}-{count:05d}", "task": ARITH, "split": split,
                "prompt": arith_prompt(expression), "answer": answer,
                "metadata": json.dumps({"solution": solution, "expression": expression}),
            })
            count += 1
    return rows


def extract_arith_answer(completion: str) -> str | None:
    """The integer on the completion's final `answer: N` line, or None."""
    lines = completion.strip().splitlines()
    match = ANSWER_RE.fullmatch(lines[-1].strip()) if lines else None
    return str(int(match.group(1))) if match else None


def _file_rows(path: Path, tokenizer=None) -> list[dict]:
    """Rows of a user's JSONL or Parquet task file, each checked for a prompt and an answer; with a tokenizer
    that has a chat template, each prompt becomes the user's turn in it (metadata "chat_template": true)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any reader failure means the file is unusable
            raise RollError(f"{path}: not a readable Parquet file ({exc})") from None
        where = "row"
    else:
        records = []
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise RollError(f"{path}: line {number} is not valid UTF-8 (byte {exc.start})") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RollError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise RollError(f"{path}: line {number} is not a JSON object")
                records.append(record)
        where = "line"
    if not records:
        raise RollError(f"{path}: holds no prompts")
    rows = []
    for number, record in enumerate(records, 1 if where == "line" else 0):
        prompt = record.get("prompt", record.get("problem"))
        answer = record.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RollError(f"{path}: {where} {number} has no 'prompt' (or 'problem') text")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise RollError(f"{path}: {where} {number} has no 'answer'")
        prompt_id = str(record.get("prompt_id", record.get("id", f"{path.stem}-{number:06d}")))
        split = str(record.get("split", "train"))
        extra = {k: v for k, v in record.items() if k not in ("prompt", "problem", "answer", "id", "prompt_id", "split")}
        if not extra.get("chat_template") and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            try:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 - a template's own error (jinja) is the reason given
                raise RollError(f"{path}: {where} {number}: the model's chat template cannot wrap the prompt "
                                f"({' '.join(str(exc).split())[:200]})") from None
            extra["chat_template"] = True  # it carries its own special tokens: encode_prompts adds none
        rows.append({"prompt_id": prompt_id, "task": path.stem, "split": split, "prompt": prompt,
                     "answer": str(answer), "metadata": json.dumps(extra, default=str)})
    ids = [r["prompt_id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise RollError(f"{path}: prompt ids are not unique")
    return rows


TASKS = (ARITH, *DATASETS)  # the embedded default, then the bundled real datasets


def build_prompts(task: str, seed: int = 0, tokenizer=None) -> pa.Table:
    """The prompts table for `task` (a built-in name or a path to a JSONL/Parquet file).

    `tokenizer` matters for the bundled datasets and task files: one with a chat template gets their prompts
    wrapped in it (arith's stay plain: its format is a continuation for the embedded model).
    """
    from roll.store import SCHEMAS

    if task == ARITH:
        rows = arith_rows(seed)
    elif task in TASKS:
        rows = dataset_rows(task, tokenizer)  # fixed files: the seed has nothing to shuffle
    elif Path(task).suffix in (".jsonl", ".json", ".parquet") and Path(task).is_file():
        rows = _file_rows(Path(task), tokenizer)
    else:
        raise RollError(f"unknown task '{task}' (choose from: {', '.join(TASKS)}, or a .jsonl/.parquet file)")
    return pa.Table.from_pylist(rows, schema=SCHEMAS["prompts"])
