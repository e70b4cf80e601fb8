"""roll import: rollouts made elsewhere become a version's rollouts — checked row by row, committed whole or not
at all — and train exactly as the run's own would."""
from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

from conftest import fixed_data_run, roll_cli
from roll.store import Run, Shard, read_table
from roll.store.sql import query

TRAIN = ("--mini-batch", "24", "--micro-batch", "24", "--seed", "3")
EXPORT = ("select prompt_id, sample_index, token_ids, completion, behaviour_logprobs, reward, temperature, top_p, "
          "max_new_tokens from samples where policy_version = 0 order by prompt_id, sample_index")


def tree(path):
    """Every file under `path` with its size: what a refused import must leave as it was."""
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())


def export(run, query=EXPORT) -> list[dict]:
    out = roll_cli("sql", "--run", run, "--format", "jsonl", query).stdout
    return [json.loads(line) for line in out.splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_exported_rollouts_imported_into_a_fresh_run_train_to_the_same_version(run_dir, tiny_model_dir, tmp_path):
    """Weights within 1e-6 — in fact equal: the JSONL holds every float32 exactly (the shortest repr of its
    double), the tokens are the same ids, and both updates score them against the same version-0 checkpoint
    with the same seed. Dropping the log-probs and naming the checkpoint to `roll score` gives the same π_b
    (trainer log-probs are always recomputed from a checkpoint), so the same weights again."""
    from roll.runs import InitConfig, init_run

    fixed_data_run(run_dir)
    roll_cli("train", "--run", run_dir, *TRAIN)
    rows = export(run_dir)
    assert len(rows) == 24 and all(len(r["behaviour_logprobs"]) == len(r["token_ids"]) for r in rows)
    original = load_file(Run(run_dir).policy_dir(1) / "model.safetensors")

    with_logprobs, without = tmp_path / "imported", tmp_path / "refilled"
    for path in (with_logprobs, without):
        init_run(InitConfig(run=path, model=str(tiny_model_dir)))
    write_jsonl(tmp_path / "rows.jsonl", rows)
    write_jsonl(tmp_path / "bare.jsonl", [{k: v for k, v in r.items() if k != "behaviour_logprobs"} for r in rows])
    summary = json.loads(roll_cli("import", tmp_path / "rows.jsonl", "--run", with_logprobs, "--model-version", 0).stdout)
    assert summary["rows"] == 24 and summary["verdicts"]
    roll_cli("train", "--run", with_logprobs, *TRAIN)  # its prepare step scores the rows against version 0
    roll_cli("import", tmp_path / "bare.jsonl", "--run", without)
    refused = roll_cli("train", "--run", without, *TRAIN, check=False)  # no log-probs, no model: nothing stands for π_b
    assert refused.returncode == 2 and "--behaviour-checkpoint" in refused.stderr, refused.stderr
    roll_cli("score", "--run", without, "--behaviour-checkpoint", 0)
    roll_cli("train", "--run", without, *TRAIN)
    for path in (with_logprobs, without):
        trained = load_file(Run(path).policy_dir(1) / "model.safetensors")
        assert trained.keys() == original.keys()
        worst = max((trained[k] - original[k]).abs().max().item() for k in original)
        assert worst <= 1e-6, (path.name, worst)

    # provenance: the imported rows say where they came from and which checkpoint stood for π_b
    seen = roll_cli("sql", "--run", without, "--format", "json",
                    "select r.source, r.model_version, r.backend, s.behaviour_checkpoint, s.mismatch_kl "
                    "from rollouts r join scores s using (policy_version, prompt_id, sample_index) order by r.source").stdout
    seen = json.loads(seen)
    assert len(seen) == 24
    assert all(r["source"].startswith("import bare.jsonl sha256:") and r["model_version"] is None
               and r["backend"] == "import" and r["behaviour_checkpoint"] == 0 and r["mismatch_kl"] is None
               for r in seen)
    assert {r["source"].rsplit(" ", 1)[1] for r in seen} == {str(n) for n in range(1, 25)}  # line numbers

    # the same import again changes nothing; another file into the same version is refused
    before = tree(without)
    assert roll_cli("import", tmp_path / "bare.jsonl", "--run", without).returncode == 0
    assert tree(without) == before
    other = roll_cli("import", tmp_path / "rows.jsonl", "--run", without, check=False)
    assert other.returncode == 2 and "already has rollouts" in other.stderr and tree(without) == before


def test_a_text_completion_is_encoded_with_the_runs_tokenizer_and_its_stop_token(run_dir, tmp_path):
    """Text in, the ids roll's own sampler wrote out: the completion's tokens and, for a finished completion,
    the model's stop token (roll writes it last, and the trainer scores it)."""
    fixed_data_run(run_dir)
    own = read_table(Run(run_dir).shard_path("rollouts", 0, Shard(0, 1)), "rollouts").to_pylist()
    finished = [r for r in own if r["finish_reason"] == "stop"][:3]
    assert finished, "the tiny model finished no completion in 16 tokens"
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    for table in ("rollouts", "verdicts", "scores"):
        shutil.rmtree(Run(other).version_dir(table, 0))
    write_jsonl(tmp_path / "text.jsonl", [{"prompt_id": r["prompt_id"], "completion": r["completion"], "reward": 1}
                                          for r in finished])
    roll_cli("import", tmp_path / "text.jsonl", "--run", other)
    imported = read_table(Run(other).shard_path("rollouts", 0, Shard(0, 1)), "rollouts").to_pylist()
    assert [r["token_ids"] for r in imported] == [r["token_ids"] for r in finished]
    assert [r["stop_token_id"] for r in imported] == [r["stop_token_id"] for r in finished]
    assert all(r["behaviour_logprobs"] is None and r["seed"] is None for r in imported)
    verdicts = read_table(Run(other).shard_path("verdicts", 0, Shard(0, 1)), "verdicts")
    assert verdicts.column("reward").to_pylist() == [1.0] * 3 and verdicts.column("correct").to_pylist() == [True] * 3


# (what the bad row holds or lacks, the words the one line must contain). Row 2 is bad; row 1 is good.
GOOD = {"prompt_id": None, "token_ids": [5, 6, 7], "behaviour_logprobs": [-0.5, -1.0, -0.25], "reward": 1.0}
MALFORMED = [
    ({"prompt_id": ...}, "no 'prompt_id' or 'prompt' column"),
    ({"token_ids": ..., "behaviour_logprobs": ...}, "no 'token_ids' or 'completion' column"),
    ({"prompt_id": "no-such-prompt"}, "column 'prompt_id': 'no-such-prompt' is not in the run's prompts"),
    ({"prompt_id": 7}, "column 'prompt_id': 7 is not a string"),
    ({"prompt_id": ..., "prompt": "What is nothing?"}, "column 'prompt': the text is not a prompt of the run"),
    ({"token_ids": "5 6 7"}, "column 'token_ids': str, expected a list"),
    ({"token_ids": [5, 6, 10 ** 6]}, "column 'token_ids': 1000000 is outside the vocabulary"),
    ({"token_ids": [5, -1, 7]}, "column 'token_ids': -1 is not a whole number"),
    ({"token_ids": [5, 6.5, 7]}, "column 'token_ids': 6.5 is not a whole number"),
    ({"token_ids": []}, "an empty completion"),
    ({"behaviour_logprobs": [-0.5, -1.0]}, "column 'behaviour_logprobs': 2 values for 3 tokens"),
    ({"behaviour_logprobs": [-0.5, math.nan, -0.25]}, "column 'behaviour_logprobs': nan is not a finite number"),
    ({"behaviour_logprobs": [-0.5, 0.5, -0.25]}, "column 'behaviour_logprobs': 0.5 is not a log-probability"),
    ({"reward": math.nan}, "column 'reward': nan is not a finite number"),
    ({"reward": "1"}, "column 'reward': '1' is not a finite number"),
    ({"reward": ...}, "column 'reward' is given in some rows and not in others"),
    ({"correct": "yes"}, "column 'correct': 'yes' is not true or false"),
    ({"logprobs": [-1.0]}, "unknown column 'logprobs'"),
    ({"sample_index": 0}, "column 'sample_index' is given in some rows and not in others"),
    ({"finish_reason": "done"}, "column 'finish_reason': 'done' is not 'stop' or 'length'"),
    ({"finish_reason": "stop"}, "column 'finish_reason': 'stop', but the last token is not a stop token"),
    ({"temperature": -1}, "column 'temperature': -1"),
    ({"max_new_tokens": 2}, "column 'max_new_tokens': 2 is shorter than the completion's 3 tokens"),
    ({"completion": "12\u00e9"}, "column 'completion' disagrees with 'token_ids'"),
    ({"policy_version": 3}, "policy_version 3 differs from the first row's None"),
]


def test_each_malformed_row_is_one_line_naming_the_file_row_and_column_and_the_run_is_unchanged(run_dir, tmp_path):
    """The 25 ways above, each as line 2 of a two-line file, and a duplicate row, text that does not round-trip,
    a line that is no JSON object and a Parquet column of the wrong type. The stage is called in-process (the
    command's one line and exit 2 are checked on two of them: the CLI prints any RollError that way)."""
    from roll.errors import RollError
    from roll.stages.ingest import ImportConfig, run as run_import

    prompt = Run(run_dir).read_prompts().column("prompt_id")[0].as_py()
    first = {**GOOD, "prompt_id": prompt}
    before = tree(run_dir)
    cases = []
    for change, words in MALFORMED:
        bad = dict(first)
        for key, value in change.items():
            if value is ...:
                bad.pop(key, None)
            else:
                bad[key] = value
        cases.append(([first, bad], words, "line 2"))
    twice = {**first, "sample_index": 0}
    cases.append(([twice, twice], f"prompt_id '{prompt}' sample 0 repeats line 1", "line 2"))
    cases.append(([{"prompt_id": prompt, "completion": "\u00e9\u00e9"}],
                  "column 'completion': the text does not round-trip through the run's tokenizer", "line 1"))
    for n, (rows, words, where) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad-{n}.jsonl", rows)
        with pytest.raises(RollError) as refused:
            run_import(ImportConfig(file=path, run=run_dir))
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{path}: {where}: ") and words in message, (words, message)
    (tmp_path / "not-json.jsonl").write_text(json.dumps(first) + "\n{oops\n[1, 2]\n")
    proc = roll_cli("import", tmp_path / "not-json.jsonl", "--run", run_dir, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"roll: error: {tmp_path / 'not-json.jsonl'}: line 2: not JSON (Expecting property name enclosed in double "
        f"quotes at column 2)"], proc.stderr
    pq.write_table(pa.table({"prompt_id": [prompt], "token_ids": [["5", "6"]]}), tmp_path / "typed.parquet")
    proc = roll_cli("import", tmp_path / "typed.parquet", "--run", run_dir, check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"roll: error: {tmp_path / 'typed.parquet'}: row 0: column 'token_ids': '5' is not a whole number >= 0"]
    assert tree(run_dir) == before


def test_files_written_before_a_column_was_added_read_with_its_stated_value(run_dir, tmp_path):
    """A rollouts file from before `model_version` and `source` (and scores before `behaviour_checkpoint`) reads
    as roll's own rows of their own version: ADDED_COLUMNS' values, not a refusal."""
    fixed_data_run(run_dir)
    run = Run(run_dir)
    for table, dropped in (("rollouts", ["model_version", "source"]), ("scores", ["behaviour_checkpoint"])):
        path = run.shard_path(table, 0, Shard(0, 1))
        old = pq.read_table(path).drop_columns(dropped)
        pq.write_table(old, path)
    rollouts = read_table(run.shard_path("rollouts", 0, Shard(0, 1)), "rollouts")
    assert set(rollouts.column("source").to_pylist()) == {"generate"}
    assert rollouts.column("model_version").to_pylist() == rollouts.column("policy_version").to_pylist()
    scores = read_table(run.shard_path("scores", 0, Shard(0, 1)), "scores")
    assert scores.column("behaviour_checkpoint").to_pylist() == [0] * scores.num_rows
    with pytest.raises(Exception, match="no column 'policy_version'"):
        from roll.store import check_schema

        check_schema(pq.read_table(run.shard_path("rollouts", 0, Shard(0, 1))).drop_columns(["policy_version"]),
                     "rollouts", "x")


def test_roll_sql_reads_files_from_before_a_column_was_added_as_read_table_does(run_dir):
    """A run made by an earlier roll (rollouts without `model_version` and `source`, scores without
    `behaviour_checkpoint`) beside files of this roll: `roll sql` shows the old rows with ADDED_COLUMNS' values
    (the copied version, 'generate'), the new rows with their own, in one view."""
    fixed_data_run(run_dir)
    run = Run(run_dir)
    path = run.shard_path("rollouts", 0, Shard(0, 1))
    new = pq.read_table(path)
    pq.write_table(new.drop_columns(["model_version", "source"]), path)
    scores = run.shard_path("scores", 0, Shard(0, 1))
    pq.write_table(pq.read_table(scores).drop_columns(["behaviour_checkpoint"]), scores)
    # version 1's rows as this roll writes them, imported-looking, so the two kinds of file differ in value too
    imported = new.set_column(new.schema.get_field_index("policy_version"), "policy_version",
                              pa.array([1] * new.num_rows, pa.int64()))
    imported = imported.set_column(imported.schema.get_field_index("model_version"), "model_version",
                                   pa.array([None] * new.num_rows, pa.int64()))
    imported = imported.set_column(imported.schema.get_field_index("source"), "source",
                                   pa.array(["import x.jsonl"] * new.num_rows, pa.string()))
    run.commit_shard("rollouts", 1, path.name, imported)
    got = query(run, "select policy_version, model_version, source, count(*) from rollouts group by all order by 1")
    assert got.fetchall() == [(0, 0, "generate", new.num_rows), (1, None, "import x.jsonl", new.num_rows)]
    assert query(run, "select distinct behaviour_checkpoint from scores").fetchall() == [(0,)]
