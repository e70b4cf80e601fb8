"""The run directory: its layout, shard names, table schemas, atomic commits and DuckDB views (DESIGN §3.2).

Nothing else in roll builds a path inside a run by hand; every table is written and read through here, so
the schema is checked on both sides and a half-written file is never visible:

    run.toml                                      the run's configuration
    prompts/prompts.parquet                       prompt_id, task, split, prompt, answer, metadata
    policies/v0000/                               save_pretrained output + policy.json
    rollouts/version=0000/part-00000-of-00004.parquet
    verdicts/version=0000/…   scores/version=0000/…
    train/version=0001/steps.parquet   train/version=0001/groups.parquet
    evals/version=0001/<dataset>-<settings hash>.parquet
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from roll.errors import RollError

# ---------------------------------------------------------------------------------------------- schemas
# One schema per table. The required columns of DESIGN §3.2 are the contract SQL users rely on; the rest
# are what the stages need to stay reproducible (prompt tokens, sampler settings, verifier versions).


def _schema(*fields: tuple[str, pa.DataType], nullable: tuple[str, ...] = ()) -> pa.Schema:
    return pa.schema([pa.field(name, dtype, nullable=name in nullable) for name, dtype in fields])


_KEY = (("policy_version", pa.int64()), ("prompt_id", pa.string()), ("sample_index", pa.int64()))

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": _schema(
        ("prompt_id", pa.string()), ("task", pa.string()), ("split", pa.string()),
        ("prompt", pa.string()), ("answer", pa.string()), ("metadata", pa.string()),
    ),
    "rollouts": _schema(
        *_KEY,
        ("completion", pa.string()),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("token_ids", pa.list_(pa.int32())),
        ("behaviour_logprobs", pa.list_(pa.float32())),  # log-prob of each sampled token under the sampler
        ("num_tokens", pa.int64()),
        ("finish_reason", pa.string()),  # "stop" (a stop token emitted) or "length" (max_new_tokens reached)
        ("stop_token_id", pa.int64()),  # which stop token ended it (null at the length limit), as vLLM's stop_reason
        ("max_new_tokens", pa.int64()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("seed", pa.int64()),  # the row's sampling seed: prompt_seed(--seed, version, prompt_id) + sample_index
        ("backend", pa.string()),
        ("generation_id", pa.string()),  # content hash of the committed shard, stamped by Run.commit_shard
        nullable=("stop_token_id",),
    ),
    "verdicts": _schema(
        *_KEY,
        ("reward", pa.float64()), ("correct", pa.bool_()), ("extracted_answer", pa.string()),
        ("format_ok", pa.bool_()), ("verifier", pa.string()), ("milliseconds", pa.float64()),
        ("error", pa.string()),
        ("generation_id", pa.string()),  # of the rollouts verified: redone, never joined, when they change
    ),
    "scores": _schema(
        *_KEY,
        ("behaviour_logprob_sum", pa.float64()), ("ref_logprob_sum", pa.float64()),
        ("mismatch_max_abs", pa.float64()), ("mismatch_kl", pa.float64()),
        ("trainer_logprobs", pa.list_(pa.float32())), ("ref_logprobs", pa.list_(pa.float32())),
        ("group_size", pa.int64()), ("group_reward_mean", pa.float64()), ("group_reward_std", pa.float64()),
        ("generation_id", pa.string()),  # of the rollouts scored
        # null when scored with --no-ref: π_ref's forward pass is skipped unless the objective reads it
        nullable=("ref_logprob_sum", "ref_logprobs"),
    ),
    "steps": _schema(
        ("policy_version", pa.int64()), ("step", pa.int64()), ("objective", pa.string()),
        ("loss", pa.float64()), ("entropy", pa.float64()), ("kl_behaviour", pa.float64()),
        ("clip_fraction", pa.float64()), ("ess", pa.float64()), ("grad_norm", pa.float64()),
        ("lr", pa.float64()), ("tokens", pa.int64()), ("seconds", pa.float64()),
        ("ratio_min", pa.float64()), ("ratio_mean", pa.float64()), ("ratio_max", pa.float64()),
        ("global_step", pa.int64()),  # optimiser steps taken in the whole run before this one (DESIGN §3.1a)
        ("log_ratio_mean", pa.float64()),  # mean signed sequence Δ = log π_θ − log π_b over the step's samples
        ("log_ratio_sq_mean", pa.float64()),  # token-mean (log ρ)², M2PO's second moment of the token log-ratios
        ("lag_mean", pa.float64()),  # mean version lag of the step's samples
        ("stale_steps_mean", pa.float64()),  # mean optimiser steps since the samples' behaviour version
    ),
    "groups": _schema(
        ("policy_version", pa.int64()), ("data_version", pa.int64()), ("lag", pa.int64()),
        ("optimizer_steps", pa.int64()),  # optimiser steps since the behaviour version, when first used (DESIGN §3.1)
        ("prompt_id", pa.string()), ("objective", pa.string()), ("beta", pa.float64()),
        ("m", pa.float64()), ("k", pa.float64()), ("regime", pa.string()),
        ("induced_entropy", pa.float64()), ("boltzmann_entropy", pa.float64()),
        ("reward_mean", pa.float64()), ("reward_std", pa.float64()),
        ("step", pa.int64()),  # the update's optimiser step that first used the group
        ("log_ratio_mean", pa.float64()),  # mean signed Δ of the group's samples when first used
    ),
    "evals": _schema(
        ("policy_version", pa.int64()), ("dataset", pa.string()), ("prompt_id", pa.string()),
        ("sample_index", pa.int64()), ("correct", pa.bool_()), ("extracted_answer", pa.string()),
        ("num_tokens", pa.int64()),
        ("settings", pa.string()),  # JSON: k, limit, temperature, top_p, max_new_tokens, seed
    ),
    # roll ope: per stale row, its log-weight under a target version (DESIGN §7) …
    "ope": _schema(
        ("target_version", pa.int64()), *_KEY,  # policy_version: the behaviour version that sampled the row
        ("reward", pa.float64()), ("num_tokens", pa.int64()),
        ("target_logprob_sum", pa.float64()),  # log π_v(y | x) at the row's temperature and top-p
        ("behaviour_logprob_sum", pa.float64()),  # log π_b(y | x), the sampler's own
        ("log_weight", pa.float64()),  # their difference: the sequence's log importance weight
        ("generation_id", pa.string()),  # of the rollouts weighted
    ),
    # … and one row per (target version, data versions, δ, λ rule): the estimates
    "ope_summary": _schema(
        ("target_version", pa.int64()), ("data_lo", pa.int64()), ("data_hi", pa.int64()),
        ("prompts", pa.int64()), ("rows", pa.int64()), ("delta", pa.float64()), ("lambda_rule", pa.string()),
        ("lambda", pa.float64()), ("ls_estimate", pa.float64()), ("ls_bound", pa.float64()),
        ("ips", pa.float64()), ("log_ips", pa.float64()), ("snips", pa.float64()),
        ("ess", pa.float64()), ("ess_share", pa.float64()), ("heavy_share", pa.float64()),
    ),
}

# Float columns that must hold finite numbers: a NaN reward would silently poison every update downstream.
FINITE_COLUMNS = {"verdicts": ("reward",)}

# Tables written as shards per behaviour version, and the tables written once per produced version.
SHARDED_TABLES = ("rollouts", "verdicts", "scores")
TRAIN_TABLES = ("steps", "groups")
OPE_TABLES = ("ope", "ope_summary")
_GROUP = {"steps": "train", "groups": "train", "ope_summary": "ope"}  # table → its directory under the run

# Inside a policy directory: its record (parent, objective, settings, data versions), written last, so that
# its presence commits the version; it outlives the weights `roll gc` deletes.
POLICY_META = "policy.json"
# … beside the weights: the optimiser state the next update resumes (DESIGN §3.1a).
OPTIMIZER_STATE = "optimizer.pt"
# … and, for a checkpoint stored in bfloat16, the float32 master weights training continues from (DESIGN §3.1b).
MASTER_WEIGHTS = "master.safetensors"
# … and, for a LoRA version, its adapter in place of the weights: the version's policy.json names the base
# version it applies to (DESIGN §3.1c). A checkpoint directory is one holding either configuration file.
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_CONFIGS = ("config.json", ADAPTER_CONFIG)

_SHARD_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")


def shard_index(name: str) -> int:
    """i of a partition shard's file name part-i-of-N; 0 for any other file (an extra)."""
    match = _SHARD_RE.match(name)
    return int(match.group(1)) if match else 0


def settings_key(settings: dict) -> str:
    """A short content hash of a file's settings, part of its name: other settings, another file."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def data_window(version: int, lag: int, window: int) -> tuple[int, int]:
    """Behaviour versions [v − L − W + 1, v − L] read by update v → v+1, clamped at 0 (DESIGN §3.1)."""
    return max(0, version - lag - window + 1), max(0, version - lag)


def policy_meta(policy_dir: str | Path) -> dict:
    """A committed version's policy.json."""
    import json

    return json.loads((Path(policy_dir) / POLICY_META).read_text())


def adapter_settings(policy_dir: str | Path) -> dict | None:
    """A LoRA version's `lora` entry of policy.json ({rank, alpha, base, targets}); None for a full checkpoint
    (a directory without adapter_config.json)."""
    policy_dir = Path(policy_dir)
    if not (policy_dir / ADAPTER_CONFIG).is_file():
        return None
    try:
        settings = policy_meta(policy_dir)["lora"]
        int(settings["base"])
        return settings
    except (OSError, ValueError, KeyError, TypeError):
        raise RollError(f"{policy_dir}: a LoRA adapter without a committed policy.json naming its base version "
                        f"(roll runs only adapters it trained)") from None


def adapter_base(policy_dir: str | Path) -> Path | None:
    """The checkpoint directory a LoRA version's adapter applies to (a sibling version), None for a full
    checkpoint."""
    settings = adapter_settings(policy_dir)
    return None if settings is None else Run(Path(policy_dir).parent.parent).policy_dir(int(settings["base"]))

# Supplementary files of a version outside its i-of-N partition (apo's version-0 samples of later prompts).
_EXTRA_RE = re.compile(r"^extra-[A-Za-z0-9_.-]+\.parquet$")
_VERSION_RE = re.compile(r"^version=(\d{4,})$")
_POLICY_RE = re.compile(r"^v(\d{4,})$")
# temporary_path's names (.NAME.HOST-PID.tmp, a host name may hold dots) of the run's checkpoints, versions and files
_TEMPORARY_RE = re.compile(r"^\.(v\d{4,}|version=\d{4,}|.+?\.parquet)\..+\.tmp$")


def empty_table(name: str) -> pa.Table:
    return SCHEMAS[name].empty_table()


# ------------------------------------------------------------------------------------- validation and IO


def check_schema(table: pa.Table, name: str, where: str | Path) -> pa.Table:
    """Return `table` with exactly the columns of schema `name`, in order; refuse it naming file and column.

    Extra columns are tolerated on read (more columns are welcome) and dropped; a missing column, a column
    of another type, or a null in a column that may not hold one is refused.
    """
    schema = SCHEMAS[name]
    for field in schema:
        problem = _field_problem(table.schema, field, name)
        if problem:
            raise RollError(f"{where}: {problem}")
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            raise RollError(f"{where}: column '{field.name}' holds {column.null_count} null value(s)")
    for column_name in FINITE_COLUMNS.get(name, ()):
        import pyarrow.compute as pc

        finite = pc.is_finite(table.column(column_name)).combine_chunks()
        if finite.false_count:
            row = finite.to_pylist().index(False)
            value = table.column(column_name)[row].as_py()
            raise RollError(f"{where}: row {row} has {column_name} {value}; it must be a finite number")
    return table.select(schema.names)


def schema_problem(schema: pa.Schema, name: str) -> str | None:
    """Why a file of `schema` cannot be read as table `name` (a column missing or of another type), or None."""
    return next((problem for field in SCHEMAS[name] if (problem := _field_problem(schema, field, name))), None)


def _field_problem(schema: pa.Schema, field: pa.Field, name: str) -> str | None:
    index = schema.get_field_index(field.name)
    if index < 0:
        return f"{name} table has no column '{field.name}' (expected {field.type})"
    if not schema.field(index).type.equals(field.type):
        return f"column '{field.name}' has type {schema.field(index).type}, expected {field.type}"
    return None


def temporary_path(path: Path) -> Path:
    """Where a writer of `path` writes before renaming into place: hidden, named by host and pid, so another
    writer (on this host or another node of a shared file system) can tell whether its owner still lives."""
    path = Path(path)
    return path.parent / f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp"


def _owner_alive(stale: Path, name: str) -> bool:
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
        if _owner_alive(stale, name):
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


# ---------------------------------------------------------------------------- files match their places
# A file's place in the run says what it holds: its table (directory), behaviour version (version=NNNN) and
# shard (part-i-of-N). Every reader checks that its content agrees before reading it (`check_file`), so a file
# copied or renamed into another version or shard, or of another schema, is never read as what its place says.

PLACE_KEY = b"roll.place"  # in each Parquet footer: where write_table committed it, e.g. rollouts/version=0001/part-00000-of-00004.parquet
VERSION_COLUMN = {"ope": "target_version", "ope_summary": "target_version"}  # the other versioned tables: policy_version


def file_place(path: str | Path) -> str:
    """A file's place within its run: `table/version=NNNN/name` in a version directory, else `dir/name`."""
    path = Path(path)
    return "/".join(path.parts[-3:] if _VERSION_RE.match(path.parent.name) else path.parts[-2:])


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


def _columns(path: Path) -> tuple[str, ...]:
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
    return None


# --------------------------------------------------------------------------------------------- the run


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
        return self.root / "policies" / f"v{version:04d}"

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

    # what is committed -------------------------------------------------------------------------------
    def policy_versions(self) -> list[int]:
        """Versions that were committed (policy.json is written last, so its presence commits), including
        those whose checkpoint `roll gc` has since deleted: their policy.json stays as the record."""
        base = self.root / "policies"
        if not base.is_dir():
            return []
        found = (_POLICY_RE.match(p.name) for p in base.iterdir())
        return sorted(int(m.group(1)) for m in found if m and (base / m.group(0) / POLICY_META).is_file())

    def checkpoint_versions(self) -> list[int]:
        """Committed versions whose weights are still on disk (not collected by `roll gc`)."""
        return [v for v in self.policy_versions()
                if any((self.policy_dir(v) / name).is_file() for name in CHECKPOINT_CONFIGS)]

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
        bases = [self.root / "policies"] + [self.root / _GROUP.get(t, t) for t in (*SHARDED_TABLES, "steps", "evals", "ope")]
        for base in bases:
            entries = [e for d in ([base] + sorted(base.glob("version=*")) if base.is_dir() else []) for e in d.iterdir()]
            for entry in entries:
                stale = _TEMPORARY_RE.match(entry.name)
                if not stale or _owner_alive(entry, stale.group(1)):
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

    @contextmanager
    def lock(self, name: str, what: str, shared: bool = False):
        """One writer at a time for `name` (an update v → v+1, or the commits of one table version): an
        exclusive flock on `.locks/NAME.lock` in the run, held until the block ends and released by the
        kernel if the holder dies. A second process waits, saying once on stderr who holds it. `shared`: any
        number of shared holders at once, none while an exclusive one holds it (readers of a checkpoint).
        An OS error (no space for the lock file, a read-only run) is one line naming the lock file."""
        import fcntl

        path = self.root / ".locks" / f"{name}.lock"
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

    def commit_shard(self, table: str, version: int, name: str, data: pa.Table) -> Path:
        """Commit one file of a sharded table's version under that version's lock, refusing a partition
        shard whose layout (the N of i-of-N) differs from the shards already there (DESIGN §6)."""
        path = self.version_dir(table, version) / name
        with self.lock(f"{table}-{version:04d}", f"{table} of version {version}"):
            match = _SHARD_RE.match(name)
            if match:
                count = int(match.group(2))
                others = sorted(s.count for s in self.shards(table, version) if s.count != count)
                if others:
                    raise RollError(f"{self.version_dir(table, version)}: version {version} already has {table} in "
                                    f"{others[0]} shards (part-…-of-{others[0]:05d}); use --shard i/{others[0]}, "
                                    f"or --force to replace them")
            if table == "rollouts":
                data = stamp_generation(data)
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
            match = _SHARD_RE.match(path.name)
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
            match = _SHARD_RE.match(path.name)
            if (match or _EXTRA_RE.match(path.name)) and admit(path, table, version, mismatched):
                found[path.name] = path
                if match:
                    layouts.add(int(match.group(2)))
            elif not (match or _EXTRA_RE.match(path.name) or path.name.startswith(".")):
                _report_stray(path, table)
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
                         if _SHARD_RE.match(p.name) or _EXTRA_RE.match(p.name)])
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
            match = _VERSION_RE.match(directory.name)
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
        """An in-memory DuckDB connection with a view per table (and `samples`, their join).

        Views read the committed Parquet files directly, so a query sees every shard committed before it
        started and never a temporary file (hidden names that end in .tmp, which no view lists). With
        `versions`, the rollouts, verdicts and scores views list only those versions' files, so a lag
        window costs the same whatever the length of the history behind it. With `tables`, only those
        views are made: creating a view reads the footer of every file it lists, which over 100 versions
        of history was slower than the query itself. Every listed file has passed `check_file` (a file
        whose content disagrees with its place is refused, or with mismatched="skip" left out with a line
        on stderr); files are matched by column name, and unioned by name (which reads every footer again
        at bind time) only when their columns differ (a file with extra columns). `memory_limit` sets
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
                        f"SET allowed_directories = [{_sql_str(str(self.root) + os.sep)}]",
                        "SET enable_external_access = false",
                        "SET autoinstall_known_extensions = false",
                        "SET autoload_known_extensions = false",
                        "SET lock_configuration = true"):
            con.execute(setting)
        tables = set(SCHEMAS) | {"samples"} if tables is None else set(tables)
        wanted = tables | (SAMPLES_TABLES if "samples" in tables else set())
        for table in (t for t in SCHEMAS if t in wanted):
            files = self.committed_files(table, versions if table in SHARDED_TABLES else None, mismatched)
            if files:
                listed = "[" + ", ".join(_sql_str(str(f)) for f in files) + "]"
                union = len({_columns(f) for f in files}) > 1
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({listed}, "
                            f"union_by_name={str(union).lower()}, hive_partitioning=false)")
            else:  # a view over an empty Arrow table: the catalog lists the view alone
                con.from_arrow(empty_table(table)).create_view(table)
        if "samples" in wanted:
            con.execute(  # joined on the generation too: verdicts of replaced rollouts never match
                "CREATE VIEW samples AS SELECT * FROM rollouts "
                "LEFT JOIN verdicts USING (policy_version, prompt_id, sample_index, generation_id) "
                "LEFT JOIN scores USING (policy_version, prompt_id, sample_index, generation_id)"
            )
        return con


SAMPLES_TABLES = {"rollouts", "verdicts", "scores"}

_REPORTED: set[Path] = set()  # files already reported as left out by this process


def _report_stray(path: Path, table: str) -> None:
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
