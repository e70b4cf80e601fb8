"""Updates that continue (DESIGN §3.1a): AdamW's state is committed with each version and resumed by the next
update, so separate `roll train` processes take exactly the steps one continuous process takes."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from roll.store import OPTIMIZER_STATE, Run, query

from conftest import fixed_data_run, kill_in_commit, roll_cli

# one optimiser step per update: the mini-batch holds every row, so n updates are n AdamW steps
STEP = ["--objective", "stable-pess", "--mini-batch", "1000", "--micro-batch", "8", "--lr", "1e-3"]


def weights(run_dir, version) -> dict[str, torch.Tensor]:
    return load_file(Run(run_dir).policy_dir(version) / "model.safetensors")


def max_gap(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def separate_updates(run_dir, count, *extra):
    """`count` separate `roll train` processes, update v → v+1 reading version 0 each time (lag v)."""
    for version in range(count):
        roll_cli("train", "--run", run_dir, "--version", version, "--lag", version, *STEP, *extra)


def test_separate_updates_equal_one_continuous_run_and_fresh_optimizers_do_not(run_dir, tmp_path):
    fixed_data_run(run_dir)
    continuous, fresh = tmp_path / "continuous", tmp_path / "fresh"
    shutil.copytree(run_dir, continuous)
    shutil.copytree(run_dir, fresh)
    separate_updates(run_dir, 3)
    roll_cli("train", "--run", continuous, "--epochs", "3", *STEP)  # three steps in one process: v0 → v1
    separate_updates(fresh, 3, "--fresh-optimizer")

    steps = Run(continuous).connect().execute("select count(*) from steps").fetchone()[0]
    assert steps == 3
    # the same float operations in the same order: only summation order inside kernels could differ
    assert max_gap(weights(run_dir, 3), weights(continuous, 1)) < 1e-6
    # a fresh AdamW makes every step a sign step of size lr: after three steps the weights are far apart
    assert max_gap(weights(fresh, 3), weights(continuous, 1)) > 1e-4
    state = torch.load(Run(run_dir).policy_dir(3) / OPTIMIZER_STATE, weights_only=True)
    assert state["global_step"] == 3
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {3.0}
    assert not (Run(fresh).policy_dir(3) / OPTIMIZER_STATE).exists()
    meta = json.loads((Run(run_dir).policy_dir(3) / "policy.json").read_text())
    assert meta["optimizer"] == "resumed from v0002" and meta["global_step"] == 3
    global_steps = Run(run_dir).connect().execute("select global_step from steps order by policy_version").fetchall()
    assert [g for (g,) in global_steps] == [0, 1, 2]


def test_an_update_from_an_older_parent_resumes_that_parents_state(run_dir):
    fixed_data_run(run_dir)
    separate_updates(run_dir, 3)
    original = weights(run_dir, 2)
    # retrain v2 from v1: it must resume v1's state (1 step), not v2's or v3's newer one
    roll_cli("train", "--run", run_dir, "--version", 1, "--lag", 1, "--force", "--prune-descendants", *STEP)
    assert max_gap(weights(run_dir, 2), original) < 1e-6
    state = torch.load(Run(run_dir).policy_dir(2) / OPTIMIZER_STATE, weights_only=True)
    assert state["global_step"] == 2


def test_warmup_is_linear_over_global_optimiser_steps(run_dir):
    fixed_data_run(run_dir)
    for version in range(3):
        roll_cli("train", "--run", run_dir, "--version", version, "--lag", version, *STEP, "--warmup-steps", 2)
    lrs = Run(run_dir).connect().execute("select lr from steps order by global_step").fetchall()
    # step t uses lr·(t+1)/(W+1) while t < W: 1/3, 2/3 of 1e-3, then 1e-3
    assert [lr for (lr,) in lrs] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3], rel=1e-12)


def test_sigkill_while_committing_leaves_no_half_written_state_and_the_rerun_matches(run_dir, tmp_path):
    """Killed inside the checkpoint commit (every file written beside v0001, not yet renamed into place)."""
    killed, reference = run_dir, tmp_path / "reference"
    fixed_data_run(killed, prompts=2, group_size=2, max_new_tokens=8)
    shutil.copytree(killed, reference)
    roll_cli("train", "--run", reference, *STEP)

    kill_in_commit("from roll.cli import main\nsys.argv = ['roll', *sys.argv[1:]]\nmain()",
                   "train", "--run", killed, *STEP)
    policies = Run(killed).root / "policies"
    assert list(policies.glob(".v0001.*.tmp")), "the update was not killed inside its commit"
    assert Run(killed).policy_versions() == [0] and not (policies / "v0001").exists()
    # steps and groups are written just before the policy: a reader must not see them without it
    assert Run(killed).train_path("steps", 1).exists()
    assert query(Run(killed), "select count(*) from steps").fetchall() == [(0,)]
    roll_cli("train", "--run", killed, *STEP)
    assert sorted(p.name for p in policies.iterdir()) == ["v0000", "v0001"]  # the dead commit's temporary is gone
    assert max_gap(weights(killed, 1), weights(reference, 1)) < 1e-6
    same = "select step, global_step, tokens, loss from steps"
    assert query(Run(killed), same).fetchall() == query(Run(reference), same).fetchall()
    a = torch.load(policies / "v0001" / OPTIMIZER_STATE, weights_only=True)["optimizer"]["state"]
    b = torch.load(Run(reference).policy_dir(1) / OPTIMIZER_STATE, weights_only=True)["optimizer"]["state"]
    assert a.keys() == b.keys()
    assert max((a[k]["exp_avg_sq"] - b[k]["exp_avg_sq"]).abs().max().item() for k in a) < 1e-9
