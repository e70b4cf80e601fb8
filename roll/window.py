"""The rows of a lag window as columns, straight from Arrow's buffers (train's input, DESIGN §3.1).

Scalars become Python lists; list columns (token ids, log-probs) stay one flat NumPy array with offsets each,
so a window of 400k rows creates no Python object per token. `window[i][name]` reads one row: a list column
as a NumPy slice (or None for a null list), a scalar as its Python value.
"""
from __future__ import annotations


class Window:
    LISTS = ("prompt_token_ids", "token_ids", "trainer_logprobs", "ref_logprobs")

    def __init__(self, table):
        import numpy as np

        self.table = table
        self.size = table.num_rows
        self.scalars = {name: table.column(name).to_pylist() for name in table.column_names if name not in self.LISTS}
        self.lists = {}
        for name in self.LISTS:
            column = table.column(name).combine_chunks()
            # raw offsets index the child array (`values`, not `flatten()`, which drops what null rows cover)
            valid = np.ones(len(column), bool) if column.null_count == 0 else np.asarray(column.is_valid())
            self.lists[name] = (np.asarray(column.values), np.asarray(column.offsets), valid)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> "Row":
        return Row(self, i)

    def __iter__(self):  # explicit: without it Python would index on past the end (a Row never raises)
        return (Row(self, i) for i in range(self.size))

    def length(self, name: str, i: int) -> int:
        offsets = self.lists[name][1]
        return int(offsets[i + 1] - offsets[i])

    def take(self, indices) -> "Window":
        """A window of the rows at `indices` (in that order)."""
        return Window(self.table.take(indices))

    def groups(self) -> dict[tuple[int, str], list[int]]:
        """Row indices of each group: one prompt's samples from one behaviour version, in row order."""
        out: dict[tuple[int, str], list[int]] = {}
        for i, key in enumerate(zip(self.scalars["policy_version"], self.scalars["prompt_id"])):
            out.setdefault(key, []).append(i)
        return out


class Row:
    __slots__ = ("window", "index")

    def __init__(self, window: Window, index: int):
        self.window, self.index = window, index

    def __getitem__(self, name: str):
        if name in self.window.lists:
            values, offsets, valid = self.window.lists[name]
            i = self.index
            return values[offsets[i]:offsets[i + 1]] if valid[i] else None
        return self.window.scalars[name][self.index]
