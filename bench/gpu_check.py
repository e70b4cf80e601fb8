"""GPU check: roll's generate and train on CUDA for a 0.5 B Qwen2-shaped model, against transformers' own
continuous batching, plus the small default model, FSDP and `roll iterate`.

    python bench/gpu_check.py --out DIR      # one CUDA GPU (an H200: well under 8 min); writes DIR/gpu_check.json
    python bench/gpu_check.py --out DIR --device cpu --small-only --qwen-shape tiny --prompts 8 --max-new-tokens 32

(the second line is a CPU dry run of every part but `iterate`, in about two minutes). The parts, in order; each
is guarded — a failing part records its error and the rest still run — and the JSON is rewritten after every
part, so a run cut short keeps what it measured:

1. default: the embedded default model (GPT-2 d=192 × 4, 1.8 M): `roll init`, `roll generate`, `roll train`
   as subprocesses (a user's commands): their summaries and train tokens/s.
2. fsdp: the default model's update again under `torchrun --nproc-per-node 1 -m roll train --fsdp` (NCCL,
   FSDP2): max |difference| of its v1 weights from the plain update's.
3. qwen_cli: a Qwen2 model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864,
   vocabulary 151,936, tied embeddings, 4096 positions; 494 M parameters) with RANDOM weights in bfloat16,
   and a byte-level BPE tokenizer trained here on the bundled GSM8K problems with a Qwen chat template
   (`<|im_end|>` ends a turn) — nothing is downloaded. `roll init --task gsm8k --dtype bfloat16`, `roll generate
   --prompts 64 --group-size 8 --max-new-tokens 256` and one `roll train` update, as subprocesses: tokens/s of
   each, model FLOPs utilisation (MFU) against the H200's dense bf16 peak, and the peak device memory in use
   during each (polled with cudaMemGetInfo from this process).
4. qwen_sampler: the same checkpoint loaded here, `roll.sampling.sample_batch` on the same prompt token ids with
   roll generate's seeds and batching: tokens/s, peak `torch.cuda.max_memory_allocated`, whether the tokens
   equal the subprocess's, and its log-probs against teacher-forced ones.
5. qwen_train_micro_batch: one training micro-batch as `roll train` runs it (64 completions, float32 weights
   under bf16 autocast) through `roll.sampling.completion_logprobs`, forward and backward: peak memory, tokens/s.
6. iterate (not with --small-only): three `roll iterate` iterations of a random GPT-2 d=768 × 12 (86 M) with the
   default tokenizer: seconds per stage, and each version's generate and train tokens/s from the run's tables.
7. qwen_vllm: `roll generate --backend vllm --force` of the same version and settings as part 3 (recorded as
   skipped where vLLM is not installed): sampling tokens/s and start-up seconds beside the hf backend's.
8. qwen_generate_batch: transformers' continuous batching, `model.generate_batch`, on the same prompt token ids
   and the same model, 8 samples each (`num_return_sequences`), max_new_tokens 256, temperature 1, log-probs
   returned: tokens/s against roll's sampler (part 4), and its log-probs against teacher-forced ones. Last,
   because it sizes its KV cache from the free memory and its run time is the least known.

A random model with a 152k vocabulary almost never draws `<|im_end|>`, so nearly every completion runs to the
256-token limit: the numbers are for full-length sampling. MFU counts 2·N FLOPs per generated token and 6·N per
trained completion token (N with the tied embedding counted once; see `parameter_count`, `qwen_cli`).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

# NVIDIA H200 (SXM) dense BF16 tensor-core peak, without sparsity: 989 TFLOP/s (the same as H100 SXM).
PEAK_FLOPS = 989e12

QWEN_SHAPES = {  # Qwen2.5-0.5B's shape, and a tiny one for a CPU dry run
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 2048},
}
QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ----------------------------------------------------------------------------------------------- helpers

def roll(*args: str, env: dict | None = None, timeout: float = 600) -> dict:
    """Run `python -m roll ARGS` and return its JSON summary, with its wall time."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "roll", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"roll {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = proc.stdout.strip()
    summary = json.loads(out[out.index("{"):]) if "{" in out else {}
    summary["wall_s"] = round(time.perf_counter() - started, 2)
    return summary


def train_tokens_per_s(run: Path, version: int) -> dict:
    """Completion tokens over optimiser-step seconds of update `version` (the steps table)."""
    from roll.store import Run, query

    sql = f"select sum(tokens), sum(seconds) from steps where policy_version = {version}"
    tokens, seconds = query(Run(run), sql).fetchone()
    return {"train_tokens": int(tokens), "train_step_seconds": round(seconds, 3),
            "train_tokens_per_s": round(tokens / seconds, 1)}


def gib(n_bytes: float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2 ** 30, 2)


class DeviceMemoryPeak:
    """Peak memory in use on GPU 0 by every process (cudaMemGetInfo), polled every 50 ms while the block runs,
    minus what was in use when it started: a subprocess's own peak, allocator cache and CUDA context included.
    `peak_gib` is None without CUDA."""

    def __enter__(self):
        import torch

        self.peak_gib, self.cuda = None, torch.cuda.is_available()
        if self.cuda:
            self.baseline = self.used()
            self.peak, self.stop = self.baseline, threading.Event()
            self.thread = threading.Thread(target=self.poll, daemon=True)
            self.thread.start()
        return self

    def used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info(0)
        return total - free

    def poll(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.05)

    def __exit__(self, *exc):
        if self.cuda:
            self.stop.set()
            self.thread.join()
            self.peak_gib = gib(self.peak - self.baseline)
        return False


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    gc.collect()  # the previous part's models
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    import torch

    return gib(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None


# ------------------------------------------------------------------------------------------------ models

def big_model(directory: Path) -> Path:
    """A random GPT-2 d=768 × 12 (86 M) with the embedded default's tokenizer."""
    from roll.policy import build_default_model, build_default_tokenizer

    tokenizer = build_default_tokenizer()
    model = build_default_model(tokenizer, d_model=768, layers=12, heads=12)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def qwen_checkpoint(directory: Path, shape: str) -> Path:
    """A Qwen2 checkpoint of `shape` with random weights in bfloat16, and a chat tokenizer made here: a byte-level
    BPE (2,000 tokens) trained on the bundled GSM8K train problems, Qwen's chat template, `<|im_end|>` as eos.
    The model keeps the shape's vocabulary (Qwen's 151,936): ids past the tokenizer's are never real text, but
    the output head, the log-softmax and the sampler all work at the real size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from roll.data import DATA_DIR

    texts = [json.loads(line)["problem"] for line in (DATA_DIR / "gsm8k" / "train.jsonl").read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=special, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = QWEN_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(**QWEN_SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True,
                         rope_theta=1e6, eos_token_id=eos, bos_token_id=None,
                         pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[eos], bos_token_id=None)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def parameter_count(directory: Path) -> int:
    """Parameters of a checkpoint, the tied embedding counted once: in 6·N·tokens it stands for the output head's
    matmul (2·d·V FLOPs a token forward), while the embedding lookup costs nothing."""
    from safetensors import safe_open

    n = 0
    for path in Path(directory).glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            n += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118 (not a dict)
    return n


def mfu(flops_per_s: float) -> float:
    return round(flops_per_s / PEAK_FLOPS, 4)


# ------------------------------------------------------------------------------------------------- parts

def default_model(work: Path, device: str) -> dict:
    run = work / "default"
    init = roll("init", "--run", str(run))
    gen = roll("generate", "--run", str(run), "--device", device)
    trn = roll("train", "--run", str(run), "--device", device)
    return {"init": init, "generate": gen, "train": trn, **train_tokens_per_s(run, 1)}


def fsdp(work: Path, device: str) -> dict:
    """The default model's update v0 -> v1 again under torchrun --fsdp (one rank): the same v1 as the plain one."""
    from safetensors.torch import load_file

    from roll.store import Run

    run = work / "default"
    plain = load_file(Run(run).policy_dir(1) / "model.safetensors")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "roll", "train", "--version", "0", "--force", "--device", device, "--fsdp"],
                          capture_output=True, text=True, env={**os.environ, "ROLL_RUN": str(run)}, timeout=600,
                          check=False)
    result = load_file(Run(run).policy_dir(1) / "model.safetensors") if proc.returncode == 0 else None
    return {"returncode": proc.returncode, "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
            "max_abs_diff_vs_plain": max((result[k] - plain[k]).abs().max().item() for k in plain) if result else None,
            **(train_tokens_per_s(run, 1) if result else {})}


def qwen_cli(work: Path, args) -> dict:
    """roll init / generate / train on the Qwen2-shaped model, as subprocesses."""
    from roll.store import Run, query

    model_dir = qwen_checkpoint(work / "qwen-model", args.qwen_shape)
    n = parameter_count(model_dir)
    run = work / "qwen"
    init = roll("init", "--run", str(run), "--model", str(model_dir), "--task", "gsm8k", "--dtype", "bfloat16")
    with DeviceMemoryPeak() as gen_memory:
        gen = roll("generate", "--run", str(run), "--device", args.device, "--prompts", str(args.prompts),
                   "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens))
    with DeviceMemoryPeak() as train_memory:
        trn = roll("train", "--run", str(run), "--device", args.device)
    train = train_tokens_per_s(run, 1)
    prompt_tokens, completion_tokens, cut = query(Run(run), "select sum(len(prompt_token_ids)), sum(num_tokens), "
                                                  "avg((finish_reason = 'length')::int) from rollouts").fetchone()
    return {
        "parameters": n, "shape": {**QWEN_SHAPES[args.qwen_shape], "name": args.qwen_shape},
        "init": init, "generate": gen, "train": trn,
        "rollouts": {"prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
                     "fraction_at_length_limit": round(float(cut), 3)},
        "generate_tokens_per_s": gen["tokens_per_s"],
        # sampling: 2·N FLOPs per generated token (the prompts' prefill and attention over the cache not counted)
        "generate_mfu": mfu(2 * n * gen["tokens_per_s"]),
        "generate_peak_device_memory_gib": gen_memory.peak_gib,
        **train,
        # training: 6·N FLOPs per completion token (forward 2N + backward 4N). The steps table counts completion
        # tokens only; the prompts also run through the backbone (and the head is recomputed), not counted here.
        "train_mfu": mfu(6 * n * train["train_tokens_per_s"]),
        "train_peak_device_memory_gib": train_memory.peak_gib,
    }


def qwen_vllm(work: Path, args, hf_generate: dict) -> dict:
    """`roll generate --backend vllm --force` of the same version with the same settings as qwen_cli's hf run, as a
    subprocess: sampling tokens/s (start-up excluded) and start-up seconds beside the hf backend's."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here (pip install 'roll[vllm]')"}
    gen = roll("generate", "--run", str(work / "qwen"), "--device", args.device, "--backend", "vllm", "--force",
               "--prompts", str(args.prompts), "--group-size", str(args.group_size),
               "--max-new-tokens", str(args.max_new_tokens),
               # this process still holds the parts before it; vLLM sizes its KV cache from the share it is given
               "--vllm-arg", "gpu_memory_utilization=0.5")
    return {"generate": gen, "tokens_per_s": gen["tokens_per_s"], "startup_seconds": gen.get("startup_seconds"),
            "hf_tokens_per_s": hf_generate["tokens_per_s"], "hf_startup_seconds": hf_generate.get("startup_seconds"),
            "speedup": round(gen["tokens_per_s"] / hf_generate["tokens_per_s"], 2)}


def qwen_prompts(run: Path) -> tuple[list[str], list[list[int]], list[list[int]]]:
    """(prompt ids, prompt token ids) in the order roll generate drew them, and every row's completion tokens."""
    import pyarrow.parquet as pq

    from roll.store import Run, Shard

    table = pq.read_table(Run(run).shard_path("rollouts", 0, Shard(0, 1))).to_pydict()
    ids, prompts = [], []
    for pid, tokens, index in zip(table["prompt_id"], table["prompt_token_ids"], table["sample_index"]):
        if index == 0:
            ids.append(pid)
            prompts.append(tokens)
    return ids, prompts, table["token_ids"]


def logprob_gap(model, prompts: list[list[int]], completions: list[list[int]], logprobs: list[list[float]]) -> dict:
    """A sampler's log-probs against roll's teacher-forced ones (completion_logprobs, same model, same tokens)."""
    import torch

    from roll.sampling import completion_logprobs

    with torch.no_grad():
        forced, mask = completion_logprobs(model, prompts, completions, temperature=1.0)
    sampled = torch.zeros_like(forced)
    for row, values in enumerate(logprobs):
        sampled[row, :len(values)] = torch.tensor(values, dtype=sampled.dtype)
    gap = (sampled - forced).abs()[mask]
    return {"rows": len(prompts), "mean_abs": round(gap.mean().item(), 5), "max_abs": round(gap.max().item(), 5)}


def roll_sampler(policy_dir, prompt_ids, prompts, row_prompts, completions, n: int, args) -> dict:
    """roll's hf sampler (`sample_batch`) in this process on the bf16 checkpoint, with roll generate's prompts,
    seeds and batching (256 rows a forward pass): tokens/s and peak memory allocated."""
    from roll.policy import load_policy
    from roll.sampling import group_seeds, sample_batch, stop_token_ids

    model, tokenizer = load_policy(policy_dir, args.device)  # in the checkpoint's dtype, as roll generate samples
    stops = stop_token_ids(model.generation_config, tokenizer)
    common = {"temperature": 1.0, "top_p": 1.0, "eos_id": stops, "pad_id": tokenizer.pad_token_id,
              "group_size": args.group_size}
    sample_batch(model, prompts[:1], max_new_tokens=4, seeds=list(range(args.group_size)), **common)  # warm-up
    per_batch = max(1, 256 // args.group_size)
    reset_peak(args.device)
    sync(args.device)
    started = time.perf_counter()
    samples = []
    for start in range(0, len(prompts), per_batch):
        seeds = group_seeds(0, 0, prompt_ids[start:start + per_batch], args.group_size)  # roll generate's seeds
        samples += sample_batch(model, prompts[start:start + per_batch], max_new_tokens=args.max_new_tokens,
                                seeds=seeds, **common)
    sync(args.device)
    seconds = time.perf_counter() - started
    memory = peak_gib(args.device)
    tokens = sum(len(s.token_ids) for s in samples)
    rows = min(64, len(samples))
    gap = logprob_gap(model, row_prompts[:rows], [s.token_ids for s in samples[:rows]],
                      [s.logprobs for s in samples[:rows]])
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "mfu": mfu(2 * n * tokens / seconds), "peak_memory_allocated_gib": memory,
            "same_tokens_as_roll_generate": [s.token_ids for s in samples] == completions,
            "logprob_gap_vs_teacher_forced": gap}


def train_micro_batch(policy_dir, prompt_ids, prompts, row_prompts, completions, n: int, args) -> dict:
    """One training micro-batch as `roll train` runs it (float32 weights, bf16 autocast, its default 64 rows):
    completion_logprobs forward and backward of a policy-gradient-shaped loss; no optimiser step (AdamW's state
    would add 8 bytes a parameter, the gradients 4)."""
    import torch

    from roll.policy import load_policy
    from roll.sampling import completion_logprobs

    model, _ = load_policy(policy_dir, args.device, to_train=True)
    model.train()
    rows = min(64, len(completions))
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"

    def step() -> int:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            logprobs, mask = completion_logprobs(model, row_prompts[:rows], completions[:rows], temperature=1.0)
            loss = -(logprobs * mask).sum() / mask.sum()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return int(mask.sum())

    step()  # warm-up
    reset_peak(args.device)
    sync(args.device)
    started = time.perf_counter()
    tokens = step()
    sync(args.device)
    seconds = time.perf_counter() - started
    return {"rows": rows, "completion_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "mfu": mfu(6 * n * tokens / seconds),
            "peak_memory_allocated_gib": peak_gib(args.device)}


def generate_batch(policy_dir, prompt_ids, prompts, row_prompts, completions, n: int, args,
                   roll_tokens_per_s: float | None) -> dict:
    """transformers' continuous batching (`model.generate_batch`) on the same prompt token ids and the same bf16
    model: `num_return_sequences` samples each, with each token's log-prob (`return_logprobs`: log softmax of the
    processed logits, the sampling distribution)."""
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    from roll.policy import load_policy
    from roll.sampling import stop_token_ids

    model, tokenizer = load_policy(policy_dir, args.device)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=None, num_return_sequences=args.group_size, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=stop_token_ids(model.generation_config, tokenizer))
    cache = {}  # on a GPU the default: a KV cache of 90 % of the free memory
    if not args.device.startswith("cuda"):  # on a CPU 60 % of the machine's RAM: size it to the work instead
        blocks_per_row = math.ceil((max(map(len, prompts)) + args.max_new_tokens) / 256)  # 256-token pages
        cache["num_blocks"] = len(prompts) * args.group_size * blocks_per_row
    reset_peak(args.device)
    sync(args.device)
    started = time.perf_counter()
    batching = ContinuousBatchingConfig(return_logprobs=True, seed=0, **cache)
    outputs = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=batching)
    sync(args.device)
    seconds = time.perf_counter() - started
    memory = peak_gib(args.device)
    outputs = list(outputs.values())  # each prompt's samples together, in prompt order
    tokens = sum(len(o.generated_tokens) for o in outputs)
    at_limit = sum(len(o.generated_tokens) == args.max_new_tokens for o in outputs)
    # lifespan: from a request's first scheduling to its end, so the span leaves out set-up and CUDA-graph warm-up
    span = max(o.lifespan[1] for o in outputs) - min(o.lifespan[0] for o in outputs)
    rows = min(64, len(outputs))
    gap = logprob_gap(model, [o.prompt_ids for o in outputs[:rows]], [o.generated_tokens for o in outputs[:rows]],
                      [o.logprobs for o in outputs[:rows]])
    return {"sequences": len(outputs), "errors": sum(o.error is not None for o in outputs),
            "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "mfu": mfu(2 * n * tokens / seconds),
            "generation_span_s": round(span, 3), "tokens_per_s_in_span": round(tokens / span, 1),
            "tokens_per_s_vs_roll_sampler": round(tokens / seconds / roll_tokens_per_s, 2) if roll_tokens_per_s
            else None,
            "fraction_at_length_limit": round(at_limit / len(outputs), 3), "logprob_gap_vs_teacher_forced": gap,
            "peak_memory_allocated_gib": memory, "memory_note": "its KV cache is allocated up front from free memory",
            "flash_attention_available": {"2": is_flash_attn_2_available(), "3": is_flash_attn_3_available()}}


def iterate(work: Path, device: str) -> dict:
    """Three `roll iterate` iterations of the 86 M GPT-2 (models kept loaded between stages)."""
    from roll.store import Run, query

    run = work / "iterate"
    roll("init", "--run", str(run), "--model", str(big_model(work / "big-model")))
    summary = roll("iterate", "--run", str(run), "--iterations", "3", "--eval-every", "0", "--device", device)
    versions = []
    for stages in summary["stage_seconds"]:
        v = stages["version"]
        tokens = query(Run(run), f"select sum(num_tokens) from rollouts where policy_version = {v}").fetchone()[0]
        versions.append({"version": v, "generate_tokens": int(tokens),
                         "generate_tokens_per_s": round(tokens / stages["generate"], 1),
                         **train_tokens_per_s(run, v + 1)})
    return {"stage_seconds": summary["stage_seconds"], "wall_s": summary["wall_s"], "versions": versions}


# -------------------------------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--work", default="/tmp/roll-gpu-check")
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    parser.add_argument("--small-only", action="store_true", help="skip the 86 M GPT-2 iterate part (a CPU dry run)")
    parser.add_argument("--qwen-shape", default="0.5b", choices=sorted(QWEN_SHAPES))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()

    import torch
    import transformers

    from roll.store import Run

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    report = {"torch": torch.__version__, "transformers": transformers.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "device": args.device,
              "peak_flops_bf16": PEAK_FLOPS, "settings": {"prompts": args.prompts, "group_size": args.group_size,
                                                          "max_new_tokens": args.max_new_tokens, "temperature": 1.0}}

    def part(name: str, function, *arguments):
        """Run one part; its result, or its error, goes into the report, which is rewritten at once."""
        part_started = time.perf_counter()
        try:
            result = function(*arguments)
        except Exception as exc:  # noqa: BLE001 — a failing part must not stop the others
            result = {"error": f"{type(exc).__name__}: {str(exc)[-2000:]}", "traceback": traceback.format_exc()[-3000:]}
        report[name] = result
        report.setdefault("part_seconds", {})[name] = round(time.perf_counter() - part_started, 1)
        printable = {k: v for k, v in result.items() if k != "traceback"} if isinstance(result, dict) else result
        print(json.dumps({name: printable}, indent=1, default=str), flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        return result

    part("default", default_model, work, args.device)
    part("fsdp", fsdp, work, args.device)
    cli = part("qwen_cli", qwen_cli, work, args)

    if "error" not in cli:
        run, n = work / "qwen", cli["parameters"]
        prompt_ids, prompts, completions = qwen_prompts(run)
        row_prompts = [p for p in prompts for _ in range(args.group_size)]  # the prompt of each rollout row
        qwen = (Run(run).policy_dir(0), prompt_ids, prompts, row_prompts, completions, n, args)
        part("qwen_sampler", roll_sampler, *qwen)
        part("qwen_train_micro_batch", train_micro_batch, *qwen)
    if not args.small_only:
        part("iterate", iterate, work, args.device)
    if "error" not in cli:  # after the parts that read the hf run's rows: it regenerates version 0 in place
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        part("qwen_vllm", qwen_vllm, work, args, cli["generate"])
    if "error" not in cli:  # last: it sizes its KV cache from the free memory, and its run time is the least known
        part("qwen_generate_batch", generate_batch, *qwen, report.get("qwen_sampler", {}).get("tokens_per_s"))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({"total_seconds": report["total_seconds"]}), flush=True)


if __name__ == "__main__":
    main()
