"""SQL over a run: the sandboxed DuckDB connection with a view per table, `roll sql`'s read-only queries
(stoppable, time- and memory-limited), and the named queries the stages run."""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from roll.errors import RollError
from roll.store.commit import file_columns
from roll.store.schemas import ADDED_COLUMNS, SAMPLES_TABLES, SCHEMAS, SHARDED_TABLES, CopyOf, empty_table

if TYPE_CHECKING:  # for annotations only: Run.connect calls back into this module
    from roll.store.run import Run

def connect(run: Run, versions: range | None = None, tables: set[str] | None = None, mismatched: str = "refuse",
            memory_limit: str | None = None):
    """An in-memory DuckDB connection with a view per table (and `samples`, their join).

    Views read the committed Parquet files directly, so a query sees every shard committed before it
    started and never a temporary file (hidden names that end in .tmp, which no view lists). With
    `versions`, the rollouts, verdicts and scores views list only those versions' files, so a lag
    window costs the same whatever the length of the history behind it. With `tables`, only those
    views are made: creating a view reads the footer of every file it lists, which over 100 versions
    of history was slower than the query itself. Every listed file has passed `check_file` (a file
    whose content disagrees with its place is refused, or with mismatched="skip" left out with a line
    on stderr); files with the same columns are read together, and only files whose columns differ (an earlier
    roll's, lacking an added column; a file with extra columns) are read apart and stacked by name, each with
    its missing ADDED_COLUMNS filled as `read_table` fills them. `memory_limit` sets
    DuckDB's own cap (e.g. '4GB') before the configuration is locked.

    The connection is sandboxed before any view exists, with DuckDB's own settings (checked on DuckDB
    2.0.1), because it also runs user SQL (`roll sql`): file access outside the run root is refused
    (`enable_external_access = false` with `allowed_directories` = the run root, so read_text, glob,
    read_csv, COPY, ATTACH, PRAGMA import_database and INSTALL/LOAD all fail on any other path), no
    extension is installed or loaded on demand, and `lock_configuration` stops a query from SETting any
    of that back. DuckDB also allows its spill directory, by default `.tmp` under the working directory;
    a fresh private path under the system temp directory (made only if a query spills, removed on close)
    keeps the user's files out of reach. Writes inside the run are stopped by `query`, which admits
    one SELECT only.
    """
    import duckdb

    con = duckdb.connect(":memory:")
    spill = Path(tempfile.gettempdir()) / f"roll-duckdb-{os.getpid()}-{os.urandom(8).hex()}"
    if memory_limit is not None:
        try:
            con.execute(f"SET memory_limit = {_sql_str(memory_limit)}")
        except duckdb.Error as exc:
            raise RollError(f"--memory-limit {memory_limit}: {str(exc).splitlines()[0]}") from None
    for setting in (f"SET temp_directory = {_sql_str(str(spill))}",
                    f"SET allowed_directories = [{_sql_str(str(run.root) + os.sep)}]",
                    "SET enable_external_access = false",
                    "SET autoinstall_known_extensions = false",
                    "SET autoload_known_extensions = false",
                    "SET lock_configuration = true"):
        con.execute(setting)
    tables = set(SCHEMAS) | {"samples"} if tables is None else set(tables)
    wanted = tables | (SAMPLES_TABLES if "samples" in tables else set())
    for table in (t for t in SCHEMAS if t in wanted):
        files = run.committed_files(table, versions if table in SHARDED_TABLES else None, mismatched)
        if files:
            by_columns: dict[tuple[str, ...], list] = {}
            for f in files:
                by_columns.setdefault(file_columns(f), []).append(f)
            # one read per set of columns, each with the added columns its files lack filled as read_table fills
            # them (ADDED_COLUMNS), then stacked by name
            reads = [f"SELECT *{_absent_columns(table, columns)} FROM read_parquet("
                     f"[{', '.join(_sql_str(str(f)) for f in group)}], hive_partitioning=false)"
                     for columns, group in by_columns.items()]
            con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(reads))
        else:  # a view over an empty Arrow table: the catalog lists the view alone
            con.from_arrow(empty_table(table)).create_view(table)
    if "samples" in wanted:
        con.execute(  # joined on the generation too: verdicts of replaced rollouts never match
            "CREATE VIEW samples AS SELECT * FROM rollouts "
            "LEFT JOIN verdicts USING (policy_version, prompt_id, sample_index, generation_id) "
            "LEFT JOIN scores USING (policy_version, prompt_id, sample_index, generation_id)"
        )
    return con


# DuckDB's names of the types an added column (ADDED_COLUMNS) may have
DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN"}


def _absent_columns(table: str, columns: tuple[str, ...]) -> str:
    """`, CAST(value AS type) AS name` for each added column (ADDED_COLUMNS) that files with these `columns`
    lack: the constant, NULL, or the column it copies, so that an earlier roll's files read as `read_table`
    reads them."""
    fills = []
    for name, value in ADDED_COLUMNS.get(table, {}).items():
        if name in columns:
            continue
        if isinstance(value, CopyOf):
            expression = '"' + value.column.replace('"', '""') + '"'
        else:
            expression = "NULL" if value is None else _sql_str(value) if isinstance(value, str) else repr(value)
        fills.append(f", CAST({expression} AS {DUCKDB_TYPES[SCHEMAS[table].field(name).type]}) AS {name}")
    return "".join(fills)


def referenced_tables(sql: str) -> set[str]:
    """The run's tables (and `samples`) that `sql` names; a name inside a string literal only adds a view."""
    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
    return words & (set(SCHEMAS) | {"samples"})


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# What DuckDB's own parser types as SELECT (checked on DuckDB 2.0.1): SELECT, FROM-first (`FROM rollouts`),
# WITH … SELECT, VALUES, UNION/EXCEPT, DESCRIBE, SUMMARIZE, SHOW [ALL] TABLES and PIVOT … ON col IN (…), all
# plain reads. Everything else is refused, notably EXPLAIN (EXPLAIN ANALYZE runs its statement, COPY … TO
# included), PRAGMA (import_database runs a schema.sql), CALL, SET/RESET/USE, COPY, ATTACH/DETACH,
# INSTALL/LOAD (typed LOAD), EXPORT, CREATE and PIVOT without an IN list (typed MULTI: it creates an enum type
# of the column's values before its SELECT).
READ_ONLY_STATEMENTS = ("SELECT",)
PIVOT_HINT = ("PIVOT without an IN list first creates a type, which roll sql does not run: name the values, "
              "as in PIVOT rollouts ON finish_reason IN ('stop', 'length') USING count(*) GROUP BY policy_version, "
              "or aggregate conditionally: count(*) FILTER (WHERE finish_reason = 'stop')")
# Words that read DuckDB's catalog (SHOW TABLES, DESCRIBE, duckdb_views(), information_schema …): a query
# naming one gets a view of every table, not only of the tables it names.
_CATALOG_WORDS = re.compile(r"^(show|describe|information_schema|pg_catalog|sqlite_master|duckdb_\w+|pragma_\w+)$")


@dataclass(frozen=True)
class QueryResult:
    """A finished query's column descriptions and rows (read in the worker thread that ran it)."""
    description: list
    rows: list

    def fetchall(self) -> list:
        return self.rows

    def fetchone(self):
        return self.rows[0] if self.rows else None


def query(run: Run, sql: str, timeout: float | None = None, memory_limit: str | None = None) -> QueryResult:
    """Run one read-only user query (`roll sql`) over the run's sandboxed views (see `Run.connect`): exactly
    one statement, typed SELECT by DuckDB's own parser; anything else is a RollError. A file whose content
    disagrees with its place is left out with one line on stderr. The query stops after `timeout` seconds (a
    RollError) or on Ctrl-C (KeyboardInterrupt, raised once DuckDB has stopped), and is never run again.

    DuckDB stops a query on SIGINT only while external access is on, which the sandbox turns off (checked on
    DuckDB 2.0.1); so the query runs in a worker thread, and the main thread, which receives the signal or
    sees the time run out, stops it with `connection.interrupt()`, which works either way."""
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise RollError(f"SQL: {str(exc).splitlines()[0]}") from None
    if not statements:
        raise RollError("SQL: no statement given")
    if len(statements) > 1:
        raise RollError(f"SQL: roll sql runs one read-only query; {len(statements)} statements given")
    kind = statements[0].type.name
    if kind == "MULTI" and "pivot" in {w.lower() for w in re.findall(r"[A-Za-z_]+", sql)}:
        raise RollError(f"SQL: {PIVOT_HINT}")
    if kind not in READ_ONLY_STATEMENTS:
        raise RollError(f"SQL: roll sql runs one read-only query; {kind} statements are not allowed")
    statement = statements[0].query
    con = run.connect(None, view_tables(sql), mismatched="skip", memory_limit=memory_limit)

    def run_one():
        cursor = con.execute(statement)
        return QueryResult(cursor.description or [], cursor.fetchall())

    try:
        return stoppable(con, run_one, timeout)
    except duckdb.OutOfMemoryException as exc:
        limit = f"--memory-limit {memory_limit}" if memory_limit else "DuckDB's default memory limit"
        raise RollError(f"SQL: {str(exc).splitlines()[0]} ({limit})") from None
    except duckdb.Error as exc:
        raise RollError(f"SQL: {str(exc).splitlines()[0]}") from None
    finally:
        try:
            con.close()
        except duckdb.Error:  # still busy: a stopped query's worker thread, abandoned at exit
            pass


def stoppable(con, work, timeout: float | None):
    """`work()` (which runs queries on DuckDB connection `con`) in a worker thread, stopped with
    `con.interrupt()` after `timeout` seconds (RollError) or on KeyboardInterrupt (re-raised)."""
    import threading

    outcome, done = {}, threading.Event()

    def target():
        try:
            outcome["result"] = work()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc
        finally:
            done.set()

    # an Event, not Thread.join: a join that SIGINT interrupted can report the thread finished (CPython < 3.13)
    threading.Thread(target=target, name="roll-sql", daemon=True).start()
    try:
        finished = done.wait(timeout or None)
    except KeyboardInterrupt:
        con.interrupt()
        done.wait(0.5)  # DuckDB stops within milliseconds; a result still being converted is abandoned
        raise
    if not finished:
        con.interrupt()
        done.wait(0.5)
        raise RollError(f"SQL: stopped after {timeout:g} s (--timeout); nothing was written")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def view_tables(sql: str) -> set[str]:
    """The tables `sql` needs views of: those it names, or every table when it reads the catalog."""
    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql)}
    if any(_CATALOG_WORDS.match(w) for w in words):
        return set(SCHEMAS) | {"samples"}
    return words & (set(SCHEMAS) | {"samples"})


def on_views(run: Run, sql: str, versions: range | None, action):
    """`action(connection)` over views of the tables `sql` names (roll's own queries: a mismatched file is refused)."""
    return action(run.connect(versions, referenced_tables(sql)))


# Named, parameterised queries the stages run; user input only ever arrives as a parameter.
NAMED_QUERIES = {
    "window_samples": """
        SELECT policy_version, prompt_id, sample_index, prompt_token_ids, token_ids, temperature, top_p,
               max_new_tokens, v.reward, s.trainer_logprobs, s.ref_logprobs
        FROM rollouts r
        LEFT JOIN verdicts v USING (policy_version, prompt_id, sample_index, generation_id)
        LEFT JOIN scores s USING (policy_version, prompt_id, sample_index, generation_id)
        WHERE policy_version BETWEEN $lo AND $hi
        ORDER BY policy_version, prompt_id, sample_index""",
    "versions_without_ref": """
        SELECT DISTINCT policy_version FROM scores WHERE ref_logprob_sum IS NULL ORDER BY 1""",
    "optimizer_steps_between": """
        SELECT count(*) AS steps FROM steps WHERE policy_version > $lo AND policy_version <= $hi""",
    "group_rewards": """
        SELECT sample_index, reward FROM verdicts WHERE policy_version = $version AND prompt_id = $prompt_id
        ORDER BY sample_index""",
    "version0_rewards": """
        SELECT prompt_id, reward FROM rollouts JOIN verdicts USING (policy_version, prompt_id, sample_index, generation_id)
        WHERE policy_version = 0 AND prompt_id IN (SELECT unnest($prompt_ids))
        ORDER BY prompt_id, sample_index""",
}


def relation_arrow(relation) -> pa.Table:
    """A DuckDB relation's rows as a pyarrow table, without an extra copy (the method's name changed in DuckDB 2)."""
    return relation.to_arrow_table() if hasattr(relation, "to_arrow_table") else relation.arrow()


def _execute(run: Run, sql: str, versions: range | None, params: dict, arrow: bool = False, name: str = "query"):
    import duckdb

    def fetch(con):
        return relation_arrow(con.sql(sql, params=params)) if arrow else con.execute(sql, params)

    try:
        return on_views(run, sql, versions, fetch)
    except duckdb.Error as exc:
        raise RollError(f"{run.root}: {name} failed: {str(exc).splitlines()[0]}") from None


def _dicts(cursor) -> list[dict]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def rows(run: Run, sql: str, versions: range | None = None, **params) -> list[dict]:
    """Rows (as dicts) of one of roll's own queries over the run's views (only `versions`' shards, when given)."""
    return _dicts(_execute(run, sql, versions, params))


def named_query(run: Run, name: str, versions: range | None = None, **params) -> list[dict]:
    """Rows (as dicts) of the named query over the run's views (only `versions`' shards, when given)."""
    return _dicts(_execute(run, NAMED_QUERIES[name], versions, params, name=f"query {name}"))


def named_query_arrow(run: Run, name: str, versions: range | None = None, **params) -> pa.Table:
    """The named query's result as a pyarrow table: list columns stay Arrow buffers (no Python objects per
    token), which is what makes a lag window of millions of rows cheap to hand to torch."""
    return _execute(run, NAMED_QUERIES[name], versions, params, arrow=True, name=f"query {name}")

