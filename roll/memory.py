"""Peak memory of generate, evaluate, score and train, estimated before any work from their options and the
checkpoint's shape (read from config.json and the safetensors headers: no weight is loaded), and refused in one
line, naming the options to lower, when it exceeds what the machine has available (DESIGN §6).

The terms, in bytes (b: bytes per weight of the checkpoint's dtype; V vocabulary, d hidden size, L layers, a
attention heads, kv the width of one position's keys (or values) in a layer; R rows in one batch, T their
longest prompt + completion, N the completion limit):

  weights      P·b, the parameter count P summed from the safetensors headers (score holds π_ref beside the
               behaviour checkpoint; train holds float32 weights)
  train state  P·12: float32 gradients and AdamW's two moments (none for a LoRA version's frozen base)
  vocabulary   R·V·(b + 20) at one sampling step: the model's logits, their float32 log-softmax (sampling_logprobs)
               and draw_tokens' float64 exp and cumulative sum; R·V·(b + 36) with top-p < 1 (the sort, its int64
               order, the cumulative mass). Score and train take the head in chunks of HEAD_CHUNK_ELEMENTS / (R·V)
               positions (roll.sampling.completion_logprobs); under autograd the chunk is kept for backward twice.
  KV cache     2·L·R·kv·T·b while sampling, plus one layer's copy while DynamicCache concatenates a step
  activations  forward without grad: R·T·(2d + intermediate)·b + R·a·T²·4 (eager attention scores);
               train, per layer kept for backward: R·T·d·(34 + 5·a·T/d)·b/2 (Korthikanti et al. 2022, eq. 2),
               only R·T·d·b per layer with --gradient-checkpointing (plus one layer recomputed)
  rows         host memory of the rows in Python and Arrow: ROW_BYTES per token of prompt + completion

On a GPU the device terms are compared with torch.cuda.mem_get_info's free bytes and the rows with the host's
available memory; on the CPU all of them with MemAvailable (/proc/meminfo). tests/test_bounds.py measures a
real `roll generate`'s peak against this estimate.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from roll.errors import RollError

# Per token of a row held on the host: the sampled token id and log-prob as Python objects (8-byte list pointer +
# a 28-byte int or 24-byte float), the prompt ids copied into every row, then Arrow's int32/float32 columns.
ROW_BYTES = 120
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
CONFIG_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a checkpoint."""
    parameters: int
    weight_bytes: int  # bytes per weight in the checkpoint's dtype
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_width: int  # key width per position and layer (kv heads × head size)
    intermediate: int
    context: int | None
    plain_head: bool  # roll.sampling takes the output head in chunks


@dataclass
class Estimate:
    """Named terms in bytes, on the device (the GPU, or the CPU) and on the host."""
    what: str
    lower: str  # the options that shrink it, as the refusal names them
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    def total(self, on_gpu: bool = False) -> int:
        return sum(self.device.values()) + (0 if on_gpu else sum(self.host.values()))


def safetensors_parameters(directory: Path) -> tuple[int, int]:
    """(parameter count, bytes) of a checkpoint's safetensors files, from their JSON headers only."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in directory.glob("*.safetensors") if p.name != "master.safetensors"]
    count = size = 0
    for name in files:
        with open(directory / name, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, tensor in header.items():
            if key != "__metadata__":
                elements = math.prod(tensor["shape"])
                count += elements
                size += elements * DTYPE_BYTES.get(tensor["dtype"], 4)
    return count, size


def checkpoint_shape(policy_dir: str | Path) -> Shape:
    """The checkpoint's shape from config.json and the safetensors headers (a LoRA version's: its base's)."""
    from roll.sampling import PLAIN_HEAD_MODELS
    from roll.store import adapter_base

    directory = Path(adapter_base(policy_dir) or policy_dir)
    try:
        config = json.loads((directory / "config.json").read_text())
        config = {**config.get("text_config", {}), **config}

        def first(*names, default=None):
            return next((config[n] for n in names if config.get(n)), default)

        vocab, hidden = int(first("vocab_size")), int(first("hidden_size", "n_embd", "d_model"))
        layers, heads = int(first("num_hidden_layers", "n_layer")), int(first("num_attention_heads", "n_head"))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise RollError(f"{directory / 'config.json'}: cannot read the model's shape ({exc})") from None
    head_size = int(first("head_dim", default=hidden // heads))
    count, size = safetensors_parameters(directory)
    if count == 0:  # no safetensors (a .bin checkpoint): GPT-2's count, 12·L·d² + V·d
        count = 12 * layers * hidden ** 2 + vocab * hidden
    dtype = str(first("dtype", "torch_dtype", default="float32")).removeprefix("torch.")
    weight_bytes = CONFIG_DTYPE_BYTES.get(dtype, round(size / count) if size else 4)
    context = first("n_positions", "max_position_embeddings")
    return Shape(parameters=count, weight_bytes=weight_bytes, vocab=vocab, hidden=hidden, layers=layers, heads=heads,
                 kv_width=int(first("num_key_value_heads", default=heads)) * head_size,
                 intermediate=int(first("intermediate_size", "n_inner", default=4 * hidden)),
                 context=int(context) if context else None, plain_head=config.get("model_type") in PLAIN_HEAD_MODELS)


def forward_activations(shape: Shape, rows: int, length: int) -> int:
    """One forward pass without autograd: a layer's hidden states and MLP, and eager attention's scores."""
    return (rows * length * (2 * shape.hidden + shape.intermediate) * shape.weight_bytes
            + rows * shape.heads * length * length * 4)


def sampling(shape: Shape, *, prompts: int, group_size: int, batch_size: int, prompt_tokens: int, max_new_tokens: int,
             top_p: float, what: str, lower: str) -> Estimate:
    """roll.rollouts.sample_rollouts: batches of max(1, batch_size // G) prompts × G rows."""
    rows = min(prompts, max(1, batch_size // group_size)) * group_size
    length = min(prompt_tokens, shape.context or prompt_tokens) + max_new_tokens
    b = shape.weight_bytes
    kv = 2 * shape.layers * rows * shape.kv_width * length * b
    return Estimate(what, lower, device={
        "weights": shape.parameters * b,
        "vocabulary": rows * shape.vocab * (b + (20 if top_p >= 1 else 36)),
        "KV cache": kv + kv // shape.layers,
        "activations": forward_activations(shape, min(prompts, max(1, batch_size // group_size)), length),
    }, host={"rows": prompts * group_size * length * ROW_BYTES})


def head_positions(shape: Shape, batch: int, completion: int) -> int:
    """Positions of the output head at once: roll.sampling.completion_logprobs's chunk, or all of them."""
    from roll.sampling import HEAD_CHUNK_ELEMENTS

    return min(completion, max(1, HEAD_CHUNK_ELEMENTS // (batch * shape.vocab))) if shape.plain_head else completion


def scoring(shape: Shape, *, rows: int, batch_size: int, length: int, completion: int, models: int) -> Estimate:
    """roll.sampling.score_rows: teacher-forced batches of batch_size rows, the head in chunks."""
    batch = max(1, min(rows, batch_size))
    b = shape.weight_bytes
    return Estimate("score", "--batch-size", device={
        "weights": models * shape.parameters * b,
        "vocabulary": batch * head_positions(shape, batch, completion) * shape.vocab * (b + 20),
        "activations": forward_activations(shape, batch, length),
    }, host={"rows": rows * length * ROW_BYTES})


def training(shape: Shape, *, rows: int, micro_batch: int, length: int, completion: int, lora: bool,
             checkpointing: bool, world: int = 1, sharded: bool = False) -> Estimate:
    """stages/train.py's update: float32 weights, gradients and AdamW state, a micro-batch's activations."""
    batch = max(1, min(rows, micro_batch))
    per_layer = batch * length * shape.hidden * (34 + 5 * shape.heads * length / shape.hidden) * 2  # float32: b/2 = 2
    kept = shape.layers * batch * length * shape.hidden * 4 + per_layer if checkpointing else shape.layers * per_layer
    # a DDP/FSDP wrapper runs its own forward: the whole head at once (roll.sampling._plain_module)
    positions = head_positions(shape, batch, completion) if world == 1 else completion
    weights = shape.parameters * (shape.weight_bytes if lora else 4)
    state = 0 if lora else shape.parameters * 12
    share = world if sharded else 1
    return Estimate("train", "--micro-batch (or --gradient-checkpointing, --lora-rank)", device={
        "weights": weights // share,
        "gradients and AdamW state": state // share,
        "activations": int(kept),
        "vocabulary": 2 * batch * positions * shape.vocab * 24,
    }, host={"rows": rows * length * ROW_BYTES})


def available(device: str) -> tuple[int, int, str]:
    """(device bytes free, host bytes available, where): torch.cuda.mem_get_info on a GPU; the host's from
    MemAvailable in /proc/meminfo, else psutil, else the free pages."""
    host = None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    if host is None:
        try:
            import psutil

            host = psutil.virtual_memory().available
        except ImportError:
            host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, host, device
    return host, host, "this machine"


def gib(size: int) -> str:
    return f"{size / 2 ** 30:.1f} GiB" if size >= 2 ** 30 else f"{size / 2 ** 20:.0f} MiB"


def check(estimate: Estimate, device: str) -> None:
    """Refuse, in one line naming the largest terms and the options to lower, an estimate over what is available.
    $ROLL_MEMORY_BYTES replaces the available memory (to try a machine's limit on another one)."""
    free, host, where = available(device)
    if os.environ.get("ROLL_MEMORY_BYTES"):
        free = host = int(os.environ["ROLL_MEMORY_BYTES"])
    on_gpu = device.startswith("cuda")
    over = []
    if estimate.total(on_gpu) > free:
        over.append((estimate.total(on_gpu), free, where, {**estimate.device, **({} if on_gpu else estimate.host)}))
    if on_gpu and sum(estimate.host.values()) > host:
        over.append((sum(estimate.host.values()), host, "the host", estimate.host))
    for need, have, place, terms in over:
        largest = ", ".join(f"{name} {gib(size)}" for name, size in sorted(terms.items(), key=lambda t: -t[1])[:3])
        raise RollError(f"{estimate.what} would need about {gib(need)} ({largest}) but {place} has {gib(have)} "
                        f"available; lower {estimate.lower}")


def check_sampling(policy_dir: Path, device: str, encoded: list[list[int]], *, group_size: int, batch_size: int,
                   max_new_tokens: int, top_p: float, what: str, lower: str) -> Estimate:
    """generate's and evaluate's check (the hf sampler) of `encoded` prompts, before the weights are loaded."""
    from roll.policy import pick_device

    shape = checkpoint_shape(policy_dir)
    estimate = sampling(shape, prompts=len(encoded), group_size=group_size, batch_size=batch_size,
                        prompt_tokens=max(map(len, encoded), default=0), max_new_tokens=max_new_tokens, top_p=top_p,
                        what=what, lower=lower)
    check(estimate, pick_device(device))
    return estimate


def rollout_lengths(paths: list[Path]) -> tuple[int, int, int, int]:
    """(rows in all, rows of the largest file, longest prompt + completion, longest completion) of rollout files,
    from two of their columns. A file that cannot be read counts as empty: the stage's own reader names it."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = largest = length = completion = 0
    for path in paths:
        try:
            table = pq.read_table(path, columns=["prompt_token_ids", "num_tokens"])
        except (OSError, pa.ArrowException):
            continue
        if table.num_rows:
            both = pc.add(pc.list_value_length(table.column("prompt_token_ids")), table.column("num_tokens"))
            length = max(length, pc.max(both).as_py() or 0)
            completion = max(completion, pc.max(table.column("num_tokens")).as_py() or 0)
        total, largest = total + table.num_rows, max(largest, table.num_rows)
    return total, largest, length, completion


def check_scoring(policy_dir: Path, device: str, paths: list[Path], *, batch_size: int, models: int) -> Estimate:
    """score's check, per rollout file (score holds one file's rows at a time), before a model loads."""
    _, largest, length, completion = rollout_lengths(paths)
    estimate = scoring(checkpoint_shape(policy_dir), rows=largest, batch_size=batch_size, length=length,
                       completion=completion, models=models)
    check(estimate, device)
    return estimate


def check_training(policy_dir: Path, device: str, paths: list[Path], *, micro_batch: int, lora: bool,
                   checkpointing: bool, world: int, sharded: bool) -> Estimate:
    """train's check over its lag window's rollout files (the trainer holds all their rows), before a model loads."""
    rows, _, length, completion = rollout_lengths(paths)
    estimate = training(checkpoint_shape(policy_dir), rows=rows, micro_batch=micro_batch, length=length,
                        completion=completion, lora=lora, checkpointing=checkpointing, world=world, sharded=sharded)
    check(estimate, device)
    return estimate
