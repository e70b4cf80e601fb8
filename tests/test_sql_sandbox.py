"""`roll sql` runs one read-only query and cannot write, nor read outside the run (issue 12).

Each escape goes through the real command line: it must exit 2 with one `roll: error:` line, print nothing
on stdout (so no line of /etc/passwd), leave the committed shard's bytes alone and write nothing anywhere in
the run or the directory that holds it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from roll.store import Run, Shard

from conftest import roll_cli

PASSWD = [line for line in Path("/etc/passwd").read_text().splitlines() if line.strip()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash ("dir" for directories): any write, new file,
    deletion or replacement changes it."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else sha256(p) for p in sorted(root.rglob("*"))}


@pytest.fixture
def run_with_shard(run_dir):
    """A run with one committed rollouts shard (version 0, 2 prompts x 2 samples), plus bait around it:
    a directory for PRAGMA import_database whose schema.sql writes files, inside and outside the run; a
    Parquet file beside the run; and a sibling directory whose name starts with the run's."""
    from roll.stages.generate import GenerateConfig, run as generate

    generate(GenerateConfig(run=run_dir, prompts=2, group_size=2, max_new_tokens=8))
    run = Run(run_dir)
    shard = run.shard_path("rollouts", 0, Shard(0, 1))
    assert shard.is_file()
    parent = run.root.parent
    for bait in (parent / "evil", run.root / "evil"):
        bait.mkdir()
        (bait / "schema.sql").write_text(
            f"COPY (SELECT 'pwned' AS a) TO '{parent / 'pwned.csv'}' (FORMAT csv);\n"
            f"COPY (SELECT 'pwned' AS a) TO '{run.root / 'pwned.csv'}' (FORMAT csv);\n"
            f"COPY (SELECT 'pwned' AS a) TO '{shard}' (FORMAT csv);\n")
        (bait / "load.sql").write_text("")
    (parent / "outside.parquet").write_bytes(shard.read_bytes())
    sibling = Path(str(run.root) + "2")
    sibling.mkdir()
    (sibling / "secret.txt").write_text("secret-outside-the-run\n")
    return run, shard


def escapes(run: Path, shard: Path) -> dict[str, str]:
    parent = run.parent
    return {
        "explain analyze copy over a shard":
            f"EXPLAIN ANALYZE COPY (SELECT 'x' AS a) TO '{shard}' (FORMAT csv)",
        "explain analyze copy partition_by overwrite":
            f"EXPLAIN ANALYZE COPY (SELECT 'x' AS a, 1 AS b) TO '{run / 'rollouts'}' "
            f"(FORMAT parquet, PARTITION_BY (a), OVERWRITE true)",
        "copy partition_by overwrite":
            f"COPY (SELECT 'x' AS a, 1 AS b) TO '{run / 'rollouts'}' (FORMAT parquet, PARTITION_BY (a), OVERWRITE true)",
        "copy over a shard": f"COPY (SELECT 'x' AS a) TO '{shard}' (FORMAT csv)",
        "pragma import_database outside": f"PRAGMA import_database('{parent / 'evil'}')",
        "pragma import_database inside": f"PRAGMA import_database('{run / 'evil'}')",
        "explain": "EXPLAIN SELECT count(*) FROM rollouts",
        "read_text": "SELECT * FROM read_text('/etc/passwd')",
        "glob": "SELECT * FROM glob('/etc/*')",
        "read_csv": "SELECT * FROM read_csv('/etc/passwd')",
        "read_text with ..": f"SELECT * FROM read_text('{run}/../../../../../../etc/passwd')",
        "glob of the parent": f"SELECT * FROM glob('{run}/../*')",
        "read_parquet beside the run": f"SELECT count(*) FROM read_parquet('{parent / 'outside.parquet'}')",
        "sibling with the run's name as prefix": f"SELECT * FROM read_text('{run}2/secret.txt')",
        "attach": f"ATTACH '{parent / 'x.db'}' AS x",
        "install httpfs": "INSTALL httpfs",
        "load httpfs": "LOAD httpfs",
        "call": "CALL pragma_version()",
        "set": "SET enable_external_access = true",
        "multi-statement": "SELECT 1; SELECT 2",
        "set smuggled after a select": "SELECT 1; SET enable_external_access = true",
    }


NAMES = list(escapes(Path("/r"), Path("/r/s")))


@pytest.mark.parametrize("name", NAMES)
def test_escape_is_refused_and_changes_nothing(run_with_shard, name):
    run, shard = run_with_shard
    sql = escapes(run.root, shard)[name]
    before_shard, before = sha256(shard), snapshot(run.root.parent)

    proc = roll_cli("sql", sql, "--format", "csv", "--run", run.root, check=False)

    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("roll: error: "), proc.stderr
    assert proc.stdout == ""
    assert not any(line in proc.stdout for line in PASSWD)
    assert shard.is_file() and sha256(shard) == before_shard
    assert snapshot(run.root.parent) == before


def test_statement_types_are_named_in_the_error(run_with_shard):
    run, shard = run_with_shard
    for sql, fragment in (("EXPLAIN SELECT 1", "EXPLAIN statements are not allowed"),
                          ("PRAGMA show_tables", "PRAGMA statements are not allowed"),
                          (f"COPY rollouts TO '{run.root / 'x.csv'}'", "COPY statements are not allowed"),
                          ("SELECT 1; SELECT 2", "one read-only query")):
        proc = roll_cli("sql", sql, "--run", run.root, check=False)
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr


def test_plain_reads_still_work(run_with_shard):
    run, shard = run_with_shard
    before = snapshot(run.root.parent)

    def csv(sql):
        return roll_cli("sql", sql, "--format", "csv", "--run", run.root).stdout

    assert csv("select count(*) as n from rollouts") == "n\n4\n"
    assert csv("select count(*) as n from samples s join prompts p using (prompt_id)") == "n\n4\n"
    assert csv("with r as (select * from rollouts) select count(*) as n from r") == "n\n4\n"
    assert csv("from rollouts select count(*) as n") == "n\n4\n"
    assert csv(f"select count(*) as n from read_parquet('{run.root}/rollouts/*/*.parquet')") == "n\n4\n"
    assert csv(f"select count(*) as n from glob('{run.root}/rollouts/*/*.parquet')") == "n\n1\n"
    described = csv("DESCRIBE rollouts").splitlines()
    assert described[0].startswith("column_name,") and any(line.startswith("policy_version,") for line in described)
    summarized = csv("SUMMARIZE rollouts").splitlines()
    assert any(line.startswith("num_tokens,") for line in summarized)
    assert snapshot(run.root.parent) == before


def test_the_stages_connection_is_sandboxed_and_named_queries_work(run_with_shard):
    import duckdb

    from roll.store import named_query, named_query_arrow

    run, shard = run_with_shard
    con = run.connect()
    assert con.execute("select count(*) from rollouts").fetchone() == (4,)
    for sql in ("select * from read_text('/etc/passwd')", "set enable_external_access = true",
                "set lock_configuration = false", f"select * from read_text('{run.root}2/secret.txt')"):
        with pytest.raises(duckdb.Error):
            con.execute(sql)
    window = named_query_arrow(run, "window_samples", range(0, 1), lo=0, hi=0)
    assert window.num_rows == 4
    assert named_query(run, "optimizer_steps_between", lo=0, hi=5) == [{"steps": 0}]
