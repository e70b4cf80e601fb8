"""Creating runs: `roll init`, and the automatic creation a stage does when pointed at a missing run."""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from roll import __version__
from roll.errors import RollError
from roll.options import TOKENS_MAX, check_ranges, option, seed_option
from roll.store import DTYPES, Run, write_table

DEFAULT_RUN = Path("runs") / "default"


def default_run_path() -> Path:
    """`$ROLL_RUN`, else ./runs/default."""
    return Path(os.environ.get("ROLL_RUN") or DEFAULT_RUN)


@dataclass(frozen=True)
class InitConfig:
    run: Path
    task: str = option("arith", "Built-in task name, or a .jsonl/.parquet file with prompt and answer columns.")
    model: str | None = option(None, "Checkpoint directory (or hub id) of a causal LM. [default: the embedded model]",
                               show_default=False)
    seed: int = seed_option("Seed of the built-in task's train/test generator.")
    dtype: str = option("auto", "Weights' dtype, kept by every commit (auto: the checkpoint's own). bf16 trains with fp32 "
                                "master weights.", choices=DTYPES)
    max_new_tokens: int | None = option(None, "Completion length recorded for generate and evaluate, checked against "
                                              "the model's context. [default: the task's: 48 arith, 512 gsm8k and task "
                                              "files, 1024 math, 2048 competition sets]", show_default=False,
                                        min=1, max=TOKENS_MAX)


def default_model_dir(task: str = "arith") -> Path:
    """The bundled model a built-in task starts from: the chain model for `chain`, the embedded default else."""
    from roll.data import CHAIN_MODEL_DIR, DEFAULT_MODEL_DIR
    from roll.tasks import chain_steps

    chain = chain_steps(task) is not None
    directory = CHAIN_MODEL_DIR if chain else DEFAULT_MODEL_DIR
    if not (directory / "config.json").is_file():
        raise RollError(f"the bundled {'chain' if chain else 'embedded default'} model is missing at {directory} "
                        f"(run `roll warmstart{' --task chain' if chain else ''}`)")
    return directory


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_run_config(path: Path, values: dict) -> None:
    text = "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items() if value is not None)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_run_config(run: Run) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(run.config_path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RollError(f"{run.config_path}: cannot be read ({exc})") from None


def init_run(config: InitConfig) -> dict:
    """Create a run: prompts table, policy v0000 and run.toml, built aside and renamed into place."""
    import torch

    from roll.policy import check_checkpoint, check_tokenizer, load_policy, save_policy
    from roll.tasks import build_prompts

    run = Run(config.run)
    if run.exists():
        raise RollError(f"{run.root}: a run already exists here")
    if config.dtype not in DTYPES:
        raise RollError(f"--dtype {config.dtype}: choose from {', '.join(DTYPES)}")
    check_ranges(config)
    # an absolute path: run.toml must still name the model when read from another directory
    model_source = str(Path(config.model).resolve()) if config.model and Path(config.model).exists() else \
        (str(config.model) if config.model else str(default_model_dir(config.task)))
    check_checkpoint(model_source)  # weights and a real tokenizer, before the weights are read (DESIGN §6)
    model, tokenizer = load_policy(model_source)  # in the checkpoint's own dtype
    check_tokenizer(model_source, tokenizer)  # a hub id's, which check_checkpoint leaves to transformers
    if config.dtype != "auto":
        model.to(getattr(torch, config.dtype))
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    prompts = build_prompts(config.task, config.seed, tokenizer)  # refuses a bad task before any file is written
    max_new_tokens = config.max_new_tokens or task_max_new_tokens(config.task)
    check_task_fits(model_source, model.config, tokenizer, prompts, max_new_tokens)

    staging = Run(run.root.parent / f".{run.root.name}.init-{os.getpid()}")
    shutil.rmtree(staging.root, ignore_errors=True)
    try:
        write_table(staging.prompts_path, "prompts", prompts)
        save_policy(model, tokenizer, staging.policy_dir(0),
                    {"version": 0, "parent": None, "source": model_source, "objective": None})
        values = {**asdict(config), "run": None, "model": model_source, "dtype": dtype, "roll_version": __version__,
                  "max_new_tokens": max_new_tokens,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_run_config(staging.config_path, values)
        if run.root.exists():
            if any(run.root.iterdir()):
                raise RollError(f"{run.root}: exists, is not empty and holds no run.toml; refusing to use it")
            run.root.rmdir()
        run.root.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging.root, run.root)
    finally:
        shutil.rmtree(staging.root, ignore_errors=True)
    counts = {}
    for split in prompts.column("split").to_pylist():
        counts[split] = counts.get(split, 0) + 1
    return {"run": str(run.root), "task": config.task, "model": model_source, "dtype": dtype, "prompts": counts}


def check_task_fits(model_source: str, model_config, tokenizer, prompts, max_new_tokens: int) -> None:
    """Refuse a model whose context cannot hold the task's longest prompt (train or test, tokenized as generate
    and evaluate will) plus the run's completion length: found here, not in the first generate."""
    from roll.policy import context_limit, encode_prompts

    limit, field = context_limit(model_config)
    if not limit or prompts.num_rows == 0:
        return
    tokens = encode_prompts(tokenizer, prompts.column("prompt").to_pylist(), prompts.column("metadata").to_pylist())
    longest = max(range(len(tokens)), key=lambda i: len(tokens[i]))
    if len(tokens[longest]) + max_new_tokens > limit:
        prompt_id = prompts.column("prompt_id")[longest].as_py()
        raise RollError(f"model {model_source}: context too short for this task: {field} is {limit} tokens, and prompt "
                        f"'{prompt_id}' ({len(tokens[longest])} tokens) + --max-new-tokens {max_new_tokens} needs "
                        f"{len(tokens[longest]) + max_new_tokens} (init with a smaller --max-new-tokens, or use a model "
                        f"with a longer context)")


def task_max_new_tokens(task: str) -> int:
    """The completion length a task's run uses unless told otherwise (roll.datasets.MAX_NEW_TOKENS)."""
    from roll.datasets import FILE_TASK_MAX_NEW_TOKENS, MAX_NEW_TOKENS
    from roll.tasks import CHAIN_TOKENS_PER_STEP, chain_steps

    if chain_steps(task) is not None:
        return CHAIN_TOKENS_PER_STEP * chain_steps(task)
    return MAX_NEW_TOKENS.get(task, FILE_TASK_MAX_NEW_TOKENS)


def run_max_new_tokens(run: Run, given: int | None) -> int:
    """--max-new-tokens if given, else the run's (recorded from its task at init; 48 for older runs)."""
    if given is not None:
        return given
    return int(read_run_config(run).get("max_new_tokens", 48))


def ensure_run(path: Path | str | None) -> Run:
    """The run at `path` (default: $ROLL_RUN or ./runs/default), created from the embedded default if absent."""
    run = Run(path or default_run_path())
    if not run.exists():
        init_run(InitConfig(run=run.root))
        print(f"roll: created run {run.root} from the embedded default (task arith, built-in model)", file=sys.stderr)
    return run
