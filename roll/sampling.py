"""Batched sampling with a KV cache, and the log-probs of the distribution actually sampled.

`sampling_logprobs` is the single definition of "the distribution the sampler draws from" (temperature,
then top-p). Generation applies it to each incremental step; scoring applies it to a teacher-forced forward
pass; the two must agree token for token (tests hold them within 1e-4).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.utils.checkpoint


def sampling_logprobs(logits: torch.Tensor, temperature: float | torch.Tensor, top_p: float) -> torch.Tensor:
    """Log-probs (…, V) of the sampling distribution for raw `logits` (…, V).

    temperature > 0: log softmax(logits / T) restricted to the top-p nucleus (the smallest set of tokens,
    most probable first, whose mass reaches top_p; at least one token), renormalised.
    temperature == 0 (greedy): the sampled distribution is a point mass, whose log-prob is uselessly 0, so
    — as vLLM and TRL report it — we return the model's own log softmax(logits) at T = 1.
    A (B,) tensor of temperatures applies one per row (logits (B, …, V)): a training micro-batch can hold rows
    of versions sampled at different temperatures. Only with top_p = 1, which is how train calls it.
    """
    logits = logits.float()
    if isinstance(temperature, torch.Tensor):
        if top_p < 1.0:
            raise ValueError("per-row temperatures are only supported with top_p = 1")
        per_row = torch.where(temperature == 0, torch.ones_like(temperature), temperature).to(logits)
        return torch.log_softmax(logits / per_row.view(-1, *([1] * (logits.dim() - 1))), dim=-1)
    if temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # mass strictly before each token; a token is kept while that mass is still below top_p
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


@dataclass
class Sample:
    token_ids: list[int]  # generated tokens, the stop token included when one was emitted
    logprobs: list[float]  # sampling log-prob of each generated token
    finish_reason: str  # "stop" or "length"
    stop_token_id: int | None = None  # the stop token that ended it (vLLM's stop_reason), None at the length limit


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's eos and each id of the checkpoint's
    `generation_config.eos_token_id`, which chat models ship as a list (Llama-3-Instruct's <|eot_id|>,
    Qwen's <|im_end|> beside <|endoftext|>) — the ids transformers' `generate` and vLLM stop on."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def completion_text(tokenizer, sample: Sample) -> str:
    """The completion as text: its tokens without the stop token, special tokens dropped."""
    ids = sample.token_ids[:-1] if sample.stop_token_id is not None else sample.token_ids
    return tokenizer.decode(ids, skip_special_tokens=True)


def prompt_seed(seed: int, version: int, prompt_id: str) -> int:
    """The sampling seed of one prompt of one version: 56 bits of sha256(seed/version/prompt id). Sample j of
    the prompt uses seed + j — on the hf backend through `row_uniforms`, on vLLM as its per-request seed
    (vLLM seeds sample j of a request with seed + j) — so groups are independent across prompts, and a row's
    tokens do not depend on which shard or batch it was drawn in."""
    import hashlib

    digest = hashlib.sha256(f"{seed}/{version}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def group_seeds(seed: int, version: int, prompt_ids: list[str], group_size: int) -> list[int]:
    """Row seeds, prompt-major: prompt_seed(seed, version, id) + j for sample j of each prompt."""
    return [prompt_seed(seed, version, pid) + j for pid in prompt_ids for j in range(group_size)]


_MASK32 = 0xFFFFFFFF


def _pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """PCG-RXS-M-XS 32-bit hash (Jarzynski & Olano, "Hash Functions for GPU Rendering", 2020) of int64 values in
    [0, 2³²): integer arithmetic only, so it gives the same bits on every device. Products stay below 2⁶³."""
    state = (x * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return (word >> 22) ^ word


def row_uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in (0, 1) per row for generation step `step`: a counter-based stream keyed by the row's
    64-bit seed (an int64 tensor), float64 with 32 random bits. No generator state: row r's number at step
    t depends on (seed_r, t) only, not on the batch, the rows beside it or the device."""
    high, low = (seeds >> 32) & _MASK32, seeds & _MASK32
    counter = torch.full_like(seeds, step & _MASK32)
    bits = _pcg_hash(low ^ _pcg_hash(high ^ _pcg_hash(counter)))
    return (bits.double() + 0.5) / 2.0 ** 32


def draw_tokens(step_logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, on the logits' device: the first token whose cumulative probability (float64, in
    vocabulary order) exceeds u·total. Tokens of probability 0 (outside the top-p nucleus) have empty intervals
    and are never drawn."""
    cdf = step_logprobs.double().exp().cumsum(-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: the first real token is at position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _cache_argument(model) -> tuple[str, dict]:
    """transformers ≥ 5.2x calls the KV cache `cache`; earlier releases call it `past_key_values`."""
    params = inspect.signature(getattr(model, "module", model).forward).parameters  # through a DDP wrapper
    name = "cache" if "cache" in params else "past_key_values"
    # only the last position's logits are needed while sampling
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return name, extra


@torch.no_grad()
def prefill(model, prompt_ids: list[list[int]], pad_id: int, group_size: int):
    """Run the left-padded prompts through the model once and copy each prompt's cache, last logits, mask and
    positions to its G rows: (cache, (rows, V) logits, attention mask, position ids), rows prompt-major."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    positions = position_ids_from_mask(attention_mask)
    cache_arg, extra = _cache_argument(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **extra)
    past, logits = getattr(out, cache_arg), out.logits[:, -1, :]
    if group_size > 1:
        if hasattr(past, "batch_repeat_interleave"):
            past.batch_repeat_interleave(group_size)
        else:  # a legacy tuple cache: copy each layer's keys and values
            past = tuple(tuple(t.repeat_interleave(group_size, 0) for t in layer) for layer in past)
        logits = logits.repeat_interleave(group_size, 0)
        attention_mask, positions = attention_mask.repeat_interleave(group_size, 0), positions.repeat_interleave(group_size, 0)
    return past, logits, attention_mask, positions


@torch.no_grad()
def sample_batch(model, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
                 top_p: float, eos_id: int | list[int], pad_id: int, seeds: list[int],
                 group_size: int = 1) -> list[Sample]:
    """Sample `group_size` completions for each prompt in `prompt_ids`, with a KV cache; rows prompt-major.

    A row ends at the first token of `eos_id` (one id, or every stop id: see `stop_token_ids`). `seeds` holds
    one seed per row (prompts × G, see `group_seeds`): the row's random numbers come from `row_uniforms`, and
    tokens are drawn on the model's device (`draw_tokens`), so nothing of size vocabulary leaves the device.

    Prompts are left-padded so every row's next token sits in the last column. Each prompt is run through
    the model once and its cache copied to its G rows (`batch_repeat_interleave`): the prompt is a third of
    the tokens on the default task, so prefilling it G times was a quarter of all sampling work.
    """
    device = next(model.parameters()).device
    rows = len(prompt_ids) * group_size
    if len(seeds) != rows:
        raise ValueError(f"sample_batch: {len(seeds)} seeds for {rows} rows")
    stops = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)
    cache_arg, extra = _cache_argument(model)
    past, logits, attention_mask, positions = prefill(model, prompt_ids, pad_id, group_size)
    row_seeds = torch.tensor(seeds, dtype=torch.long, device=device)
    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)  # rows still sampling, in batch order
    for t in range(max_new_tokens):
        step_logprobs = sampling_logprobs(logits, temperature, top_p)  # (A, V), A = active rows
        if temperature == 0:
            next_ids = step_logprobs.argmax(-1)
        else:
            next_ids = draw_tokens(step_logprobs, row_uniforms(row_seeds[active], t))
        tokens[active, t] = next_ids
        logprobs[active, t] = step_logprobs.gather(-1, next_ids[:, None]).squeeze(-1)
        done = torch.isin(next_ids, stops) & ~finished[active]  # (a legacy cache keeps finished rows active)
        lengths[active[done]] = t + 1
        finished[active[done]] = True
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        positions = positions[:, -1:] + 1
        # drop finished rows from the batch (and the cache): completions end at very different lengths, and
        # computing rows that are done was about half of all sampling work on the default task
        if bool(done.any()) and hasattr(past, "batch_select_indices"):
            keep = (~done).nonzero().squeeze(-1)
            past.batch_select_indices(keep)
            active, step_ids, attention_mask, positions = active[keep], step_ids[keep], attention_mask[keep], positions[keep]
        elif bool(done.any()):  # a legacy tuple cache: keep computing finished rows, feeding them padding
            step_ids = torch.where(done[:, None], torch.full_like(step_ids, pad_id), step_ids)
        out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, **{cache_arg: past}, **extra)
        past, logits = getattr(out, cache_arg), out.logits[:, -1, :]

    tokens, logprobs, lengths, finished = tokens.cpu(), logprobs.cpu(), lengths.cpu(), finished.cpu()
    return [
        Sample(tokens[r, : lengths[r]].tolist(), logprobs[r, : lengths[r]].tolist(),
               "stop" if finished[r] else "length", int(tokens[r, lengths[r] - 1]) if finished[r] else None)
        for r in range(rows)
    ]


@torch.no_grad()
def teacher_forced_logprobs(model, prompt_ids: list[int], completion_ids: list[int], temperature: float,
                            top_p: float) -> torch.Tensor:
    """Sampling log-probs of `completion_ids` after `prompt_ids` from one full forward pass (no cache)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]  # (T, V) predicting each completion token
    lp = sampling_logprobs(logits, temperature, top_p)
    return lp.gather(-1, torch.tensor(completion_ids, device=device)[:, None]).squeeze(-1).cpu()


def score_rows(model, rows: list[dict], batch_size: int, top_p_override: float | None = None):
    """Per-row teacher-forced log-prob lists, batched by length so little compute goes to padding."""
    out: list[list[float] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_token_ids"]) + len(rows[i]["token_ids"]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            # rows of one shard share their sampler settings; group by them anyway to stay correct
            for key in {(rows[i]["temperature"], rows[i]["top_p"]) for i in batch}:
                part = [i for i in batch if (rows[i]["temperature"], rows[i]["top_p"]) == key]
                top_p = key[1] if top_p_override is None else top_p_override
                lp, mask = completion_logprobs(model, [rows[i]["prompt_token_ids"] for i in part],
                                               [rows[i]["token_ids"] for i in part], key[0], top_p)
                for j, i in enumerate(part):
                    out[i] = lp[j][mask[j]].tolist()
    return out


# Positions per chunk of the output head: a chunk's (B, chunk, V) logits, log-softmax and probabilities are
# the largest tensors of a forward pass, so they are made and dropped one chunk at a time. Chosen so that at
# a 152k vocabulary and B = 8 a chunk's logits are ~80 MB in float32.
HEAD_CHUNK_ELEMENTS = 1 << 24


def completion_logprobs(model, prompts: list[list[int]], completions: list[list[int]], temperature: float | list[float],
                        top_p: float = 1.0, with_entropy: bool = False, chunked: bool | None = None):
    """Teacher-forced log-probs of each completion token, batched: ((B, T) log-probs, (B, T) mask).

    With `with_entropy`, also the (B, T) entropy of the sampling distribution at each position (detached).

    Prompts are left-padded to a common width P and completions right-padded after them, so completion token
    j of every row is predicted by the hidden state at column P − 1 + j: the output head runs on those T
    columns only, never on prompt positions. Differentiable: the trainer calls it with grad.

    Memory: the (B, T, V) tensors (logits, log-softmax, probabilities) are what a real vocabulary makes
    large — at 8 × 256 tokens and 152k tokens, 1.2 GB each in float32. `chunked` (the default for a plain
    module) runs the backbone once and the head over chunks of positions, keeping only the selected token's
    log-prob and the entropy of each: peak O(B·T·d + B·chunk·V). Under autograd each chunk is checkpointed
    (recomputed in backward), as TRL's selective log-softmax and Liger's fused loss do. A DDP or FSDP
    wrapper must run its own forward, so a wrapped model takes the whole-head path (`chunked=False`).
    """
    device = next(model.parameters()).device
    if isinstance(temperature, (list, tuple)):  # one per row (see sampling_logprobs)
        temperature = torch.tensor(temperature, dtype=torch.float32, device=device)
    width, longest = max(len(p) for p in prompts), max(len(c) for c in completions)
    input_ids = torch.zeros((len(prompts), width + longest), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width + longest), dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, (p, c) in enumerate(zip(prompts, completions)):  # lists or NumPy arrays (train's Window)
        input_ids[row, width - len(p): width] = torch.tensor(p)
        input_ids[row, width: width + len(c)] = torch.tensor(c)
        attention_mask[row, width - len(p): width + len(c)] = 1
        mask[row, : len(c)] = True
    input_ids, attention_mask, mask = input_ids.to(device), attention_mask.to(device), mask.to(device)
    targets = input_ids[:, width:]  # (B, T) the completion tokens (padding where masked)
    positions = position_ids_from_mask(attention_mask)
    if chunked is None:
        chunked = _plain_module(model)
    if chunked:
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                  use_cache=False).last_hidden_state[:, width - 1: width + longest - 1]  # (B, T, d)
        head = model.get_output_embeddings()
        chunk = max(1, HEAD_CHUNK_ELEMENTS // (len(prompts) * head.weight.shape[0]))
        parts = []
        for start in range(0, longest, chunk):
            args = (hidden[:, start:start + chunk], targets[:, start:start + chunk])
            function = lambda h, t: _head_logprobs(model, head, h, t, temperature, top_p)  # noqa: E731
            if torch.is_grad_enabled():
                parts.append(torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False))
            else:
                parts.append(function(*args))
        logprobs = torch.cat([p[0] for p in parts], 1).masked_fill(~mask, 0.0)
        entropy = torch.cat([p[1] for p in parts], 1).detach().masked_fill(~mask, 0.0)
        return (logprobs, mask, entropy) if with_entropy else (logprobs, mask)
    _, extra = _cache_argument(model)
    keep = {"logits_to_keep": longest + 1} if extra else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   use_cache=False, **keep).logits
    logits = logits[:, -(longest + 1):-1]  # (B, T, V): columns P − 1 … P + T − 2 predict the completion
    all_logprobs = sampling_logprobs(logits, temperature, top_p)  # (B, T, V)
    logprobs = all_logprobs.gather(-1, targets[:, :, None]).squeeze(-1).masked_fill(~mask, 0.0)
    if not with_entropy:
        return logprobs, mask
    with torch.no_grad():
        p = all_logprobs.exp()
        entropy = -(p * all_logprobs.masked_fill(p == 0, 0.0)).sum(-1).masked_fill(~mask, 0.0)
    return logprobs, mask, entropy


# Architectures whose forward is exactly lm_head(final hidden state) (Gemma 2's logit cap is applied below):
# others (Granite's logits_scaling, Cohere's logit_scale …) take the whole-head path through their own forward.
PLAIN_HEAD_MODELS = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"}


def _plain_module(model) -> bool:
    """A module whose backbone and head may be called directly: a known plain-head architecture, not a DDP
    or FSDP wrapper."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # older torch: no FSDP2
        FSDPModule = ()  # noqa: N806
    return (not isinstance(model, FSDPModule) and getattr(model.config, "model_type", None) in PLAIN_HEAD_MODELS
            and model.get_output_embeddings() is not None)


def _head_logprobs(model, head, hidden, targets, temperature: float, top_p: float):
    """(selected token's sampling log-prob, entropy) for one chunk of positions: (B, c) each."""
    logits = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2 caps its logits
    if cap:
        logits = torch.tanh(logits / cap) * cap
    all_logprobs = sampling_logprobs(logits, temperature, top_p)  # (B, c, V), float32
    selected = all_logprobs.gather(-1, targets[:, :, None]).squeeze(-1)
    with torch.no_grad():
        p = all_logprobs.exp()
        entropy = -(p * all_logprobs.masked_fill(p == 0, 0.0)).sum(-1)
    return selected, entropy
