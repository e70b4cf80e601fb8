"""Shared fixtures: a tiny random causal LM saved as a real checkpoint, and runs created from it."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# One torch (OpenMP) thread a process, as the experiment cells run. pytest-xdist runs two workers, and each
# starts roll processes of its own: at torch's default of one thread a core, four or more OpenMP threads spin
# on the 2 cores, and on a busy machine a 22 s test took 102-118 s (a killed update, a chain iteration: 167 s
# for three tests at 2 threads against 71 s at 1, measured beside two niced grid cells). Set before anything
# imports torch; subprocesses inherit it. A test that wants another count sets its own (tests/test_warm.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


class WarmRoll:
    """The test worker's `roll warm` socket (set once by the `warm_roll` fixture), or None."""
    socket: Path | None = None
    import_time_env: dict = {}  # the import-time variables it started with: a child can only have these


@pytest.fixture(scope="session", autouse=True)
def warm_roll(tmp_path_factory):
    """One `roll warm` per test worker, so that `roll_cli`'s commands run in fresh forks of it — as a user's shell
    script does with ROLL_WARM set — rather than each paying the torch/transformers import (2–4 s of a core;
    about half of the suite's CPU time went to it). A forked child runs the command exactly as a cold process
    would (tests/test_warm.py holds it to that). Commands that start their own processes (Popen, torchrun, kills
    at a chosen point) start cold, as does a `roll_cli` call with `cold=True`, its own ROLL_WARM, or an
    import-time variable of its own (OMP_*, TORCH* …), which a warm child could not honour."""
    socket_path = tmp_path_factory.mktemp("warm") / "roll.sock"
    server = subprocess.Popen([sys.executable, "-m", "roll", "warm", "--socket", str(socket_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: socket_path.exists() or server.poll() is not None, what="roll warm to listen")
    from roll.warm import IMPORT_TIME_ENV

    WarmRoll.socket = socket_path if server.poll() is None else None
    WarmRoll.import_time_env = {k: v for k, v in os.environ.items() if k.startswith(IMPORT_TIME_ENV)}
    yield
    WarmRoll.socket = None
    server.terminate()
    server.wait(timeout=60)


def roll_cli(*args, cwd=None, env=None, check=True, timeout=300, cold=False) -> subprocess.CompletedProcess:
    """Run the real `roll` command line in a subprocess (through the worker's `roll warm` unless `cold`)."""
    from roll.warm import IMPORT_TIME_ENV

    full_env = {**os.environ, **(env or {})}
    import_time = {k: v for k, v in full_env.items() if k.startswith(IMPORT_TIME_ENV)}
    if (WarmRoll.socket is not None and not cold and "ROLL_WARM" not in full_env
            and import_time == WarmRoll.import_time_env):
        full_env["ROLL_WARM"] = str(WarmRoll.socket)
    proc = subprocess.run([sys.executable, "-m", "roll", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"roll {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    """Poll `predicate` every 5 ms until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# Prepended to a test's program: the process stops inside the checkpoint commit, once every file is written in
# the temporary directory and before the rename that commits it (as if the disk were slow there), and says so on
# stdout, so a kill lands inside the commit on any machine, however loaded. The files and process are real.
PAUSE_IN_COMMIT = """
import sys, time
import roll.store.checkpoint
_apply_umask = roll.store.checkpoint.apply_umask
def _pause_in_commit(path):
    _apply_umask(path)
    if path.is_dir() and path.name.startswith('.v') and path.name.endswith('.tmp'):  # a checkpoint's temporary
        print('in-commit', flush=True)
        time.sleep(3600)
roll.store.checkpoint.apply_umask = _pause_in_commit
"""
KILL_DEADLINE_S = 300  # a hang guard: the command never reached the point to be killed at


def kill_in_commit(program: str, *args) -> None:
    """Run `python -c PAUSE_IN_COMMIT + program *args`, SIGKILL it inside its checkpoint commit, and check that it
    died of that kill (not of an error before the commit)."""
    import signal
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: a chatty command never blocks on it
        proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_COMMIT + program, *map(str, args)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        guard = threading.Timer(KILL_DEADLINE_S, proc.kill)
        guard.start()
        line = ""
        try:
            for line in proc.stdout:
                if line.strip() == "in-commit":
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            guard.cancel()
        stderr.seek(0)
        assert proc.wait() == -signal.SIGKILL and line.strip() == "in-commit", stderr.read()[-3000:]


def kill_once_progress_is_drawn(args: list, marker: str) -> None:
    """Start `args` with stderr on a pseudo-terminal, so that rich draws the progress bar live; SIGKILL it once
    the bar named `marker` is drawn (the command is then inside that loop, not in start-up), and check that it
    died of that kill."""
    import pty
    import select
    import signal

    master, terminal = pty.openpty()
    proc = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    seen, deadline = b"", time.monotonic() + KILL_DEADLINE_S
    try:
        while marker.encode() not in seen and proc.poll() is None and time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the terminal closed: the command has ended
                    break
    finally:
        proc.send_signal(signal.SIGKILL)
        os.close(master)  # only now: the command's next write to a closed terminal would fail
    drawn = marker.encode() in seen
    assert proc.wait() == -signal.SIGKILL and drawn, f"{marker!r} drawn: {drawn}; {seen[-2000:]!r}"


def prepare_and_train(config):
    """What the `roll train` command does in one process: make what the update reads (verdicts, scores, apo's
    version-0 samples: pipeline/prepare.py), then run the train stage, which only trains."""
    from roll.pipeline.prepare import prepare_update
    from roll.stages.train import run as train

    prepare_update(config)
    return train(config)


def fixed_data_run(run_dir, prompts=6, group_size=4, max_new_tokens=16):
    """Version-0 rollouts, verified and scored, with a spread of rewards so every group has a gradient (the
    tiny random model never answers right; a custom reward job rewriting verdicts would do the same)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from roll.stages.generate import GenerateConfig, run as generate
    from roll.pipeline.prepare import prepare
    from roll.store import Run, Shard, write_table

    generate(GenerateConfig(run=run_dir, prompts=prompts, group_size=group_size, max_new_tokens=max_new_tokens))
    prepare(Run(run_dir), [0])
    path = Run(run_dir).shard_path("verdicts", 0, Shard(0, 1))
    verdicts = pq.read_table(path)
    rewards = pa.array([float(i % 2) for i in verdicts.column("sample_index").to_pylist()])
    write_table(path, "verdicts", verdicts.set_column(verdicts.schema.get_field_index("reward"), "reward", rewards))


QWEN_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_chat_checkpoint(out: Path, architecture: str = "qwen2", tokenizer_eos: str = "<|im_end|>",
                          generation_eos: tuple[str, ...] = ("<|im_end|>",), stop_bias: float = 0.0,
                          hidden_size: int = 64) -> Path:
    """A small real checkpoint as a user would bring one: a byte-level BPE tokenizer trained here on bundled
    GSM8K text, a Qwen-style chat template, no pad token, and random weights — Qwen2 (GQA, tied embeddings)
    or Llama (untied). `generation_eos` goes to generation_config.eos_token_id, as chat models ship it. Four
    attention heads: head size hidden_size/4 (vLLM's CPU attention takes 32 and up, so hidden_size ≥ 128 there).

    With `stop_bias` > 0 the Llama's residual stream carries a constant feature that the output head maps
    to `<|im_end|>` only, so that token is drawn with a fixed share of the mass at every step (a random
    model otherwise almost never ends a turn): after the RMS norm the feature is ≈ 8, so the logit is ≈ 8·bias
    against ≈ 0 for the other ~800 tokens (bias 0.6: p ≈ 0.1 a token)."""
    import json

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)

    from roll.data import DATA_DIR

    texts = [json.loads(line)["problem"] for line in (DATA_DIR / "gsm8k" / "train.jsonl").read_text().splitlines()[:2000]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=tokenizer_eos, model_max_length=2048)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in special if t != tokenizer_eos]})
    tokenizer.chat_template = QWEN_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  eos_token_id=ids[tokenizer_eos], bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    if architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    if stop_bias:
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[:, 0] = 1.0  # feature 0 is 1 in every token's embedding ...
            for layer in model.model.layers:  # ... and stays in the residual stream: no layer writes to it
                layer.self_attn.o_proj.weight[0].zero_()
                layer.mlp.down_proj.weight[0].zero_()
            head = model.get_output_embeddings().weight
            head[:, 0] = 0.0
            head[ids["<|im_end|>"], 0] = stop_bias  # after the final RMS norm, a positive logit for <|im_end|>
    model.generation_config = GenerationConfig(eos_token_id=[ids[t] for t in generation_eos], bos_token_id=None)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
