"""Tasks: where prompts and their ground-truth answers come from.

The embedded default, `arith`, is a synthetic multi-step arithmetic task with exact integer answers. A
problem chains 3–5 single-digit operands with + and −; the solved form writes each intermediate result on its
own line, so a short written trace helps a small model far more than guessing the total at once:

    prompt      Q: 12+7-5+3
    completion  12+7=19
                19-5=14
                14+3=17
                answer: 17

The long-chain task, `chain`, walks a state through S steps (`--task chain`, S = 8; `chain:S` for S from 2 to
CHAIN_MAX_STEPS), each one short line that names the step, substitutes the previous state and computes the
next, so a solution runs to about 190 tokens of the embedded character-level tokenizer at S = 8 (the
distribution is in the design doc, §4). States stay integers in 1…99; operands are single digits:

    prompt      Q: chain 7 +5 *3 -8
    completion  s0 = 7
                s1 = s0+5 = 7+5 = 12
                s2 = s1*3 = 12*3 = 36
                s3 = s2-8 = 36-8 = 28
                answer: 28

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


CHAIN = "chain"
CHAIN_STEPS = 8  # the default difficulty: solutions of about 190 tokens (design doc §4)
CHAIN_MAX_STEPS = 24
CHAIN_TRAIN_SIZE = 5000
CHAIN_TEST_SIZE = 500
CHAIN_LIMIT = 99  # every state stays in 1…CHAIN_LIMIT
CHAIN_TOKENS_PER_STEP = 32  # --max-new-tokens of a chain:S run, per step: a step's line is 19–23 tokens


def chain_steps(task: str) -> int | None:
    """S of a task name `chain` or `chain:S`; None for any other task."""
    name, sep, steps = task.partition(":")
    if name != CHAIN:
        return None
    if not sep:
        return CHAIN_STEPS
    if not steps.isdigit() or not 2 <= int(steps) <= CHAIN_MAX_STEPS:
        raise RollError(f"task '{task}': chain:S takes a number of steps S from 2 to {CHAIN_MAX_STEPS}")
    return int(steps)


def chain_problem(rng: random.Random, steps: int) -> tuple[str, str, str]:
    """One chain: (prompt's operation list, worked solution, answer). Each step draws, uniformly, an operation
    among those that keep the state in 1…CHAIN_LIMIT (+d, −d, ×d; d from 1 to 9, from 2 for ×): never 0, which
    would make every later ×d trivial."""
    state = rng.randint(2, 9)
    operations, lines = [str(state)], [f"s0 = {state}"]
    for step in range(1, steps + 1):
        allowed = [op for op in "+-*" if {"+": state + 1 <= CHAIN_LIMIT, "-": state >= 2,
                                          "*": 2 * state <= CHAIN_LIMIT}[op]]
        op = rng.choice(allowed)
        high = {"+": min(9, CHAIN_LIMIT - state), "-": min(9, state - 1), "*": min(9, CHAIN_LIMIT // state)}[op]
        value = rng.randint(2 if op == "*" else 1, high)
        new = {"+": state + value, "-": state - value, "*": state * value}[op]
        operations.append(f"{op}{value}")
        lines.append(f"s{step} = s{step - 1}{op}{value} = {state}{op}{value} = {new}")
        state = new
    return " ".join(operations), "\n".join(lines + [f"answer: {state}"]), str(state)


def chain_rows(seed: int = 0, steps: int = CHAIN_STEPS) -> list[dict]:
    """Seeded train and test splits of `steps`-step chains; no chain appears in both."""
    rng = random.Random(f"chain/{seed}/{steps}")
    seen: set[str] = set()
    rows = []
    for split, size in (("train", CHAIN_TRAIN_SIZE), ("test", CHAIN_TEST_SIZE)):
        count = 0
        while count < size:
            operations, solution, answer = chain_problem(rng, steps)
            if operations in seen:
                continue
            seen.add(operations)
            rows.append({
                "prompt_id": f"chain-{split}-{count:05d}", "task": CHAIN, "split": split,
                "prompt": f"Q: chain {operations}\n", "answer": answer,
                "metadata": json.dumps({"solution": solution, "operations": operations, "steps": steps}),
            })
            count += 1
    return rows


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


TASKS = (ARITH, CHAIN, *DATASETS)  # the built-in tasks, then the bundled real datasets


def build_prompts(task: str, seed: int = 0, tokenizer=None) -> pa.Table:
    """The prompts table for `task` (a built-in name or a path to a JSONL/Parquet file).

    `tokenizer` matters for the bundled datasets and task files: one with a chat template gets their prompts
    wrapped in it (arith's stay plain: its format is a continuation for the embedded model).
    """
    from roll.store import SCHEMAS

    if task == ARITH:
        rows = arith_rows(seed)
    elif chain_steps(task) is not None:
        rows = chain_rows(seed, chain_steps(task))
    elif task in TASKS:
        rows = dataset_rows(task, tokenizer)  # fixed files: the seed has nothing to shuffle
    elif Path(task).suffix in (".jsonl", ".json", ".parquet") and Path(task).is_file():
        rows = _file_rows(Path(task), tokenizer)
    else:
        raise RollError(f"unknown task '{task}' (choose from: {', '.join(TASKS)}, or a .jsonl/.parquet file)")
    return pa.Table.from_pylist(rows, schema=SCHEMAS["prompts"])
