"""LoRA through PEFT (DESIGN §3.1c): adapters committed per version on v0's frozen weights, merged for every
stage but train, with the continuity and kill guarantees of full updates."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from roll.store import OPTIMIZER_STATE, Run, query

from conftest import build_chat_checkpoint, fixed_data_run, roll_cli, wait_for

STEP = ["--objective", "stable-pess", "--mini-batch", "1000", "--micro-batch", "8", "--lr", "1e-3"]
LORA = ["--lora-rank", "4"]


def adapter(run_dir, version) -> dict[str, torch.Tensor]:
    return load_file(Run(run_dir).policy_dir(version) / "adapter_model.safetensors")


def test_lora_versions_hold_adapters_that_every_stage_merges(run_dir):
    roll_cli("iterate", "--run", run_dir, "--iterations", 2, "--prompts", 6, "--group-size", 4,
             "--max-new-tokens", 12, *LORA, "--lr", "1e-3", "--eval-every", 2, "--eval-k", 1, "--eval-limit", 4)
    run = Run(run_dir)
    assert run.checkpoint_versions() == [0, 1, 2]
    for version in (1, 2):
        directory = run.policy_dir(version)
        assert (directory / "adapter_model.safetensors").is_file() and not (directory / "model.safetensors").exists()
        assert json.loads((directory / "policy.json").read_text())["lora"] == {
            "rank": 4, "alpha": 16.0, "base": 0, "targets": "all-linear"}
        state = torch.load(directory / OPTIMIZER_STATE, weights_only=True)["optimizer"]
        names = set(state["param_groups"][0]["params"])  # the optimiser holds the adapter's parameters only
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names), sorted(names)[:3]
    # v2's rollouts were sampled from the merged v1, its scores teacher-forced through the merged v1 as well
    assert query(run, "select count(*) from samples where policy_version = 1").fetchone()[0] == 24
    assert query(run, "select count(*) from evals where policy_version = 2").fetchone()[0] > 0

    # what every stage but train loads is W + (α/r)·B·A of the stored adapter, to float32 rounding: PEFT sums r
    # products, scales and adds once, so each weight is within u·|W + Δ| + (r + 2)·u·(α/r)·(|B|·|A|) of the exact
    # value, u = 2^-24 (float32's unit roundoff), computed here in float64
    from roll.policy import load_policy

    model = load_policy(run.policy_dir(2))[0]
    merged = model.state_dict()
    v0 = load_file(run.policy_dir(0) / "model.safetensors")
    stored = adapter(run_dir, 2)
    scale, u = 16.0 / 4, 2.0 ** -24
    adapted = sorted(k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in stored if "lora_A" in k)
    assert len(adapted) == 8  # 2 layers × (attention in/out, MLP in/out): every linear map but the head
    for module in adapted:
        a = stored[f"base_model.model.{module}.lora_A.weight"].double()  # (r, d_in)
        b = stored[f"base_model.model.{module}.lora_B.weight"].double()  # (d_out, r)
        w = v0[f"{module}.weight"].double()
        delta, size = scale * (b @ a), scale * (b.abs() @ a.abs())
        if type(model.get_submodule(module)).__name__ == "Conv1D":  # GPT-2's Conv1D stores W as (d_in, d_out)
            delta, size = delta.T, size.T
        exact = w + delta
        assert ((merged[f"{module}.weight"].double() - exact).abs() <= u * exact.abs() + (4 + 2) * u * size).all(), module
    assert max(stored[k].abs().max().item() for k in stored if "lora_B" in k) > 1e-4  # B left 0: the adapters moved


def test_lora_separate_updates_equal_one_continuous_run(run_dir, tmp_path):
    fixed_data_run(run_dir)
    continuous = tmp_path / "continuous"
    shutil.copytree(run_dir, continuous)
    for version in range(2):
        roll_cli("train", "--run", run_dir, "--version", version, "--lag", version, *STEP, *LORA)
    roll_cli("train", "--run", continuous, "--epochs", "2", *STEP, *LORA)
    a, b = adapter(run_dir, 2), adapter(continuous, 1)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # as full updates (test_continuity)
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-4  # B left zero: the update moved it
    meta = json.loads((Run(run_dir).policy_dir(2) / "policy.json").read_text())
    assert meta["optimizer"] == "resumed from v0001" and meta["global_step"] == 2


def test_sigkill_during_a_lora_update_leaves_nothing_half_written_and_the_rerun_matches(run_dir, tmp_path):
    fixed_data_run(run_dir)
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    many = [*STEP, *LORA, "--epochs", "3"]
    roll_cli("train", "--run", reference, *many)
    train = Run(run_dir).train_path("steps", 1).parent
    proc = subprocess.Popen([sys.executable, "-m", "roll", "train", "--run", str(run_dir), *many],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the tables are written just before the adapter: kill the process as soon as the first appears
    wait_for(lambda: (train.is_dir() and any(train.iterdir())) or proc.poll() is not None, timeout=300,
             what="the update's commit")
    proc.kill()
    proc.wait()
    run = Run(run_dir)
    if 1 in run.policy_versions():  # the kill came after the commit point: then all of it is there
        assert (run.policy_dir(1) / "adapter_model.safetensors").is_file()
        assert query(run, "select count(*) from steps").fetchone()[0] == 3
    else:  # before it: nothing of version 1 is visible
        assert query(run, "select count(*) from steps").fetchall() == [(0,)]
        assert not run.policy_dir(1).exists()
    roll_cli("train", "--run", run_dir, *many, "--force")
    assert sorted(p.name for p in (run.root / "policies").iterdir()) == ["v0000", "v0001"]
    a, b = adapter(run_dir, 1), adapter(reference, 1)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_lora_refusals_are_one_line(run_dir):
    fixed_data_run(run_dir)
    roll_cli("train", "--run", run_dir, *STEP, *LORA)  # v1: a rank-4 adapter
    for args, expected in [
        (["--lora-rank", "8"], "holds a LoRA adapter of rank 4, alpha 16; continue it with --lora-rank 4 --lora-alpha 16"),
        ([], "holds a LoRA adapter of rank 4"),
        ([*LORA, "--fsdp"], "--lora-rank with --fsdp"),
    ]:
        proc = roll_cli("train", "--run", run_dir, "--lag", 1, *STEP, *args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    proc = roll_cli("generate", "--run", run_dir, "--version", 1, "--backend", "vllm", check=False)
    # with vLLM installed (the README's test install) the refusal names the LoRA version; without it, the missing
    # package comes first (checked before any work) — one line either way
    expected = "a LoRA version" if importlib.util.find_spec("vllm") else "--backend vllm needs vLLM"
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    # a full update v1 → v2 cannot start an adapter from v2: LoRA adapts v0
    full = run_dir.parent / "full"
    shutil.copytree(run_dir, full)
    shutil.rmtree(Run(full).policy_dir(1))
    roll_cli("train", "--run", full, *STEP)
    proc = roll_cli("train", "--run", full, "--lag", 1, *STEP, *LORA, check=False)
    assert proc.returncode == 2 and "was trained in full; LoRA adapts v0000" in proc.stderr, proc.stderr


def test_lora_on_a_bf16_checkpoint_keeps_the_base_in_bf16_and_the_adapter_in_float32(tmp_path):
    model_dir = build_chat_checkpoint(tmp_path / "model", "qwen2")
    run_dir = tmp_path / "run"
    roll_cli("init", "--run", run_dir, "--model", model_dir, "--dtype", "bfloat16")
    fixed_data_run(run_dir, prompts=4, max_new_tokens=8)
    roll_cli("train", "--run", run_dir, *STEP, *LORA)
    run = Run(run_dir)
    assert {t.dtype for t in adapter(run_dir, 1).values()} == {torch.float32}
    assert json.loads((run.policy_dir(1) / "policy.json").read_text())["dtype"] == "bfloat16"

    from roll.policy import load_policy
    from roll.store import checkpoint_dtype

    assert checkpoint_dtype(run.policy_dir(1)) == "bfloat16"
    merged, _ = load_policy(run.policy_dir(1))  # what generate and score use: the base's dtype
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    # to train, the base stays bf16 (no float32 copy of frozen weights) and the adapter loads exactly as stored
    model, _ = load_policy(run.policy_dir(1), to_train=True)
    stored = adapter(run_dir, 1)
    weights = dict(model.named_parameters())
    assert {p.dtype for n, p in weights.items() if "lora_" not in n} == {torch.bfloat16}
    for key, value in stored.items():
        name = key.removesuffix(".weight") + ".default.weight"
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name].detach(), value), key


def test_lora_under_two_ddp_ranks_matches_one_process(run_dir, tmp_path):
    fixed_data_run(run_dir)
    single = tmp_path / "single"
    shutil.copytree(run_dir, single)
    args = ["train", *LORA, "--epochs", "2", "--mini-batch", "24", "--micro-batch", "4", "--lr", "1e-3"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "roll", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ROLL_RUN": str(run_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    roll_cli(*args, "--run", single)
    a, b = adapter(run_dir, 1), adapter(single, 1)
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # B started at 0: two real steps
    # the bound of test_distributed: ranks sum gradients in another order, so where a gradient is of the size
    # of that rounding Adam may step another way (by at most ~1.3·lr a step); elsewhere float32 rounding
    gaps = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert gaps.max().item() <= 1.3 * 2 * 1e-3 * 2
    assert gaps.median().item() < 1.2e-7, gaps.median()
    # and the loss each rank contributes is its share of the mini-batch's: the reduced metrics are one process's
    same = "select loss, tokens, entropy, ratio_max from steps order by step"
    steps_a, steps_b = query(Run(run_dir), same).fetchall(), query(Run(single), same).fetchall()
    assert [s[1] for s in steps_a] == [s[1] for s in steps_b]
    assert torch.allclose(torch.tensor(steps_a), torch.tensor(steps_b), atol=1e-5)
