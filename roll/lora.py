"""LoRA adapters through PEFT (DESIGN §3.1c): updates that train low-rank adapters on v0's frozen weights.

A LoRA version's directory holds its adapter (`adapter_model.safetensors`, `adapter_config.json`, float32), the
tokenizer, the AdamW state of the adapter's parameters and policy.json, whose `lora` entry names the rank, α and
the base version — v0, the run's own copy of the model, which `roll gc` always keeps. Every stage but train
merges the adapter into the base (W + (α/r)·B·A, in the base's dtype) and sees a plain model; train loads the
base in its own dtype (frozen weights need no float32 master copy) with the float32 adapter trainable, and
commits the adapter alone, inside the same atomic directory rename as a full checkpoint.

The adapted layers are PEFT's `all-linear` (every linear layer but the output head, verl's default); no dropout,
so π_θ is deterministic and an update's first ratios are 1, as in full fine-tuning.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from roll.errors import RollError

TARGETS = "all-linear"
BASE_VERSION = 0


@contextmanager
def quiet_peft():
    """PEFT warns once per GPT-2 Conv1D layer that it sets fan_in_fan_out itself, and reads a transformers
    attribute that transformers 5 deprecates: neither is the user's concern (stderr is for roll's one-liners)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out", category=UserWarning)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def peft_module():
    """The PEFT module, or one line saying how to install it."""
    try:
        import peft
    except ImportError:
        raise RollError("LoRA needs PEFT: pip install 'roll[lora]'") from None
    return peft


def is_adapter(model) -> bool:
    """Whether `model` is a PeftModel (without importing PEFT when nothing has: then it cannot be one)."""
    module = sys.modules.get("peft")
    return module is not None and isinstance(model, module.PeftModel)


def merged(base_model, directory: Path):
    """The base model with the adapter in `directory` merged into its weights: a plain transformers model."""
    with quiet_peft():
        return peft_module().PeftModel.from_pretrained(base_model, str(directory)).merge_and_unload()


def trainable(base_model, directory: Path):
    """The base model with the adapter in `directory` loaded trainable (a PeftModel): PEFT keeps the adapter's
    weights in float32 over a bf16 base (`autocast_adapter_dtype`), so the stored numbers load exactly."""
    with quiet_peft():
        return peft_module().PeftModel.from_pretrained(base_model, str(directory), is_trainable=True)


def check(parent: Path, parent_version: int, parent_settings: dict | None, rank: int, alpha: float) -> None:
    """Refuse, before anything is read or written, an update that cannot continue its parent: an adapter
    continued with another rank or α or trained in full, or a new adapter on a version other than v0."""
    if parent_settings is not None:
        if rank != parent_settings["rank"] or alpha != parent_settings["alpha"]:
            raise RollError(f"{parent}: holds a LoRA adapter of rank {parent_settings['rank']}, alpha "
                            f"{parent_settings['alpha']:g}; continue it with --lora-rank {parent_settings['rank']} "
                            f"--lora-alpha {parent_settings['alpha']:g}")
    elif rank and parent_version != BASE_VERSION:
        raise RollError(f"{parent}: was trained in full; LoRA adapts v{BASE_VERSION:04d} (start the run with "
                        f"--lora-rank, or leave it out)")


def adapt(model, rank: int, alpha: float, seed: int, dtype: str):
    """What update v → v+1 trains (`check` has passed): returns (the module to run forward and backward, the
    PeftModel to commit or None for full fine-tuning). A parent's adapter continues; a new one (B = 0, so it
    starts at the parent) is seeded by `seed`, over the base cast back to the run's `dtype` — the frozen base
    needs no float32 master copy, which halves a bf16 base's memory."""
    if is_adapter(model):
        return model.get_base_model(), model
    if rank == 0:
        return model, None
    import torch

    model.to(getattr(torch, dtype))
    torch.manual_seed(seed)
    peft = peft_module()
    with quiet_peft():
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                                                             lora_dropout=0.0))
    return adapted.get_base_model(), adapted


def settings(adapter) -> dict:
    """policy.json's `lora` entry for a committed adapter."""
    config = adapter.peft_config["default"]
    return {"rank": config.r, "alpha": config.lora_alpha, "base": BASE_VERSION, "targets": TARGETS}
