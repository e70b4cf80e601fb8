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
