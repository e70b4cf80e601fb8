"""`roll sql`: one read-only query over the run's tables (roll.store.query), bounded in time and memory, and
its result printed as a rich table (default), CSV or JSON on stdout."""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import TIMEOUT_MAX, option


@dataclass(frozen=True)
class SqlConfig:
    run: Path  # an existing run directory
    query: str  # the SQL
    fmt: str = option("table", "Output format: jsonl writes one object per row, the form `roll import` reads back.",
                      flag="--format", choices=("table", "csv", "json", "jsonl"))
    timeout: float = option(600.0, "Stop the query after this many seconds (one line, exit 2); 0: no limit. "
                                   "The 10 M-row aggregate in BENCHMARKS.md takes 0.14 s.", min=0, max=TIMEOUT_MAX)
    memory_limit: str = option("50%", "DuckDB's memory_limit for the query: a size (4GB, 512MiB) or a share "
                                      "of the machine's memory (50%); a query that needs more stops with one line.")


def run(config: SqlConfig) -> None:
    """Run the query and print its result; a bad query, a timeout or too little memory is a RollError."""
    from roll.store import Run, query

    if not config.timeout >= 0:
        raise RollError(f"--timeout {config.timeout:g}: expected seconds >= 0 (0: no limit)")
    print_result(query(Run(config.run), config.query, config.timeout, config.memory_limit), config.fmt)


def _plain(value):
    """JSON-friendly value: lists stay lists, anything exotic (dates, decimals) becomes text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def print_result(cursor, fmt: str = "table") -> None:
    names = [d[0] for d in cursor.description] if cursor.description else []
    rows = cursor.fetchall()
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
    elif fmt == "json":
        json.dump([{n: _plain(v) for n, v in zip(names, row)} for row in rows], sys.stdout)
        sys.stdout.write("\n")
    elif fmt == "jsonl":  # floats print as the shortest repr that reads back to the same double: lossless
        for row in rows:
            sys.stdout.write(json.dumps({n: _plain(v) for n, v in zip(names, row)}) + "\n")
    else:
        from rich.console import Console
        from rich.table import Column, Table
        from rich.text import Text

        # Text: a value is shown as it is, never read as rich markup ("[b]") or an emoji code (":boom:", which a
        # reward term's error "my.py:boom: ..." holds)
        table = Table(*(Column(Text(n)) for n in names), caption=f"{len(rows)} row{'s' if len(rows) != 1 else ''}")
        for row in rows:
            table.add_row(*(Text("NULL" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))) for v in row))
        Console().print(table)
