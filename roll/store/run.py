"""The run directory: where every table's files, checkpoints and locks live (the `Run` class), and shard names."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from roll.errors import RollError
from roll.store.checkpoint import (CHECKPOINT_CONFIGS, POLICIES_DIR, POLICY_DIR_NAME, POLICY_META, is_checkpoint,
                                   policy_dir_name, policy_meta)
from roll.store.commit import (TEMPORARY_NAME, VERSION_DIR_NAME, admit, check_files, file_lock, os_error, owner_alive,
                               read_table, report_stray, stamp_generation, temporary_path, write_table)
from roll.store.schemas import OPE_TABLES, SHARDED_TABLES, TRAIN_TABLES, check_schema, empty_table

_GROUP = {"steps": "train", "groups": "train", "ope_summary": "ope"}  # table → its directory under the run

SHARD_NAME = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")


def shard_index(name: str) -> int:
    """i of a partition shard's file name part-i-of-N; 0 for any other file (an extra)."""
    match = SHARD_NAME.match(name)
    return int(match.group(1)) if match else 0


def settings_key(settings: dict) -> str:
    """A short content hash of a file's settings, part of its name: other settings, another file."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def data_window(version: int, lag: int, window: int) -> tuple[int, int]:
    """Behaviour versions [v − L − W + 1, v − L] read by update v → v+1, clamped at 0 (DESIGN §3.1)."""
    return max(0, version - lag - window + 1), max(0, version - lag)



# Supplementary files of a version outside its i-of-N partition (apo's version-0 samples of later prompts).
EXTRA_NAME = re.compile(r"^extra-[A-Za-z0-9_.-]+\.parquet$")


@dataclass(frozen=True, order=True)
class Shard:
    index: int
    count: int

    @staticmethod
    def parse(text: str, flag: str = "--shard") -> "Shard":
        """Parse "i/N" (0 ≤ i < N)."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise RollError(f"{flag} '{text}': expected i/N, for example 0/4")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or index >= count:
            raise RollError(f"{flag} '{text}': the index must satisfy 0 <= i < N")
        return Shard(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


class Run:
    """A run directory. All paths inside a run come from here."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    # layout ------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "run.toml"

    @property
    def prompts_path(self) -> Path:
        return self.root / "prompts" / "prompts.parquet"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def policy_dir(self, version: int) -> Path:
        return self.root / POLICIES_DIR / policy_dir_name(version)

    def version_dir(self, table: str, version: int) -> Path:
        assert table in SHARDED_TABLES + TRAIN_TABLES + OPE_TABLES + ("evals",), table
        group = _GROUP.get(table, table)
        return self.root / group / f"version={version:04d}"

    def shard_path(self, table: str, version: int, shard: Shard) -> Path:
        return self.version_dir(table, version) / f"part-{shard.index:05d}-of-{shard.count:05d}.parquet"

    def train_path(self, table: str, version: int) -> Path:
        return self.version_dir(table, version) / f"{table}.parquet"

    def ope_rows_path(self, target: int, data_version: int, rollout_shard: str) -> Path:
        """Log-weights under policy `target` of one committed rollout file of `data_version`."""
        return self.version_dir("ope", target) / f"from-{data_version:04d}-{rollout_shard}"

    def ope_summary_path(self, target: int, lo: int, hi: int, settings: dict) -> Path:
        """One summary per (target, data versions lo..hi, δ and λ rule)."""
        return self.version_dir("ope_summary", target) / f"summary-{lo:04d}-{hi:04d}-{settings_key(settings)}.parquet"

    def eval_path(self, version: int, dataset: str, settings: dict) -> Path:
        """One file per (version, dataset, sampling settings): an evaluation with another k, limit,
        temperature, top-p, length or seed is another file, never a relabelled cache hit."""
        return self.version_dir("evals", version) / f"{dataset}-{settings_key(settings)}.parquet"

    def sink_dir(self, sink: str) -> Path:
        """Where a metrics sink (roll/sinks.py: tensorboard, wandb, trackio) writes its copy of the run's curves:
        not a table, never read by roll, rebuilt from the tables by `roll report --to`."""
        return self.root / "logs" / sink

    # what is committed -------------------------------------------------------------------------------
    def policy_versions(self) -> list[int]:
        """Versions that were committed (policy.json is written last, so its presence commits), including
        those whose checkpoint `roll gc` has since deleted: their policy.json stays as the record."""
        base = self.root / POLICIES_DIR
        if not base.is_dir():
            return []
        found = (POLICY_DIR_NAME.match(p.name) for p in base.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (base / m.group(0) / POLICY_META).is_file())

    def checkpoint_versions(self) -> list[int]:
        """Committed versions whose weights are still on disk (not collected by `roll gc`)."""
        return [v for v in self.policy_versions() if is_checkpoint(self.policy_dir(v))]

    def latest_policy_version(self) -> int:
        versions = self.policy_versions()
        if not versions:
            raise RollError(f"{self.root}: no committed policy under policies/ (run `roll init`)")
        return versions[-1]

    def remove_policy(self, version: int) -> None:
        """Delete a committed checkpoint's weights, tokenizer and optimiser state, keeping its policy.json as
        the record that the version was committed (its steps and groups stay readable). Call it under the
        version's `policy_lock`.

        Rename, then remove: every file but policy.json is first moved into a hidden temporary directory
        beside it (config.json, or a LoRA version's adapter_config.json, first, so the version stops counting
        as a checkpoint before anything else moves), and the temporary is removed last. A gc killed half-way
        leaves a temporary of a dead owner, which `sweep` (the next gc) removes, and perhaps files
        still beside a policy.json without config.json, which it removes too. OS errors name the path."""
        directory = self.policy_dir(version)
        tmp = temporary_path(directory)
        try:
            names = sorted((p for p in directory.iterdir() if p.name != POLICY_META),
                           key=lambda p: p.name not in CHECKPOINT_CONFIGS)
            if not names:
                return
            tmp.mkdir()
            for path in names:
                os.rename(path, tmp / path.name)
            shutil.rmtree(tmp)
        except OSError as exc:
            raise os_error(exc, directory, "nothing else was deleted") from None

    def sweep(self) -> list[Path]:
        """What killed deleters and writers left (`roll gc` runs it first): hidden temporaries of a dead owner
        under policies/ and the table directories (a renamed-away checkpoint, a pruned version, a half-written
        shard), and anything beside the policy.json of a version that is no longer a checkpoint (a gc killed
        between its renames). A live owner's temporary is left alone. Returns what it removed."""
        removed = []
        checkpoints = set(self.checkpoint_versions())
        for version in self.policy_versions():
            if version in checkpoints:
                continue
            with self.policy_lock(version):
                leftovers = [p for p in self.policy_dir(version).iterdir() if p.name != POLICY_META]
                if leftovers and version not in self.checkpoint_versions():
                    self.remove_policy(version)
                    removed += leftovers
        bases = [self.root / POLICIES_DIR] + [self.root / _GROUP.get(t, t) for t in (*SHARDED_TABLES, "steps", "evals", "ope")]
        for base in bases:
            entries = [e for d in ([base] + sorted(base.glob("version=*")) if base.is_dir() else []) for e in d.iterdir()]
            for entry in entries:
                stale = TEMPORARY_NAME.match(entry.name)
                if not stale or owner_alive(entry, stale.group(1)):
                    continue
                try:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise os_error(exc, entry, "nothing else was deleted") from None
                removed.append(entry)
        return removed

    def remove_tree(self, path: Path) -> None:
        """Delete a file or directory of the run by rename, then remove: it disappears from its place at once,
        and a process killed while removing leaves a temporary of a dead owner, which `sweep` removes."""
        tmp = temporary_path(path)
        try:
            os.rename(path, tmp)
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise os_error(exc, path, "nothing else was deleted") from None

    def policy_lock(self, version: int, shared: bool = False):
        """The lock of a version's checkpoint: held shared by a stage that reads it (generate samples from it,
        train updates from it), exclusive by whatever deletes it (`roll gc`, `train --prune-descendants`), so
        a checkpoint never disappears under a reader, and a reader that waited finds it gone and says so."""
        return self.lock(f"policy-{version:04d}", f"the checkpoint of policy version {version}", shared=shared)

    def lock(self, name: str, what: str, shared: bool = False):
        """One writer at a time for `name` (an update v → v+1, or the commits of one table version): the
        flock of `.locks/NAME.lock` in the run (`commit.file_lock`; `shared` for readers of a checkpoint)."""
        return file_lock(self.root / ".locks" / f"{name}.lock", what, shared)

    def commit_shard(self, table: str, version: int, name: str, data: pa.Table, replace: bool = True) -> Path:
        """Commit one file of a sharded table's version under that version's lock, refusing a partition
        shard whose layout (the N of i-of-N) differs from the shards already there (DESIGN §6).

        `replace=False` (roll import): a version that already has files of `table` is refused, unless the one
        file there is `name` with exactly this content (a rerun, left as it is) — decided under the lock, so
        two imports into one version cannot both commit."""
        path = self.version_dir(table, version) / name
        with self.lock(f"{table}-{version:04d}", f"{table} of version {version}"):
            if table == "rollouts":
                data = stamp_generation(data)
            if not replace:
                existing = self.files(table, version)
                if list(existing) == [name] and read_table(path, table).equals(check_schema(data, table, path)):
                    return path
                if existing:
                    raise RollError(f"{self.version_dir(table, version)}: version {version} already has {table} "
                                    f"({len(existing)} file(s)) that this import would mix with; import into a version "
                                    f"without any")
            match = SHARD_NAME.match(name)
            if match:
                count = int(match.group(2))
                others = sorted(s.count for s in self.shards(table, version) if s.count != count)
                if others:
                    raise RollError(f"{self.version_dir(table, version)}: version {version} already has {table} in "
                                    f"{others[0]} shards (part-…-of-{others[0]:05d}); use --shard i/{others[0]}, "
                                    f"or --force to replace them")
            return write_table(path, table, data)

    def generation_of(self, table: str, version: int, name: str) -> str | None:
        """The generation id a committed file of a sharded table carries (None if it has none)."""
        path = self.version_dir(table, version) / name
        try:
            column = pq.read_table(path, columns=["generation_id"]).column("generation_id")
        except (KeyError, pa.ArrowInvalid, OSError):
            return None
        return column[0].as_py() if len(column) else None

    def trained_on(self, version: int) -> set[int]:
        """The data versions read by the updates that made `version` and its ancestors (policy.json's parent
        and data_versions, back to v0): rows a judge of `version` would see in-sample."""
        committed, read, seen, current = set(self.policy_versions()), set(), set(), version
        while current is not None and current not in seen and current in committed:
            seen.add(current)
            meta = policy_meta(self.policy_dir(current))
            read.update(meta.get("data_versions") or [])
            current = meta.get("parent")
        return read

    def descendants(self, version: int) -> list[int]:
        """Committed versions built on `version`'s weights: those whose chain of parents (policy.json) reaches
        it, or breaks at a version above it that is gone (a half-done prune)."""
        committed = set(self.policy_versions())
        out = []
        for candidate in (v for v in sorted(committed) if v > version):
            current, seen = candidate, set()
            while current is not None and current > version and current not in seen:
                seen.add(current)
                if current not in committed:
                    break
                current = policy_meta(self.policy_dir(current)).get("parent")
            if current == version or (current is not None and current > version):
                out.append(candidate)
        return out

    def drawn_from(self, version: int) -> list[Path]:
        """The run's files made with `version`'s weights beside the version itself: its rollouts, verdicts and
        scores (sampled from it), its evals, its ope files (judged under it), and other targets' ope files that
        read its rows. Directories where the whole directory is the version's."""
        out = [d for d in (self.version_dir(t, version) for t in (*SHARDED_TABLES, "evals", "ope")) if d.is_dir()]
        for target in self.versions("ope") + self.versions("ope_summary"):
            if target == version:
                continue
            directory = self.version_dir("ope", target)
            out += sorted(directory.glob(f"from-{version:04d}-*.parquet"))
            for summary in sorted(directory.glob("summary-*.parquet")):
                lo, hi = (int(x) for x in summary.name.split("-")[1:3])
                if lo <= version <= hi:
                    out.append(summary)
        return sorted(set(out))

    def remove_drawn_from(self, version: int, whole: bool = False) -> list[Path]:
        """Delete what `drawn_from(version)` lists (with `whole`, the version too: its checkpoint with policy.json,
        and its steps and groups), each by rename then remove, under the version's checkpoint lock and its table
        locks, so no reader or writer of them is mid-way. Returns what it deleted."""
        removed = []
        with self.policy_lock(version), self.lock(f"rollouts-{version:04d}", f"rollouts of version {version}"), \
                self.lock(f"verdicts-{version:04d}", f"verdicts of version {version}"), \
                self.lock(f"scores-{version:04d}", f"scores of version {version}"):
            for path in self.drawn_from(version):
                self.remove_tree(path)
                removed.append(path)
            if whole:  # the commit point (policy.json) first: the version stops existing before its metrics go
                for path in (self.policy_dir(version), self.version_dir("steps", version)):
                    if path.exists():
                        self.remove_tree(path)
                        removed.append(path)
        return removed

    def require_policy(self, version: int) -> Path:
        """The checkpoint directory of `version`, refusing a version never committed or collected by gc."""
        if version not in self.checkpoint_versions():
            have = ", ".join(map(str, self.checkpoint_versions())) or "none"
            if version in self.policy_versions():
                raise RollError(f"{self.root}: the checkpoint of policy version {version} was deleted by `roll gc` "
                                f"(checkpoints on disk: {have})")
            raise RollError(f"{self.root}: policy version {version} does not exist (have: {have})")
        return self.policy_dir(version)

    def shards(self, table: str, version: int) -> dict[Shard, Path]:
        """Committed shards of `table` for behaviour version `version`."""
        directory = self.version_dir(table, version)
        if not directory.is_dir():
            return {}
        found = {}
        for path in sorted(directory.iterdir()):
            match = SHARD_NAME.match(path.name)
            if match:
                found[Shard(int(match.group(1)), int(match.group(2)))] = path
        return found

    def pending_shards(self, table: str, versions, shard: Shard, force: bool) -> list[tuple[int, str, Path]]:
        """(version, file name, rollouts path) of rollout files whose mirror in `table` (verdicts, scores) is
        missing or stale: redone when missing, forced, or made from rollouts since regenerated differently.

        A partition shard part-i-of-N belongs to `--shard j/M` when i ≡ j (mod M); extra files go to j = 0."""
        todo = []
        for version in versions:
            for name, path in self.files("rollouts", version).items():
                if shard_index(name) % shard.count != shard.index:
                    continue
                mirror = self.version_dir(table, version) / name
                if force or not mirror.exists() or self.generation_of(table, version, name) != self.generation_of("rollouts", version, name):
                    todo.append((version, name, path))
        return todo

    def versions_pending(self, table: str, versions) -> list[int]:
        """The versions among `versions` with a rollout file whose `table` mirror (verdicts, scores) is missing
        or stale."""
        return sorted({v for v, _, _ in self.pending_shards(table, versions, Shard(0, 1), False)})

    def selected_versions(self, versions) -> list[int]:
        """`versions` (every version with rollouts when None), each checked to have rollouts."""
        have = self.versions("rollouts")
        if versions is None:
            return have
        missing = [v for v in versions if v not in have]
        if missing:
            raise RollError(f"{self.root}: no rollouts for version(s) {', '.join(map(str, missing))} (have: "
                            f"{', '.join(map(str, have)) or 'none'})")
        return list(versions)

    def extra_path(self, table: str, version: int, tag: str) -> Path:
        return self.version_dir(table, version) / f"extra-{tag}.parquet"

    def files(self, table: str, version: int, mismatched: str = "refuse") -> dict[str, Path]:
        """Every committed file of a sharded table's version, partition shards and extras, by file name.

        Hidden names (a writer's temporaries) are not files of the table; any other name that is neither a
        shard nor an extra is reported once on stderr and left out, by the stages and by SQL alike. A file
        whose content disagrees with its place (`check_file`) is refused, or with mismatched="skip" (`roll
        sql`) reported once and left out. Shards of two layouts (i-of-N with two N) in one version are
        refused: their prompts overlap."""
        directory = self.version_dir(table, version)
        found, layouts = {}, set()
        for path in self._listed(table, version):
            match = SHARD_NAME.match(path.name)
            if (match or EXTRA_NAME.match(path.name)) and admit(path, table, version, mismatched):
                found[path.name] = path
                if match:
                    layouts.add(int(match.group(2)))
            elif not (match or EXTRA_NAME.match(path.name) or path.name.startswith(".")):
                report_stray(path, table)
        if len(layouts) > 1:
            raise RollError(f"{directory}: shards of {len(layouts)} layouts "
                            f"({', '.join(f'i-of-{n}' for n in sorted(layouts))}) in one version; their prompts "
                            f"overlap: remove one layout's files, or regenerate the version with --force")
        return found

    def _listed(self, table: str, version: int) -> list[Path]:
        directory = self.version_dir(table, version)
        return sorted(directory.iterdir()) if directory.is_dir() else []

    def committed_files(self, table: str, versions=None, mismatched: str = "refuse") -> list[Path]:
        """The committed files of `table` — the one list that the stages and the SQL views read. With
        `versions`, only those versions' shards of a sharded table. steps and groups of version v count once
        a policy of version ≥ v is committed: they are written just before v's policy, so a killed or failed
        update leaves tables that no reader sees until its rerun replaces them. Each file is checked against
        its place (`check_file`): refused, or with mismatched="skip" left out with a line on stderr."""
        if table in SHARDED_TABLES:
            versions = self.versions(table) if versions is None else versions
            check_files([(p, table, v) for v in versions for p in self._listed(table, v)
                         if SHARD_NAME.match(p.name) or EXTRA_NAME.match(p.name)])
            return [p for v in versions for p in self.files(table, v, mismatched).values()]
        if table == "prompts":
            found = [(self.prompts_path, None)] if self.prompts_path.is_file() else []
        elif table in TRAIN_TABLES:
            latest = max(self.policy_versions(), default=-1)
            found = [(self.train_path(table, v), v) for v in self.versions(table)
                     if v <= latest and self.train_path(table, v).is_file()]
        elif table == "evals":
            found = [(p, v) for v in self.versions("evals") for p in sorted(self.version_dir("evals", v).glob("[!.]*.parquet"))]
        else:
            pattern = "from-*.parquet" if table == "ope" else "summary-*.parquet"
            found = [(p, v) for v in self.versions(table) for p in sorted(self.version_dir(table, v).glob(pattern))]
        return [p for p, v in found if admit(p, table, v, mismatched)]

    def complete_shard_count(self, table: str, version: int) -> int | None:
        """N if every part i-of-N of `table` for `version` is committed, else None."""
        by_count: dict[int, set[int]] = {}
        for shard in self.shards(table, version):
            by_count.setdefault(shard.count, set()).add(shard.index)
        for count, indices in sorted(by_count.items()):
            if len(indices) == count:
                return count
        return None

    def versions(self, table: str) -> list[int]:
        """Versions that hold at least one committed file of `table`."""
        base = self.root / _GROUP.get(table, table)
        if not base.is_dir():
            return []
        out = []
        for directory in base.iterdir():
            match = VERSION_DIR_NAME.match(directory.name)
            if match and any(directory.glob("*.parquet")):
                out.append(int(match.group(1)))
        return sorted(out)

    def read_version(self, table: str, version: int) -> pa.Table:
        """All committed shards of one version of a sharded table, validated, as one table."""
        parts = [read_table(path, table) for path in self.files(table, version).values()]
        return pa.concat_tables(parts) if parts else empty_table(table)

    def read_prompts(self) -> pa.Table:
        return read_table(self.prompts_path, "prompts")

    # SQL ---------------------------------------------------------------------------------------------
    def connect(self, versions: range | None = None, tables: set[str] | None = None, mismatched: str = "refuse",
                memory_limit: str | None = None):
        """The run's sandboxed DuckDB connection with a view per table (`roll.store.sql.connect`)."""
        from roll.store.sql import connect

        return connect(self, versions, tables, mismatched, memory_limit)
