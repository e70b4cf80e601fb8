"""Policies in memory: the embedded default's tokenizer and tiny model, loading a checkpoint directory as a
model (its dtype, master weights, a LoRA version merged), the keep-loaded cache, prompts' token ids.

What a checkpoint directory holds on disk — `save_pretrained` files plus `policy.json`, written last inside
one atomic directory rename, the optimiser state, the weights' digest — is the store's (roll/store/checkpoint.py).
"""
from __future__ import annotations

import json
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


def build_default_model(tokenizer, d_model: int = 192, layers: int = 4, heads: int = 4, seed: int = 0,
                        positions: int = 128):
    """A GPT-2-style causal LM with random init (d=192, 4 layers, 128 positions: about 1.8 M parameters)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=positions, n_embd=d_model, n_layer=layers, n_head=heads,
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

    from roll.store import adapter_base, check_lineage

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
    """Commit `model` as the checkpoint directory `directory` (`roll.store.commit_checkpoint`: atomically,
    with its optimiser state, in `dtype` with float32 masters, a PeftModel as its adapter alone), then keep
    what the disk now holds in memory under `keep_loaded`."""
    from roll.lora import is_adapter
    from roll.store import commit_checkpoint

    adapter = is_adapter(model)
    commit_checkpoint(model, tokenizer, directory, meta, optimizer_state, dtype, adapter)
    device = str(next(model.parameters()).device).replace("cuda:0", "cuda")
    if adapter:  # a LoRA version in memory is unmerged: the stages load it merged (and not an older copy)
        if _LOADED is not None:
            _LOADED.pop(_cache_key(directory, device), None)
    else:
        _remember(directory, device, model, tokenizer)
    return directory


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
