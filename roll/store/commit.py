"""Atomic commits: write under a hidden temporary beside the target, then rename; clear what killed writers
left; the lock files that keep writers of one thing one at a time; and the checks, from each Parquet footer,
that a committed file holds what its place says."""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from roll.errors import RollError
from roll.store.schemas import check_schema, schema_problem

VERSION_DIR_NAME = re.compile(r"^version=(\d{4,})$")
# temporary_path's names (.NAME.HOST-PID.tmp, a host name may hold dots) of the run's checkpoints, versions and files
TEMPORARY_NAME = re.compile(r"^\.(v\d{4,}|version=\d{4,}|.+?\.parquet)\..+\.tmp$")


def temporary_path(path: Path) -> Path:
    """Where a writer of `path` writes before renaming into place: hidden, named by host and pid, so another
    writer (on this host or another node of a shared file system) can tell whether its owner still lives."""
    path = Path(path)
    return path.parent / f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp"


def owner_alive(stale: Path, name: str) -> bool:
    """Whether the process that named temporary `stale` may still be writing it."""
    owner = stale.name[len(name) + 2:-len(".tmp")]
    host, _, pid = owner.rpartition("-")
    if not pid.isdigit():  # a name from before temporaries carried their owner: nobody writes it any more
        return False
    if host and host != socket.gethostname():
        return True  # another node's process: it cannot be checked from here, so it is left alone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clear_stale_temporaries(path: Path) -> None:
    """Remove what a killed writer of `path` left beside it: hidden `.NAME.HOST-PID.tmp` files (a Parquet
    file) or directories (a checkpoint) whose owner is gone. A live writer's temporary is never touched."""
    name = Path(path).name
    for stale in Path(path).parent.glob(f".{name}.*.tmp"):
        if owner_alive(stale, name):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give `path` (a file, or a directory and the files in it) the modes `open()` and `mkdir()` would give
    under the process umask: writers that create files 0600 (tempfile, safetensors) would otherwise make a
    run in a shared project directory unreadable to the rest of the group."""
    mask = _umask()
    path = Path(path)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def write_table(path: Path, name: str, table: pa.Table, staged: bool = False) -> Path:
    """Validate `table` against schema `name` and commit it at `path` atomically.

    The file is written under a hidden temporary name in the same directory, flushed to disk, then renamed:
    a reader (or a crash) sees either no file or the whole file, never half of one. An OS error (disk full,
    read-only file system, no permission) removes the temporary and becomes one line naming the path.
    `staged`: the file is left at its temporary (returned), for the caller to rename into place once something
    else has committed (train's metrics after their checkpoint).
    """
    path = Path(path)
    table = check_schema(table, name, path).replace_schema_metadata({PLACE_KEY: file_place(path).encode()})
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(path)
        with open(tmp, "wb") as f:
            pq.write_table(table, f, row_group_size=65536)
            f.flush()
            os.fsync(f.fileno())
        if staged:
            return tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise os_error(exc, path) from None
        raise
    return path


def stamp_generation(rollouts: pa.Table) -> pa.Table:
    """Set every row's `generation_id` to a hash of the shard's content (keys, token ids, log-probs): verdicts
    and scores copy it and are joined on it, so rollouts regenerated with other completions never meet the
    verdicts of the old ones, while an identical regeneration keeps them valid (DESIGN §6)."""
    import hashlib

    content = rollouts.select(["policy_version", "prompt_id", "sample_index", "token_ids", "behaviour_logprobs"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, content.schema) as writer:
        writer.write_table(content.combine_chunks())
    digest = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]
    column = pa.array([digest] * rollouts.num_rows, pa.string())
    if "generation_id" in rollouts.column_names:
        return rollouts.set_column(rollouts.column_names.index("generation_id"), "generation_id", column)
    return rollouts.append_column("generation_id", column)


def os_error(exc: OSError, path: Path, outcome: str = "nothing was committed") -> RollError:
    """One line for an OS error while writing (or deleting) `path`: what the system said, where, and what it
    left."""
    reason = exc.strerror or str(exc)
    return RollError(f"{getattr(exc, 'filename', None) or path}: {reason} ({outcome})")


def read_table(path: Path, name: str) -> pa.Table:
    """Read one committed file of table `name`, refusing a corrupt file or a wrong schema by name."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise RollError(f"{path}: no such file") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise RollError(f"{path}: not a readable Parquet file ({exc})") from None
    return check_schema(table, name, path).replace_schema_metadata(None)




@contextmanager
def file_lock(path: Path, what: str, shared: bool = False):
    """One writer at a time: an exclusive flock on the lock file `path`, held until the block ends and released
    by the kernel if the holder dies. A second process waits, saying once on stderr who holds it (`what` names
    the thing locked). `shared`: any number of shared holders at once, none while an exclusive one holds it
    (readers of a checkpoint). An OS error (no space for the lock file, a read-only run) is one line naming
    the lock file."""
    import fcntl

    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise os_error(exc, path) from None
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            print(f"roll: {what} is {'in use' if shared else 'being written'} by {holder}; waiting for it",
                  file=sys.stderr)
            fcntl.flock(fd, mode)
        try:  # who holds it, for the next waiter's message
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}{' (reading)' if shared else ''}\n".encode(), 0)
        except OSError as exc:
            raise os_error(exc, path) from None
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- files match their places
# A file's place in the run says what it holds: its table (directory), behaviour version (version=NNNN) and
# shard (part-i-of-N). Every reader checks that its content agrees before reading it (`check_file`), so a file
# copied or renamed into another version or shard, or of another schema, is never read as what its place says.

PLACE_KEY = b"roll.place"  # in each Parquet footer: where write_table committed it, e.g. rollouts/version=0001/part-00000-of-00004.parquet
VERSION_COLUMN = {"ope": "target_version", "ope_summary": "target_version"}  # the other versioned tables: policy_version


def file_place(path: str | Path) -> str:
    """A file's place within its run: `table/version=NNNN/name` in a version directory, else `dir/name`."""
    path = Path(path)
    return "/".join(path.parts[-3:] if VERSION_DIR_NAME.match(path.parent.name) else path.parts[-2:])


@dataclass(frozen=True)
class FileCheck:
    problem: str | None  # why the file cannot be read as its place says, or None
    columns: tuple[str, ...]  # its column names, in order (views union by name only when these differ)


_CHECKED: dict[tuple, FileCheck] = {}  # by (path, table, version, inode, size, mtime): committed files are replaced, never edited
_COLUMNS: dict[tuple, tuple[str, ...]] = {}  # by (path, inode, size, mtime)


def check_file(path: Path, table: str, version: int | None) -> FileCheck:
    """Whether the committed file at `path` may be read as `table` of `version` (None: an unversioned table),
    from its Parquet footer alone — schema, the version column's row-group min and max, the recorded place —
    so that checking every file of a 10 M-row history reads no data page (DESIGN §3.2)."""
    try:
        stat = path.stat()
        key = (path, table, version, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key in _CHECKED:
            return _CHECKED[key]
        meta = _footer(path)
        problem, columns, leaf = _schema_verdict(meta, table)
    except (pa.ArrowInvalid, OSError) as exc:
        return FileCheck(f"not a readable Parquet file ({str(exc).splitlines()[0]})", ())
    stamped = (meta.metadata or {}).get(PLACE_KEY, b"").decode(errors="replace")
    if problem is None and stamped and stamped != file_place(path):
        problem = f"written as {stamped}, found at {file_place(path)}: a copied or renamed file"
    if problem is None and version is not None:
        problem = _version_problem(path, meta, leaf, version)
    _CHECKED[key] = FileCheck(problem, columns)
    _COLUMNS[(path, *key[3:])] = columns
    return _CHECKED[key]


def _footer(path: Path):
    """A Parquet file's footer (FileMetaData). pyarrow's reader directly: `pq.read_metadata` also builds a
    ParquetFile's Python-side column paths, which was 40 % of the time over 400 files."""
    try:
        from pyarrow._parquet import ParquetReader
    except ImportError:  # a pyarrow that moved it
        return pq.read_metadata(str(path))
    reader = ParquetReader()
    reader.open(str(path))
    return reader.metadata


def check_files(items: list[tuple[Path, str, int | None]]) -> None:
    """`check_file` of many (path, table, version) at once, reading footers on a few threads (pyarrow reads
    and parses them without the GIL): 400 files in about half the time of one thread. Results are cached."""
    if len(items) < 16:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda item: check_file(*item), items))


_VERDICTS: dict[tuple, tuple] = {}  # by (table, the footer's serialised Arrow schema, its column count)


def _schema_verdict(meta, table: str) -> tuple[str | None, tuple[str, ...], int]:
    """(schema problem or None, column names, leaf index of the version column) of a footer; the files of a
    table nearly all share one schema, so it is worked out once per distinct schema (half the cost per file)."""
    key = (table, (meta.metadata or {}).get(b"ARROW:schema"), meta.num_columns)
    if key[1] is None or key not in _VERDICTS:
        schema = meta.schema.to_arrow_schema()
        column = VERSION_COLUMN.get(table, "policy_version")
        leaf = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == column), -1)
        _VERDICTS[key] = (schema_problem(schema, table), tuple(schema.names), leaf)
    return _VERDICTS[key]


def file_columns(path: Path) -> tuple[str, ...]:
    """A committed file's column names (from the footer `check_file` read, when it did)."""
    stat = path.stat()
    found = _COLUMNS.get((path, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return found if found is not None else tuple(pq.read_schema(path).names)


def _version_problem(path: Path, meta, leaf: int, version: int) -> str | None:
    """Whether every row's version column (Parquet leaf `leaf`) equals the directory's `version`, from
    row-group statistics (read from the column itself only for a writer that kept none)."""
    column = meta.schema.column(leaf).path
    low = high = None
    nulls = 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        if group.num_rows == 0:
            continue
        stats = group.column(leaf).statistics
        if stats is None or not stats.has_min_max or not stats.has_null_count:
            import pyarrow.compute as pc

            values = pq.read_table(path, columns=[column]).column(column)
            nulls, (low, high) = values.null_count, pc.min_max(values).values()
            low, high = low.as_py(), high.as_py()
            break
        nulls += stats.null_count
        low = stats.min if low is None else min(low, stats.min)
        high = stats.max if high is None else max(high, stats.max)
    if nulls:
        return f"column '{column}' holds {nulls} null value(s)"
    if low is not None and (low, high) != (version, version):
        held = f"{low}" if low == high else f"{low} to {high}"
        return f"column '{column}' holds version {held}, but the file is under version={version:04d}"


_REPORTED: set[Path] = set()  # files already reported as left out by this process


def report_stray(path: Path, table: str) -> None:
    _report_once(path, f"not a shard of table {table}; left out (by SQL and by the stages alike)")


def _report_once(path: Path, text: str) -> None:
    if path not in _REPORTED:
        _REPORTED.add(path)
        print(f"roll: warning: {path}: {text}", file=sys.stderr)


def admit(path: Path, table: str, version: int | None, mismatched: str = "refuse") -> bool:
    """Whether a committed file is read as `table` of `version`: True when its content matches its place;
    otherwise a RollError naming the file, or with mismatched="skip" one line on stderr and False."""
    problem = check_file(path, table, version).problem
    if problem is None:
        return True
    if mismatched == "skip":
        _report_once(path, f"{problem}; left out")
        return False
    raise RollError(f"{path}: {problem}; nothing reads it (move it out of the run)")


