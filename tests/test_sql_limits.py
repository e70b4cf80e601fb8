"""`roll sql` stops: Ctrl-C, --timeout and --memory-limit end a query with one line (issue 22), and the
catalog (SHOW TABLES, DESCRIBE, duckdb_views(), information_schema) lists every table of the run.

Each stop is tried on the real command line over a query that would otherwise run for hours
(`count(*)` over 10^12 generated rows) or need more memory than it is given.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from roll.stages.generate import GenerateConfig, run as generate

from conftest import roll_cli, wait_for

ENDLESS = "select count(*) from range(1e12::bigint)"  # hours of work for DuckDB, no memory to speak of
TABLES = {"prompts", "rollouts", "verdicts", "scores", "samples", "steps", "groups", "evals", "ope", "ope_summary"}
STOP_S = 1.0  # the promise: Ctrl-C or the timeout ends `roll sql` within a second


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "roll", "sql", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, all its threads (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def startup(run_dir):
    """Wall and CPU seconds of `roll sql "select 1"`: what a process costs before any query runs."""
    started = time.monotonic()
    proc = start("select 1", "--run", run_dir)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.communicate()
    assert proc.returncode == 0
    return time.monotonic() - started, usage.ru_utime + usage.ru_stime


def test_ctrl_c_stops_a_running_query_within_a_second_with_one_line_and_exit_130(run_dir, startup):
    _, startup_cpu = startup
    proc = start(ENDLESS, "--run", run_dir)
    try:
        # running the query, not starting up: one CPU-second more than a whole `select 1` process used
        wait_for(lambda: proc.poll() is not None or cpu_seconds(proc.pid) > startup_cpu + 1.0, 120, "the query")
        assert proc.poll() is None, proc.communicate()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        # the query would run for hours: without a stop (or run again after one) this times out
        out, err = proc.communicate(timeout=30)
        stopped = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, err)
    assert stopped < STOP_S, stopped
    assert out == "" and err.splitlines() == ["roll: error: interrupted (Ctrl-C); the query was stopped"], err


def test_timeout_stops_the_query_with_one_line(run_dir, startup):
    startup_wall, _ = startup
    started = time.monotonic()
    proc = roll_cli("sql", ENDLESS, "--timeout", "1.5", "--run", run_dir, check=False, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.splitlines() == ["roll: error: SQL: stopped after 1.5 s (--timeout); nothing was written"]
    # start-up, then 1.5 s of query, then the stop
    assert 1.5 < elapsed < startup_wall + 1.5 + STOP_S, (elapsed, startup_wall)


def test_memory_limit_refuses_a_query_that_needs_more_and_the_same_query_runs_without_it(run_dir):
    # one string of 3 million numbers joined by commas: about 23 MB, more than 10 MB allows
    sql = "select length(string_agg(x::varchar, ',')) as n from range(3000000) t(x)"
    proc = roll_cli("sql", sql, "--memory-limit", "10MB", "--run", run_dir, check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Out of Memory" in lines[0] and lines[0].endswith("(--memory-limit 10MB)"), lines
    n = sum(len(str(i)) for i in range(3_000_000)) + 3_000_000 - 1  # digits plus the commas between
    assert roll_cli("sql", sql, "--format", "csv", "--run", run_dir).stdout == f"n\n{n}\n"
    bad = roll_cli("sql", "select 1", "--memory-limit", "lots", "--run", run_dir, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("roll: error: --memory-limit lots: ") and len(bad.stderr.splitlines()) == 1


@pytest.mark.parametrize("sql", ["SHOW TABLES", "DESCRIBE", "select view_name as name from duckdb_views() where not internal",
                                 "select table_name as name from information_schema.tables"])
def test_the_catalog_lists_every_table_of_the_run(run_dir, sql):
    proc = roll_cli("sql", sql, "--format", "json", "--run", run_dir)
    import json

    assert {row["name"] for row in json.loads(proc.stdout)} == TABLES


def test_pivot_without_values_says_what_to_write_and_that_works(run_dir):
    generate(GenerateConfig(run=run_dir, prompts=2, group_size=2, max_new_tokens=8))
    refused = roll_cli("sql", "PIVOT rollouts ON finish_reason USING count(*)", "--run", run_dir, check=False)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    named = "PIVOT rollouts ON finish_reason IN ('stop', 'length') USING count(*) GROUP BY policy_version"
    assert named in refused.stderr
    assert "count(*) FILTER (WHERE finish_reason = 'stop')" in refused.stderr
    # both forms it names run, and count the 2 x 2 rollouts
    pivot = roll_cli("sql", named, "--format", "csv", "--run", run_dir).stdout.splitlines()
    assert pivot[0] == "policy_version,stop,length" and len(pivot) == 2, pivot
    assert pivot[1].split(",")[0] == "0" and sum(map(int, pivot[1].split(",")[1:])) == 4, pivot
    filtered = roll_cli("sql", "select count(*) filter (where finish_reason = 'stop') + count(*) filter "
                               "(where finish_reason = 'length') as n from rollouts", "--format", "csv", "--run", run_dir)
    assert filtered.stdout == "n\n4\n"
