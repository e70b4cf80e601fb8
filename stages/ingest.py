"""import: rollouts generated elsewhere become one version's rollouts (and verdicts, where rewards are given).

A row of the file (JSONL, one object per line, or Parquet, one row per row) holds:

    prompt_id | prompt        which prompt of the run (`prompt` matches the prompts table's text exactly)
    token_ids | completion    the completion as token ids (its stop token last, as roll writes them) or as
                              text, encoded with the run's tokenizer: text that does not decode back to itself
                              is refused, and a finished text completion gets the model's first stop token
    behaviour_logprobs        optional: log π_b of each token (the stop token's included)
    reward, correct           optional: the reward (all rows or none), and whether it counts as correct
                              [default: reward > 0]
    sample_index              optional: [default: 0, 1, 2 … per prompt in file order]
    policy_version            optional: must equal --version [default: --version is the rows' version]
    finish_reason             optional: stop | length [default: stop when the last token is a stop token]
    temperature, top_p, max_new_tokens    optional: the sampler's settings [default: 1, 1, the length]

Every row is checked before anything is written; a bad row is one line naming the file, the line (JSONL,
from 1) or row (Parquet, from 0) and the column. The rows are committed as version V's rollouts in one file,
then their verdicts where rewards are given; a version that already holds rollouts is refused (nothing is
mixed), and the same import run again changes nothing. `model_version` records which of this run's
checkpoints sampled the rows (--model-version; null: sampled elsewhere) and `source` the file, its digest and
the row, so `roll sql` tells imported rows apart. Rows without behaviour log-probs are scored against a
checkpoint the user names (`roll score --behaviour-checkpoint M`).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import TOKENS_MAX, version_option
from roll.store import Run, Shard

COLUMNS = ("prompt_id", "prompt", "token_ids", "completion", "behaviour_logprobs", "reward", "correct",
           "sample_index", "policy_version", "finish_reason", "temperature", "top_p", "max_new_tokens")
# float32 log-softmax rounds the likeliest token's log-prob a few 1e-7 either side of 0; more is not a log-prob
LOGPROB_ROUNDING = 1e-5


@dataclass(frozen=True)
class ImportConfig:
    file: Path  # the JSONL or Parquet file to import
    run: Path  # an existing run directory
    version: int | None = version_option("The version whose rollouts the rows become (it must exist). [default: the "
                                         "rows' policy_version, else 0]")
    model_version: int | None = version_option("The version of this run whose checkpoint sampled the rows. "
                                               "[default: none, sampled elsewhere]")


class RowError(Exception):
    """What is wrong with one row (the caller adds the file and the row)."""


def run(config: ImportConfig) -> dict:
    """Check every row, then commit version V's rollouts (and verdicts); returns rows, version and seconds."""
    import pyarrow as pa

    from roll.rollouts import prompt_tokens, rollout_table
    from roll.store import SCHEMAS

    started = time.perf_counter()
    run_dir = Run(config.run)
    records, where, digest = read_records(config.file)
    version = config.version if config.version is not None else file_version(records, where, config.file)
    run_dir.require_policy(version)  # rows are a version's data only once that version exists
    if config.model_version is not None:
        run_dir.require_policy(config.model_version)
    encoder = Encoder(run_dir)
    prompts = run_dir.read_prompts()
    by_text = {}
    for pid, text in zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()):
        by_text.setdefault(text, []).append(pid)
    known = set(prompts.column("prompt_id").to_pylist())
    rows, verdicts, seen, next_index = [], [], {}, {}
    first = records[0] if records else {}
    for n, record in enumerate(records):
        try:
            check_alike(record, first)
            row, verdict = parse_row(record, version, known, by_text, encoder, next_index)
        except RowError as exc:
            raise RollError(f"{config.file}: {where(n)}: {exc}") from None
        key = (row["prompt_id"], row["sample_index"])
        if key in seen:
            raise RollError(f"{config.file}: {where(n)}: prompt_id '{key[0]}' sample {key[1]} repeats "
                            f"{where(seen[key])}")
        seen[key] = n
        row.update(policy_version=version, model_version=config.model_version, generation_id="",
                   source=f"import {config.file.name} sha256:{digest} {where(n)}")
        rows.append(row)
        verdicts.append(verdict)
    if not rows:
        raise RollError(f"{config.file}: no rows to import")
    tokens = dict(zip(sorted({r["prompt_id"] for r in rows}),
                      prompt_tokens(prompts, encoder.tokenizer, sorted({r["prompt_id"] for r in rows}))))
    for row in rows:
        row["prompt_token_ids"] = tokens[row["prompt_id"]]
    name = run_dir.shard_path("rollouts", version, Shard(0, 1)).name
    committed = run_dir.commit_shard("rollouts", version, name, rollout_table(rows), replace=False)
    summary = {"run": str(run_dir.root), "version": version, "rows": len(rows), "file": str(committed),
               "verdicts": None}
    if verdicts[0] is not None:
        generation = run_dir.generation_of("rollouts", version, name)
        table = pa.table({
            "policy_version": [version] * len(rows), "prompt_id": [r["prompt_id"] for r in rows],
            "sample_index": [r["sample_index"] for r in rows], "reward": [v[0] for v in verdicts],
            "correct": [v[1] for v in verdicts], "extracted_answer": [""] * len(rows), "format_ok": [True] * len(rows),
            "verifier": ["import"] * len(rows), "milliseconds": [0.0] * len(rows), "error": [""] * len(rows),
            "generation_id": [generation] * len(rows),
            # the reward came with the row: one term, recorded as verify records its terms
            "reward_terms": [json.dumps([{"reward": "import", "weight": 1.0, "value": v[0]}]) for v in verdicts],
        }, schema=SCHEMAS["verdicts"])
        summary["verdicts"] = str(run_dir.commit_shard("verdicts", version, name, table, replace=False))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def read_records(path: Path):
    """(rows as dicts, row number → 'line N' / 'row N', the file's sha256 prefix); one line for an unreadable
    file or a line that is not a JSON object."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RollError(f"{path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()[:16]
    if path.suffix == ".parquet":
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(io.BytesIO(data)).to_pylist()
        except (pa.ArrowInvalid, OSError) as exc:
            raise RollError(f"{path}: not a readable Parquet file ({exc})") from None
        return records, lambda n: f"row {n}", digest
    if path.suffix not in (".jsonl", ".json"):
        raise RollError(f"{path}: expected a .jsonl or .parquet file")
    records, lines = [], []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RollError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RollError(f"{path}: line {number}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise RollError(f"{path}: line {number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        lines.append(number)
    return records, lambda n: f"line {lines[n]}", digest


def file_version(records: list[dict], where, path: Path) -> int:
    """The rows' own policy_version when they carry one (all the same), else 0."""
    versions = {r.get("policy_version") for r in records}
    if versions == {None} or not records:
        return 0
    if len(versions) > 1:
        n = next(n for n, r in enumerate(records) if r.get("policy_version") != records[0].get("policy_version"))
        raise RollError(f"{path}: {where(n)}: policy_version {records[n].get('policy_version')!r} differs from the first "
                        f"row's {records[0].get('policy_version')!r}; import one version at a time (--version)")
    try:
        return integer(versions.pop(), "policy_version")
    except RowError as exc:
        raise RollError(f"{path}: {where(0)}: {exc}") from None


def check_alike(record: dict, first: dict) -> None:
    """Columns that are all-or-none: a reward, a sample index."""
    unknown = sorted(set(record) - set(COLUMNS))
    if unknown:
        raise RowError(f"unknown column '{unknown[0]}' (columns: {', '.join(COLUMNS)})")
    for column in ("reward", "sample_index"):
        if (record.get(column) is None) != (first.get(column) is None):
            raise RowError(f"column '{column}' is given in some rows and not in others: give it in all or none")


def parse_row(record: dict, version: int, known: set, by_text: dict, encoder: "Encoder", next_index: dict):
    """(rollout row without its version fields, (reward, correct) or None) of one record, or RowError."""
    prompt_id = prompt_of(record, known, by_text)
    if record.get("policy_version") is not None and integer(record["policy_version"], "policy_version") != version:
        raise RowError(f"column 'policy_version': {record['policy_version']} is not --version {version}")
    token_ids, completion = encoder.completion(record)
    logprobs = record.get("behaviour_logprobs")
    if logprobs is not None:
        logprobs = [number(v, "behaviour_logprobs") for v in listed(logprobs, "behaviour_logprobs")]
        if len(logprobs) != len(token_ids):
            raise RowError(f"column 'behaviour_logprobs': {len(logprobs)} values for {len(token_ids)} tokens")
        bad = next((v for v in logprobs if not v <= LOGPROB_ROUNDING), None)
        if bad is not None:
            raise RowError(f"column 'behaviour_logprobs': {bad} is not a log-probability (<= 0)")
    finish = record.get("finish_reason")
    stopped = bool(token_ids) and token_ids[-1] in encoder.stops
    if finish is None:
        finish = "stop" if stopped else "length"
    elif finish not in ("stop", "length"):
        raise RowError(f"column 'finish_reason': {finish!r} is not 'stop' or 'length'")
    elif finish == "stop" and not stopped:
        raise RowError(f"column 'finish_reason': 'stop', but the last token is not a stop token {encoder.stops}")
    temperature = number(record.get("temperature", 1.0), "temperature")
    top_p = number(record.get("top_p", 1.0), "top_p")
    if not 0 <= temperature <= 1000:
        raise RowError(f"column 'temperature': {record['temperature']!r} is outside 0..1000")
    if not 0 < top_p <= 1:
        raise RowError(f"column 'top_p': {record['top_p']!r} is outside (0, 1]")
    max_new = integer(record.get("max_new_tokens", len(token_ids)), "max_new_tokens")
    if max_new < len(token_ids):
        raise RowError(f"column 'max_new_tokens': {max_new} is shorter than the completion's {len(token_ids)} tokens")
    if record.get("sample_index") is not None:
        sample_index = integer(record["sample_index"], "sample_index")
    else:
        sample_index = next_index.get(prompt_id, 0)
    next_index[prompt_id] = max(next_index.get(prompt_id, 0), sample_index + 1)
    verdict = None
    if record.get("reward") is not None:
        reward = number(record["reward"], "reward")
        correct = record.get("correct", reward > 0)
        if not isinstance(correct, bool):
            raise RowError(f"column 'correct': {correct!r} is not true or false")
        verdict = (reward, correct)
    elif record.get("correct") is not None:
        raise RowError("column 'correct' without a 'reward'")
    row = {"prompt_id": prompt_id, "sample_index": sample_index, "completion": completion, "token_ids": token_ids,
           "behaviour_logprobs": logprobs, "num_tokens": len(token_ids), "finish_reason": finish,
           "stop_token_id": token_ids[-1] if finish == "stop" else None, "max_new_tokens": max_new,
           "temperature": temperature, "top_p": top_p, "seed": None, "backend": "import"}
    return row, verdict


def prompt_of(record: dict, known: set, by_text: dict) -> str:
    if record.get("prompt_id") is not None:
        if not isinstance(record["prompt_id"], str):
            raise RowError(f"column 'prompt_id': {record['prompt_id']!r} is not a string")
        if record["prompt_id"] not in known:
            raise RowError(f"column 'prompt_id': '{record['prompt_id']}' is not in the run's prompts")
        return record["prompt_id"]
    if record.get("prompt") is None:
        raise RowError("no 'prompt_id' or 'prompt' column")
    matches = by_text.get(record["prompt"]) if isinstance(record["prompt"], str) else None
    if not matches:
        raise RowError("column 'prompt': the text is not a prompt of the run (it must match the prompts table exactly)")
    if len(matches) > 1:
        raise RowError(f"column 'prompt': the text is {len(matches)} prompts of the run; give 'prompt_id'")
    return matches[0]


class Encoder:
    """The run's tokenizer, vocabulary size and stop tokens (version 0's checkpoint: every version shares them)."""

    def __init__(self, run_dir: Run):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from roll.policy import quiet_transformers
        from roll.sampling import stop_token_ids

        path = run_dir.require_policy(0)
        quiet_transformers()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        config = AutoConfig.from_pretrained(str(path))
        self.vocab = getattr(config, "vocab_size", None) or len(self.tokenizer)
        try:
            generation = GenerationConfig.from_pretrained(str(path))
        except OSError:  # a checkpoint without generation_config.json stops on the tokenizer's eos alone
            generation = None
        self.stops = stop_token_ids(generation, self.tokenizer)

    def completion(self, record: dict) -> tuple[list[int], str]:
        """(token ids, text) of the record's completion; RowError for ids outside the vocabulary, text that does
        not round-trip, or ids and text that disagree."""
        from roll.sampling import Sample, completion_text

        text = record.get("completion")
        if text is not None and not isinstance(text, str):
            raise RowError(f"column 'completion': {type(text).__name__}, expected text")
        if record.get("token_ids") is not None:
            ids = [integer(t, "token_ids") for t in listed(record["token_ids"], "token_ids")]
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise RowError(f"column 'token_ids': {bad} is outside the vocabulary (0..{self.vocab - 1})")
        elif text is not None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
            if decoded != text:
                raise RowError(f"column 'completion': the text does not round-trip through the run's tokenizer "
                               f"(it decodes to {decoded[:60]!r})")
            if record.get("finish_reason", "stop") == "stop":
                ids.append(self.stops[0])
        else:
            raise RowError("no 'token_ids' or 'completion' column")
        if not ids:
            raise RowError("an empty completion (no tokens)")
        if len(ids) > TOKENS_MAX:
            raise RowError(f"a completion of {len(ids)} tokens (at most {TOKENS_MAX})")
        stop = ids[-1] if ids[-1] in self.stops else None
        decoded = completion_text(self.tokenizer, Sample(ids, [], "stop" if stop is not None else "length", stop))
        if text is not None and decoded != text:
            raise RowError(f"column 'completion' disagrees with 'token_ids' (they decode to {decoded[:60]!r})")
        return ids, decoded


def listed(value, column: str) -> list:
    if not isinstance(value, list):
        raise RowError(f"column '{column}': {type(value).__name__}, expected a list")
    return value


def integer(value, column: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RowError(f"column '{column}': {value!r} is not a whole number >= 0")
    return value


def number(value, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(f"column '{column}': {value!r} is not a finite number")
    return float(value)
