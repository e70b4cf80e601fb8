"""The run store: schemas checked on write and read, atomic commits, DuckDB views, read-only SQL."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from roll.errors import RollError
from roll.store import SCHEMAS, Run, Shard, check_schema, query, read_table, write_table

from conftest import kill_in_commit, wait_for


def rollout_rows(n: int, version: int = 0) -> pa.Table:
    rows = {
        "policy_version": [version] * n, "prompt_id": [f"p{i // 4}" for i in range(n)],
        "sample_index": [i % 4 for i in range(n)], "completion": ["1+1=2\nanswer: 2"] * n,
        "prompt_token_ids": [[1, 5, 6]] * n, "token_ids": [[7, 8, 2]] * n,
        "behaviour_logprobs": [[-0.5, -0.25, -0.125]] * n, "num_tokens": [3] * n,
        "finish_reason": ["stop"] * n, "stop_token_id": [2] * n, "max_new_tokens": [48] * n, "temperature": [1.0] * n, "top_p": [1.0] * n, "seed": [7] * n,
        "backend": ["hf"] * n, "generation_id": ["g0"] * n, "model_version": [version] * n, "source": ["generate"] * n,
    }
    return pa.table(rows, schema=SCHEMAS["rollouts"])


def test_every_table_round_trips(tmp_path):
    for name, schema in SCHEMAS.items():
        path = write_table(tmp_path / f"{name}.parquet", name, schema.empty_table())
        assert read_table(path, name).schema.equals(schema)


def test_missing_column_is_refused_with_file_and_column(tmp_path):
    path = tmp_path / "part-00000-of-00001.parquet"
    pq.write_table(rollout_rows(8).drop(["token_ids"]), path)
    with pytest.raises(RollError) as err:
        read_table(path, "rollouts")
    assert str(path) in str(err.value) and "'token_ids'" in str(err.value)


def test_mistyped_column_is_refused_with_file_column_and_types(tmp_path):
    table = rollout_rows(8)
    table = table.set_column(table.schema.get_field_index("num_tokens"), "num_tokens",
                             pa.array(["3"] * 8, pa.string()))
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(RollError, match=r"bad\.parquet: column 'num_tokens' has type string, expected int64"):
        read_table(path, "rollouts")
    with pytest.raises(RollError, match="num_tokens"):  # and refused on write, before any file exists
        write_table(tmp_path / "never.parquet", "rollouts", table)
    assert not (tmp_path / "never.parquet").exists()


def test_nulls_and_corrupt_files_are_refused(tmp_path):
    table = rollout_rows(4).to_pylist()
    table[2]["completion"] = None
    with pytest.raises(RollError, match="'completion' holds 1 null"):
        check_schema(pa.Table.from_pylist(table), "rollouts", "x.parquet")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(RollError, match="corrupt.parquet: not a readable Parquet file"):
        read_table(corrupt, "rollouts")


def test_shard_parse():
    assert Shard.parse("1/4") == Shard(1, 4)
    for bad in ("3/2", "2/2", "0/0", "a/b", "1"):
        with pytest.raises(RollError, match="--shard"):
            Shard.parse(bad)


def test_views_and_read_only_sql(tmp_path):
    run = Run(tmp_path)
    write_table(run.shard_path("rollouts", 0, Shard(0, 2)), "rollouts", rollout_rows(8, 0))
    write_table(run.shard_path("rollouts", 0, Shard(1, 2)), "rollouts", rollout_rows(4, 0))
    write_table(run.shard_path("rollouts", 3, Shard(0, 1)), "rollouts", rollout_rows(4, 3))
    rows = query(run, "select policy_version, count(*), sum(num_tokens) from rollouts group by 1 order by 1").fetchall()
    assert rows == [(0, 12, 36), (3, 4, 12)]
    # tables with no files yet are empty views with the right columns; samples joins what exists
    assert query(run, "select count(*) from verdicts").fetchall() == [(0,)]
    assert query(run, "select count(*), count(reward) from samples").fetchall() == [(16, 0)]
    assert run.complete_shard_count("rollouts", 0) == 2
    for statement in (f"copy (select 1) to '{tmp_path}/x.csv'", "create table t as select 1", "drop view rollouts"):
        with pytest.raises(RollError, match="read-only"):
            query(run, statement)
    assert not (tmp_path / "x.csv").exists()


def test_sql_over_hand_written_shards_with_other_columns(tmp_path, capsys):
    """Views match files by column name: a shard written outside roll (a custom job's) with its columns in
    another order and one more is read, unioned by name; one without a column is left out with one line
    (issue 22: before, it was read with the column as NULL)."""
    from roll.store import referenced_tables

    run = Run(tmp_path)
    write_table(run.shard_path("rollouts", 0, Shard(0, 1)), "rollouts", rollout_rows(4, 0))
    extra = rollout_rows(4, 1).append_column("note", pa.array(["x"] * 4))
    path = run.shard_path("rollouts", 1, Shard(0, 1))
    path.parent.mkdir(parents=True)
    pq.write_table(extra.select(list(reversed(extra.column_names))), path)
    lacking = run.shard_path("rollouts", 2, Shard(0, 1))
    lacking.parent.mkdir(parents=True)
    pq.write_table(rollout_rows(4, 2).drop(["seed"]), lacking)
    assert query(run, "select policy_version, count(*), count(seed), sum(num_tokens) from rollouts group by 1 order by 1").fetchall() == [
        (0, 4, 4, 12), (1, 4, 4, 12)]
    assert capsys.readouterr().err.splitlines() == [
        f"roll: warning: {lacking}: rollouts table has no column 'seed' (expected int64); left out"]
    assert referenced_tables("SELECT count(*) FROM Samples s JOIN steps USING (policy_version)") == {"samples", "steps"}
    with pytest.raises(RollError, match="SQL: .*nonexistent"):
        query(run, "select nonexistent from rollouts")


WRITER = textwrap.dedent("""
    import sys, pyarrow as pa
    from roll.store import SCHEMAS, Run, Shard, write_table
    n = 3_000_000
    # a large table with many row groups, so the write takes long enough to be killed inside it
    table = pa.table({
        "policy_version": pa.array([0] * n, pa.int64()), "prompt_id": pa.array([str(i) for i in range(n)]),
        "sample_index": pa.array(range(n), pa.int64()), "completion": pa.array(["x" * 20] * n),
        "prompt_token_ids": pa.array([[1, 2]] * n, pa.list_(pa.int32())),
        "token_ids": pa.array([[3, 4, 5]] * n, pa.list_(pa.int32())),
        "behaviour_logprobs": pa.array([[-1.0, -2.0, -3.0]] * n, pa.list_(pa.float32())),
        "num_tokens": pa.array([3] * n, pa.int64()), "finish_reason": pa.array(["stop"] * n), "stop_token_id": pa.array([2] * n, pa.int64()), "max_new_tokens": pa.array([48] * n, pa.int64()),
        "temperature": pa.array([1.0] * n), "top_p": pa.array([1.0] * n), "seed": pa.array([1] * n, pa.int64()),
        "backend": pa.array(["hf"] * n), "generation_id": pa.array(["g0"] * n),
        "model_version": pa.array([0] * n, pa.int64()), "source": pa.array(["generate"] * n)}, schema=SCHEMAS["rollouts"])
    print("ready", flush=True)
    write_table(Run(sys.argv[1]).shard_path("rollouts", 0, Shard(0, 1)), "rollouts", table)
    print("done", flush=True)
""")


def sigkill_once_writing(script: str, argument: Path, directory: Path, pattern: str) -> None:
    """Run `script argument` and SIGKILL it as soon as `directory` holds a path matching `pattern`."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(argument)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    wait_for(lambda: list(directory.glob(pattern)) or proc.poll() is not None, timeout=60,
             what=f"{pattern} in {directory}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_writer_killed_mid_write_leaves_no_visible_shard(tmp_path):
    run = Run(tmp_path / "run")
    directory = run.version_dir("rollouts", 0)
    sigkill_once_writing(WRITER, run.root, directory, ".*.tmp")
    assert list(directory.glob(".*.tmp")), "the writer was killed before it started writing"
    assert run.shards("rollouts", 0) == {}
    assert query(run, "select count(*) from rollouts").fetchall() == [(0,)]
    # a rerun completes and cleans up the dead writer's temporary file
    rerun = subprocess.run([sys.executable, "-c", WRITER, str(run.root)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert query(run, "select count(*) from rollouts").fetchall() == [(3_000_000,)]
    assert not list(directory.glob(".*.tmp"))


COMMITTER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from roll.policy import build_default_model, build_default_tokenizer, save_policy
    tokenizer = build_default_tokenizer()
    save_policy(build_default_model(tokenizer, seed=0), tokenizer, Path(sys.argv[1]) / "v0001", {"policy_version": 1})
""")


def test_checkpoint_committer_killed_before_its_rename_leaves_nothing_behind_after_a_rerun(tmp_path):
    """Killed with every file written beside v0001 and the rename not done (a half-written temporary is
    cleared the same way: `clear_stale_temporaries` goes by its owner's pid, not by what it holds)."""
    policies = tmp_path / "policies"
    kill_in_commit(COMMITTER, policies)
    temporaries = list(policies.glob(".v0001.*.tmp"))
    assert len(temporaries) == 1 and (temporaries[0] / "policy.json").exists()  # every file written, not renamed
    assert not (policies / "v0001").exists()
    rerun = subprocess.run([sys.executable, "-c", COMMITTER, str(policies)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    # the dead committer's half-written directory (another pid's name) is gone, the new one is whole
    assert sorted(p.name for p in policies.iterdir()) == ["v0001"]
    assert {p.name for p in (policies / "v0001").iterdir()} >= {"model.safetensors", "config.json", "policy.json"}
