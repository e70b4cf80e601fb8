"""Checkpoint directories: the layout of policies/vNNNN/, policy.json, weights, master weights, LoRA
adapters and optimiser state, and committing one."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from roll.errors import RollError
from roll.store.commit import apply_umask, clear_stale_temporaries, os_error, temporary_path

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
POLICIES_DIR = "policies"
POLICY_DIR_NAME = re.compile(r"^v(\d{4,})$")


def policy_dir_name(version: int) -> str:
    return f"v{version:04d}"


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
    return None if settings is None else (Path(policy_dir).parent.parent.resolve() / POLICIES_DIR
                                          / policy_dir_name(int(settings["base"])))


DTYPES = ("auto", "bfloat16", "float16", "float32")


def checkpoint_dtype(path: str | Path) -> str:
    """The dtype a checkpoint directory stores its weights in: config.json's `dtype` (`torch_dtype` in files
    written before transformers 4.56), float32 when it says none; a LoRA version's is its base's."""
    base = adapter_base(path)
    if base is not None:
        return checkpoint_dtype(base)
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return dtype if dtype in DTYPES else "float32"


# Weight files a checkpoint directory may hold (full weights, masters, a LoRA adapter, sharded or .bin weights).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Above this size a weight file is hashed by samples (its size and 64 evenly spaced MiB), not read whole:
# sha256 ran at ~430 MB/s here (a 15 GB checkpoint: ~35 s per load), 64 samples of a 300 MiB file took 90-200 ms,
# and a swapped file differs in its first MiB already.
WHOLE_HASH_LIMIT = 256 << 20
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime, inode) → digest: a file replaced by hand has a new key


def weights_digest(directory: str | Path) -> str:
    """A content hash of a checkpoint's weight files (`policy.json` records its parent's as `parent_weights`):
    sha256 over their names and bytes, sampled above WHOLE_HASH_LIMIT: 30-70 ms for the default model's 7.3 MB
    (2 busy cores), once per file per process."""
    import hashlib

    total = hashlib.sha256()
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in Path(directory).glob(pattern)})
    for path in files:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if key not in _DIGESTS:
            digest = hashlib.sha256(str(stat.st_size).encode())
            with open(path, "rb") as f:
                if stat.st_size <= WHOLE_HASH_LIMIT:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                else:
                    for i in range(64):
                        f.seek(stat.st_size * i // 64)
                        digest.update(f.read(1 << 20))
            _DIGESTS[key] = digest.hexdigest()
        total.update(f"{path.name}:{_DIGESTS[key]}\n".encode())
    return "sha256:" + total.hexdigest()


def is_checkpoint(directory: Path) -> bool:
    """Whether `directory` is a committed version whose weights are still on disk (not collected by `roll gc`):
    its policy.json and a configuration file (config.json, or a LoRA version's adapter_config.json)."""
    return (directory / POLICY_META).is_file() and any((directory / name).is_file() for name in CHECKPOINT_CONFIGS)


def check_lineage(path: str | Path) -> None:
    """Refuse a run's version whose ancestors' weights are not the ones its line was trained from: each version
    on the chain of parents (policy.json) that records `parent_weights` is checked against its parent's weight
    files, where the parent's checkpoint is still on disk (gc deletes some). One line naming the swapped one."""
    path = Path(path)
    if not (path / POLICY_META).is_file() or path.parent.name != POLICIES_DIR:
        return
    policies = path.parent.parent.resolve() / POLICIES_DIR
    current, seen = policy_meta(path), set()
    while current.get("parent") is not None and current.get("version") not in seen:
        seen.add(current.get("version"))
        parent = policies / policy_dir_name(int(current["parent"]))
        recorded = current.get("parent_weights")
        if recorded and is_checkpoint(parent) and weights_digest(parent) != recorded:
            raise RollError(f"{parent}: its weights are not the ones v{current['version']:04d} was "
                            f"trained from ({recorded[:19]}… in v{current['version']:04d}/{POLICY_META}, "
                            f"{weights_digest(parent)[:19]}… on disk): replaced by hand? "
                            f"{path.name} is not loaded; restore it")
        if not (parent / POLICY_META).is_file():
            break
        current = policy_meta(parent)


def load_optimizer_state(directory: Path) -> dict | None:
    """The optimiser state committed with a checkpoint, or None when it has none (v0, --fresh-optimizer)."""
    import pickle

    import torch

    path = Path(directory) / OPTIMIZER_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise RollError(f"{path}: optimiser state cannot be read ({str(exc).splitlines()[0]})") from None


def commit_checkpoint(model, tokenizer, directory: Path, meta: dict, optimizer_state: dict | None = None,
                      dtype: str | None = None, adapter: bool = False) -> Path:
    """Commit a checkpoint directory atomically: write beside it, then rename into place.

    `optimizer_state` (AdamW's moments and step counts, the schedule, the global step) is written into the
    same directory, so the weights and the state the next update resumes from appear together or not at all.
    `dtype` (bfloat16 or float16) stores the weights in that dtype — what every stage then samples and scores
    with — and a float32 `model`'s exact weights beside them as the master weights training resumes from; the
    model itself is cast to `dtype` (its caller is done with it; `keep_loaded` keeps what the disk holds).
    An `adapter` (a PeftModel) commits itself alone, in float32 (DESIGN §3.1c); loading the version merges it.
    """
    import torch

    directory = Path(directory)
    tmp = temporary_path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(directory)  # a half-written checkpoint of a committer that was killed
        tmp.mkdir()
        target = getattr(torch, dtype) if dtype and dtype != "auto" and not adapter else None
        if target is not None and next(model.parameters()).dtype != target:
            from safetensors.torch import save_model

            if next(model.parameters()).dtype == torch.float32:
                save_model(model, str(tmp / MASTER_WEIGHTS))  # handles tied embeddings (one stored tensor)
            model.to(target)
        model.save_pretrained(tmp, safe_serialization=True)
        if adapter:
            (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model card
        tokenizer.save_pretrained(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIMIZER_STATE)
        (tmp / POLICY_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        apply_umask(tmp)  # safetensors writes its file 0600
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise os_error(exc, directory) from None
        if "(os error " in str(exc):  # safetensors reports I/O errors as SafetensorError("… (os error 28)")
            raise RollError(f"{directory}: {str(exc).splitlines()[0]} (nothing was committed)") from None
        raise
    return directory
