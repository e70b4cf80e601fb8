"""Shared fixtures: a tiny random causal LM saved as a real checkpoint, and runs created from it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The embedded default's tokenizer with a smaller random GPT-2 (d=64, 2 layers): fast, and real."""
    from roll.policy import build_default_model, build_default_tokenizer

    out = tmp_path_factory.mktemp("tiny_model")
    tokenizer = build_default_tokenizer()
    model = build_default_model(tokenizer, d_model=64, layers=2, heads=2, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir) -> Path:
    """A fresh run on the arith task with the tiny model as v0000."""
    from roll.runs import InitConfig, init_run

    path = tmp_path / "run"
    init_run(InitConfig(run=path, model=str(tiny_model_dir)))
    return path


def roll_cli(*args, cwd=None, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    """Run the real `roll` command line in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "roll", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"roll {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    """Poll `predicate` every 5 ms until it holds; fail the test after `timeout` seconds."""
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def fixed_data_run(run_dir, prompts=6, group_size=4, max_new_tokens=16):
    """Version-0 rollouts, verified and scored, with a spread of rewards so every group has a gradient (the
    tiny random model never answers right; a custom reward job rewriting verdicts would do the same)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from roll.stages.generate import GenerateConfig, run as generate
    from roll.stages.train import prepare
    from roll.store import Run, Shard, write_table

    generate(GenerateConfig(run=run_dir, prompts=prompts, group_size=group_size, max_new_tokens=max_new_tokens))
    prepare(Run(run_dir), [0])
    path = Run(run_dir).shard_path("verdicts", 0, Shard(0, 1))
    verdicts = pq.read_table(path)
    rewards = pa.array([float(i % 2) for i in verdicts.column("sample_index").to_pylist()])
    write_table(path, "verdicts", verdicts.set_column(verdicts.schema.get_field_index("reward"), "reward", rewards))
