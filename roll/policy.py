"""Policies: the embedded default's tokenizer and tiny model, and loading/saving of checkpoint directories.

A checkpoint is a plain `save_pretrained` directory plus `policy.json` (parent version, objective,
hyper-parameters, data versions). `policy.json` is written last and the directory is renamed into place,
so a version either exists whole or not at all.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from roll.errors import RollError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Characters of the arith task plus lower-case letters, so ordinary words still tokenize; "answer:" is one
# token because every solved completion ends with it.
CHARACTERS = "0123456789+-*=()Q: \n" + "abcdefghijklmnopqrstuvwxyz"


def build_default_tokenizer():
    """A character-level tokenizer (tokenizers library) wrapped as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ("answer:",) + tuple(dict.fromkeys(CHARACTERS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"answer:|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", model_max_length=128,
    )


def build_default_model(tokenizer, d_model: int = 192, layers: int = 4, heads: int = 4, seed: int = 0):
    """A GPT-2-style causal LM with random init (d=192, 4 layers: about 1.8 M parameters)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=d_model, n_layer=layers, n_head=heads,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def check_model_path(model: str | Path) -> None:
    """Refuse a model that is neither a local checkpoint directory nor a plausible hub id."""
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RollError(f"model path {path}: no config.json (not a transformers checkpoint directory)")
        return
    looks_like_hub_id = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise RollError(f"model path {model} does not exist")


def check_checkpoint(path: str | Path) -> None:
    """What `roll init` asks of a local checkpoint directory before it creates a run (DESIGN §6): weights that
    transformers can load and a tokenizer that encodes text, each refusal one line naming the directory and what
    is missing. Checked before the weights are read; a hub id is left to transformers' own loading."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    check_model_path(path)
    directory = Path(path)
    if not directory.is_dir():
        return
    # the files AutoModelForCausalLM.from_pretrained looks for in a directory, in its order
    names = [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]
    try:
        explicit = json.loads((directory / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None  # transformers' AutoConfig says what is wrong with config.json when the model loads
    if not any((directory / name).is_file() for name in names + ([explicit] if isinstance(explicit, str) else [])):
        raise RollError(f"model {directory}: no weights (no {', '.join(names[:-1])} or {names[-1]})")
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, there is no tokenizer to use
        reason = " ".join(str(exc).split())
        raise RollError(f"model {directory}: no tokenizer transformers can load (tokenizer.json, tokenizer_config.json "
                        f"or a vocabulary file): {reason[:200]}{'…' if len(reason) > 200 else ''}") from None
    check_tokenizer(directory, tokenizer)


TOKENIZER_PROBE = "Solve: 12 + 7 = ? The answer is 19."


def check_tokenizer(path: str | Path, tokenizer) -> None:
    """Refuse a tokenizer that encodes text to nothing: what transformers builds for a Qwen2 or GPT-2 directory
    without tokenizer files (an empty vocabulary), under which every prompt would be empty."""
    if not tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]:
        raise RollError(f"model {path}: no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file "
                        f"such as vocab.json or tokenizer.model): transformers builds an empty "
                        f"{type(tokenizer).__name__} that encodes every prompt to nothing")


# Policies kept in memory by `keep_loaded` (roll iterate runs every stage in one process): checkpoint
# directory → (model, tokenizer). None when not keeping; stages then read checkpoints from disk as usual.
_LOADED: dict | None = None
KEEP_AT_MOST = 3  # π_ref, the current policy, and one more (a lagged behaviour checkpoint)


@contextmanager
def keep_loaded():
    """Within this block, loading a checkpoint directory that was loaded or saved before returns the model in
    memory instead of reading it again. `load_policy(..., to_train=True)` takes the model out (training
    changes it in place); `save_policy` puts it back under its new directory."""
    global _LOADED
    previous, _LOADED = _LOADED, {}
    try:
        yield
    finally:
        _LOADED = previous


def _cache_key(path, device: str) -> tuple[str, str]:
    return str(Path(path).resolve()), device


def _remember(path, device: str, model, tokenizer) -> None:
    if _LOADED is not None:
        _LOADED[_cache_key(path, device)] = (model, tokenizer)
        while len(_LOADED) > KEEP_AT_MOST:  # forget the oldest but the first (in roll iterate: π_ref, v0)
            _LOADED.pop(list(_LOADED)[1])


DTYPES = ("auto", "bfloat16", "float16", "float32")


def checkpoint_dtype(path: str | Path) -> str:
    """The dtype a checkpoint directory stores its weights in: config.json's `dtype` (`torch_dtype` in files
    written before transformers 4.56), float32 when it says none; a LoRA version's is its base's."""
    from roll.store import adapter_base

    base = adapter_base(path)
    if base is not None:
        return checkpoint_dtype(base)
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return dtype if dtype in DTYPES else "float32"


def load_policy(path: str | Path, device: str = "cpu", to_train: bool = False):
    """Load (model, tokenizer) from a checkpoint directory (or hub id), in eval mode.

    To sample, score or evaluate: in the checkpoint's own dtype, so every stage computes with the numbers a
    user's bf16 checkpoint holds. `to_train`: in float32, from the float32 master weights committed beside
    bf16 weights when there are any (DESIGN §3.1b) — an AdamW step is often smaller than a bf16 weight's
    rounding step, so continuing from the rounded weights would drop it.

    Inside `keep_loaded`, a model already in memory is returned instead: shared when loaded to evaluate,
    handed over (and forgotten) when loaded `to_train` — unless it is not float32 (a bf16 sampler's copy).

    A LoRA version (DESIGN §3.1c) is its base checkpoint read from disk with the adapter merged in, or, to
    train, the base in its own dtype with the float32 adapter trainable (a PeftModel)."""
    import torch
    from transformers import AutoTokenizer

    from roll.store import adapter_base

    key = _cache_key(path, device)
    base = adapter_base(path)
    if _LOADED is not None and key in _LOADED:
        if not to_train:
            model, tokenizer = _LOADED[key]
            return model.eval(), tokenizer
        if base is None:  # a merged LoRA version stays: training reads its adapter from disk
            model, tokenizer = _LOADED.pop(key)
            if next(model.parameters()).dtype == torch.float32:
                return model.eval(), tokenizer
    check_model_path(base or path)
    check_lineage(path)
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        # a LoRA version's frozen base stays in its own dtype even to train: no master weights are needed
        model = read_weights(base or path, to_train and base is None)
        if base is not None:
            from roll import lora

            model = lora.trainable(model, Path(path)) if to_train else lora.merged(model, Path(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise RollError(f"model {path}: cannot be loaded ({str(exc).splitlines()[0]})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fuse_tanh_gelu(model)
    model.to(device).eval()
    if not to_train:
        _remember(path, device, model, tokenizer)
    return model, tokenizer


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


def check_lineage(path: str | Path) -> None:
    """Refuse a run's version whose ancestors' weights are not the ones its line was trained from: each version
    on the chain of parents (policy.json) that records `parent_weights` is checked against its parent's weight
    files, where the parent's checkpoint is still on disk (gc deletes some). One line naming the swapped one."""
    from roll.store import POLICY_META, Run, policy_meta

    path = Path(path)
    if not (path / POLICY_META).is_file() or path.parent.name != "policies":
        return
    run = Run(path.parent.parent)
    on_disk = set(run.checkpoint_versions())
    current, seen = policy_meta(path), set()
    while current.get("parent") is not None and current.get("version") not in seen:
        seen.add(current.get("version"))
        parent = int(current["parent"])
        recorded = current.get("parent_weights")
        if recorded and parent in on_disk and weights_digest(run.policy_dir(parent)) != recorded:
            raise RollError(f"{run.policy_dir(parent)}: its weights are not the ones v{current['version']:04d} was "
                            f"trained from ({recorded[:19]}… in v{current['version']:04d}/{POLICY_META}, "
                            f"{weights_digest(run.policy_dir(parent))[:19]}… on disk): replaced by hand? "
                            f"{path.name} is not loaded; restore it")
        if not (run.policy_dir(parent) / POLICY_META).is_file():
            break
        current = policy_meta(run.policy_dir(parent))


def read_weights(path: str | Path, to_train: bool):
    """A full checkpoint's model from disk: in its own dtype, or in float32 from the master weights when
    there are any (`to_train`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from roll.store import MASTER_WEIGHTS

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32 if to_train else "auto")
    master = Path(path) / MASTER_WEIGHTS
    if to_train and master.is_file():
        from safetensors.torch import load_model

        load_model(model, str(master))
    return model


def fuse_tanh_gelu(model) -> int:
    """Swap transformers' `gelu_new` modules (GPT-2's MLP: tanh-GELU as five separate tensor ops) for
    PyTorch's fused `gelu(approximate="tanh")`, the same function (≤ 3e-7 apart in float32). Sampler,
    scorer and trainer all load through here, so they stay consistent; the checkpoint's config is left as
    it is. On the default model it took 15 % off a training step (BENCHMARKS.md). Returns the swaps made."""
    from transformers.activations import ACT2FN, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])
                swapped += 1
    return swapped


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advisories: stderr is for roll's own one-liners."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def save_policy(model, tokenizer, directory: Path, meta: dict, optimizer_state: dict | None = None,
                dtype: str | None = None) -> Path:
    """Commit a checkpoint directory atomically: write beside it, then rename into place.

    `optimizer_state` (AdamW's moments and step counts, the schedule, the global step) is written into the
    same directory, so the weights and the state the next update resumes from appear together or not at all.
    `dtype` (bfloat16 or float16) stores the weights in that dtype — what every stage then samples and scores
    with — and a float32 `model`'s exact weights beside them as the master weights training resumes from; the
    model itself is cast to `dtype` (its caller is done with it; `keep_loaded` keeps what the disk holds).
    A PeftModel commits its adapter alone, in float32 (DESIGN §3.1c); loading the version merges it.
    """
    import torch

    from roll.lora import is_adapter
    from roll.store import (MASTER_WEIGHTS, OPTIMIZER_STATE, POLICY_META, apply_umask, clear_stale_temporaries,
                            os_error, temporary_path)

    directory = Path(directory)
    tmp = temporary_path(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        clear_stale_temporaries(directory)  # a half-written checkpoint of a committer that was killed
        tmp.mkdir()
        adapter = is_adapter(model)
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
    device = str(next(model.parameters()).device).replace("cuda:0", "cuda")
    if adapter:  # a LoRA version in memory is unmerged: the stages load it merged (and not an older copy)
        if _LOADED is not None:
            _LOADED.pop(_cache_key(directory, device), None)
    else:
        _remember(directory, device, model, tokenizer)
    return directory


def load_optimizer_state(directory: Path) -> dict | None:
    """The optimiser state committed with a checkpoint, or None when it has none (v0, --fresh-optimizer)."""
    import pickle

    import torch

    from roll.store import OPTIMIZER_STATE

    path = Path(directory) / OPTIMIZER_STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise RollError(f"{path}: optimiser state cannot be read ({str(exc).splitlines()[0]})") from None


def encode_prompts(tokenizer, prompts: list[str], metadata: list[str]) -> list[list[int]]:
    """Token ids of each prompt. A prompt already wrapped in the model's chat template carries its own special
    tokens (metadata "chat_template": true), so the tokenizer must not add a second BOS to it."""
    templated = [bool(json.loads(meta or "{}").get("chat_template")) if meta else False for meta in metadata]
    out: list[list[int]] = [[] for _ in prompts]
    for flag in (False, True):  # one batched call per kind (a fast tokenizer encodes a batch in parallel)
        where = [i for i, t in enumerate(templated) if t == flag]
        if where:
            for i, ids in zip(where, tokenizer([prompts[i] for i in where], add_special_tokens=not flag)["input_ids"]):
                out[i] = ids
    return out


def context_limit(config) -> tuple[int | None, str]:
    """The model's context in tokens and the config.json field that gives it (None when it says none)."""
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name)), name
    return None, ""


def check_context(config, prompt_tokens: list[list[int]], prompt_ids: list[str], max_new_tokens: int) -> None:
    """Refuse prompts that with `max_new_tokens` would run past the model's context (an index error inside
    the position embeddings otherwise)."""
    limit, _ = context_limit(config)
    if not limit:
        return
    longest = max(range(len(prompt_tokens)), key=lambda i: len(prompt_tokens[i]), default=None)
    if longest is not None and len(prompt_tokens[longest]) + max_new_tokens > limit:
        raise RollError(f"prompt '{prompt_ids[longest]}' has {len(prompt_tokens[longest])} tokens; with --max-new-tokens "
                        f"{max_new_tokens} it exceeds the model's context of {limit} tokens")


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RollError(f"--device {device}: no CUDA device is available to this process (torch {torch.__version__}); "
                        f"use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise RollError(f"--device {device}: choose auto, cpu or cuda")
    return device
