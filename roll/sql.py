"""Printing `roll sql` results: a rich table (default), CSV or JSON on stdout."""
from __future__ import annotations

import csv
import json
import sys


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
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*names, caption=f"{len(rows)} row{'s' if len(rows) != 1 else ''}")
        for row in rows:
            table.add_row(*("NULL" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in row))
        Console().print(table)
