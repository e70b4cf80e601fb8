"""train: every objective updates a real model; lag windows, diagnostics, apo's version-0 supplement,
interruption safety and bad input."""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from roll.objectives import OBJECTIVES
from roll.stages.generate import GenerateConfig, run as generate
from roll.stages.train import TrainConfig
from roll.store import Run, Shard, data_window, query

from conftest import fixed_data_run, roll_cli, kill_once_progress_is_drawn, prepare_and_train as train

SMALL = dict(prompts=6, group_size=4, max_new_tokens=20)
FAST = dict(mini_batch=12, micro_batch=12)


def test_data_window_follows_design_3_1():
    assert data_window(version=10, lag=0, window=1) == (10, 10)
    assert data_window(version=10, lag=2, window=3) == (6, 8)  # [v − L − W + 1, v − L]
    assert data_window(version=1, lag=4, window=2) == (0, 0)  # clamped at 0


def test_generate_then_train_from_the_cli_keeps_k_at_least_one(run_dir):
    roll_cli("generate", "--run", run_dir, "--prompts", 6, "--group-size", 4, "--max-new-tokens", 20)
    out = roll_cli("train", "--run", run_dir, "--objective", "stable-pess")
    summary = json.loads(out.stdout)
    assert summary["version"] == 1 and summary["regimes"] == {"pessimistic": 6}
    assert "running verify" in out.stderr and "running score" in out.stderr
    r = Run(run_dir)
    assert r.policy_versions() == [0, 1]
    assert query(r, "select count(*), min(k) >= 1.0, bool_and(regime = 'pessimistic') from groups").fetchall() == [(6, True, True)]
    meta = json.loads((r.policy_dir(1) / "policy.json").read_text())
    assert meta["parent"] == 0 and meta["objective"] == "stable-pess" and meta["data_versions"] == [0]
    assert meta["hyperparameters"]["shift"] == 1.0 and meta["hyperparameters"]["beta"] == 0.1


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_trains_one_update_with_sane_diagnostics(run_dir, objective):
    fixed_data_run(run_dir, prompts=SMALL["prompts"], group_size=SMALL["group_size"],
                   max_new_tokens=SMALL["max_new_tokens"])  # a reward spread in every group
    summary = train(TrainConfig(run=run_dir, objective=objective, epochs=2, **FAST))
    before = load_file(Run(run_dir).policy_dir(0) / "model.safetensors")
    after = load_file(Run(run_dir).policy_dir(1) / "model.safetensors")
    # two AdamW steps move a weight by up to ~2·lr; every objective has a non-zero gradient on this data
    assert max((after[k] - before[k]).abs().max().item() for k in after) > 0.1 * TrainConfig(run=run_dir).lr
    assert summary["steps"] == 4 and math.isfinite(summary["loss"])
    cursor = query(Run(run_dir), "select * from steps order by step")
    steps = [dict(zip([d[0] for d in cursor.description], row)) for row in cursor.fetchall()]
    first = steps[0]
    # the first step of a lag-0 update evaluates π_θ = π_b: ratios are 1, the KL 0 and the ESS full
    assert first["ratio_min"] == pytest.approx(1.0, abs=1e-5) and first["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert first["kl_behaviour"] == pytest.approx(0.0, abs=1e-8) and first["ess"] == pytest.approx(1.0, abs=1e-6)
    assert all(s["tokens"] > 0 and s["entropy"] > 0 and math.isfinite(s["grad_norm"]) for s in steps)
    groups = query(Run(run_dir), "select regime, k from groups").fetchall()
    if OBJECTIVES[objective].regression:
        assert all(regime != "n/a" for regime, _ in groups)
    else:
        assert all(regime == "n/a" and math.isnan(k) for regime, k in groups)


def test_lag_selects_stale_versions_and_records_lag_and_optimiser_steps(run_dir):
    for version in range(3):
        generate(GenerateConfig(run=run_dir, version=version, **SMALL))
        train(TrainConfig(run=run_dir, objective="pmd-mean", lag=1, window=2, **FAST))
    rows = query(Run(run_dir), "select policy_version, data_version, lag, optimizer_steps - step, count(*) from groups "
                               "group by all order by 1, 2").fetchall()
    # update 0→1 reads [0,0]; 1→2 reads [0,0]; 2→3 reads [0,1]; each update takes 2 optimiser steps (3 groups
    # of 4 rows a step), so a group first used in the update's step j has had (steps before the update) + j
    assert rows == [(1, 0, 0, 0, 6), (2, 0, 1, 2, 6), (3, 0, 2, 4, 6), (3, 1, 1, 2, 6)]
    steps = query(Run(run_dir), "select policy_version, step, count(*) from groups group by all order by 1, 2").fetchall()
    assert steps == [(1, 0, 3), (1, 1, 3), (2, 0, 3), (2, 1, 3), (3, 0, 3), (3, 1, 3), (3, 2, 3), (3, 3, 3)]
    stale = query(Run(run_dir), "select policy_version, step, lag_mean, stale_steps_mean from steps order by 1, 2").fetchall()
    assert stale[:4] == [(1, 0, 0.0, 0.0), (1, 1, 0.0, 1.0), (2, 0, 1.0, 2.0), (2, 1, 1.0, 3.0)]


def test_at_lag_0_decoupled_ppo_and_m2po_update_as_ppo_and_the_parent_anchor_as_the_behaviour_anchor(run_dir, tmp_path):
    """Issue 20's two equalities (and m2po's), through `train` itself: one update v0 → v1 of one optimiser step on
    v0's own rows. π_prox is then π_b, taken from the stored trainer log-probs with no forward pass, so the
    weights come out equal bit for bit."""
    fixed_data_run(run_dir, prompts=SMALL["prompts"], group_size=SMALL["group_size"],
                   max_new_tokens=SMALL["max_new_tokens"])
    one_step = dict(mini_batch=24, micro_batch=12)
    weights, metas = {}, {}
    for name, options in (("ppo", {}), ("decoupled-ppo", {}), ("m2po", {}), ("stable-pess", {}),
                          ("stable-pess-parent", {"anchor": "parent"})):
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        train(TrainConfig(run=copy, objective=name.removesuffix("-parent"), **options, **one_step))
        weights[name] = load_file(Run(copy).policy_dir(1) / "model.safetensors")
        metas[name] = json.loads((Run(copy).policy_dir(1) / "policy.json").read_text())
    for a, b in (("ppo", "decoupled-ppo"), ("ppo", "m2po"), ("stable-pess", "stable-pess-parent")):
        assert weights[a].keys() == weights[b].keys()
        assert all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)
    assert metas["decoupled-ppo"]["parent_forward_rows"] == metas["stable-pess-parent"]["parent_forward_rows"] == 0
    assert weights["ppo"].keys() and not all(torch.equal(weights["ppo"][k], weights["stable-pess"][k])
                                             for k in weights["ppo"])  # the comparison can tell objectives apart


def test_stale_rows_get_the_parents_log_probs_and_weights_that_keep_stable_pess_pessimistic(run_dir):
    """Update 1 → 2 at lag 1 reads v0's rows with the parent v1: every row takes the parent's forward pass, and
    stable-pess's groups, analysed under the parent's measure with the weighted mean baseline, keep k ≥ s."""
    generate(GenerateConfig(run=run_dir, **SMALL))
    train(TrainConfig(run=run_dir, objective="ppo", **FAST))
    train(TrainConfig(run=run_dir, objective="stable-pess", anchor="parent", lag=1, **FAST))
    meta = json.loads((Run(run_dir).policy_dir(2) / "policy.json").read_text())
    assert meta["parent_forward_rows"] == meta["rows"] == 24 and meta["hyperparameters"]["anchor"] == "parent"
    assert query(Run(run_dir), "select count(*), min(k) >= 1.0 from groups where policy_version = 2").fetchall() == [(6, True)]


def test_apo_generates_missing_version0_samples_once(run_dir):
    generate(GenerateConfig(run=run_dir, **SMALL))
    train(TrainConfig(run=run_dir, objective="pmd-mean", **FAST))
    generate(GenerateConfig(run=run_dir, version=1, **SMALL))  # new prompts, never sampled from v0
    train(TrainConfig(run=run_dir, objective="apo", **FAST))
    r = Run(run_dir)
    assert query(r, "select count(*) from rollouts where policy_version = 0").fetchall() == [(48,)]
    assert query(r, "select count(*), count(reward), count(trainer_logprobs) from samples "
                    "where policy_version = 0").fetchall() == [(48, 48, 48)]
    assert any(name.startswith("extra-apo") for name in r.files("rollouts", 0))


def test_the_train_stage_only_trains_and_names_the_command_that_makes_what_it_lacks(run_dir):
    """Called alone (as under torchrun's other ranks, or from Python), the stage refuses a window that is not
    verified, not scored, scored without the π_ref apo reads, or lacking apo's version-0 samples; running the
    command each refusal names (or `roll train`, which prepares) lets the next step through."""
    import re
    import shlex

    from roll.errors import RollError
    from roll.stages.train import run as train_stage

    generate(GenerateConfig(run=run_dir, **SMALL))
    for missing, expected in (("verdicts", "roll verify --version 0"), ("scores", "roll score --version 0")):
        with pytest.raises(RollError, match=f"version\\(s\\) 0 of the lag window have no {missing}; run `{expected}`"):
            train_stage(TrainConfig(run=run_dir, objective="pmd-mean", **FAST))
        extra = ["--no-ref"] if missing == "scores" else []  # scores without π_ref: enough for pmd-mean, not apo
        roll_cli(*shlex.split(expected)[1:], "--run", run_dir, *extra)
    with pytest.raises(RollError, match=r"apo reads π_ref .* run `(roll score --version 0 --ref --force)`") as refused:
        train_stage(TrainConfig(run=run_dir, objective="apo", **FAST))
    roll_cli(*shlex.split(re.search(r"`([^`]*)`", str(refused.value)).group(1))[1:], "--run", run_dir)
    train_stage(TrainConfig(run=run_dir, objective="pmd-mean", **FAST))  # v1, from v0's own samples
    generate(GenerateConfig(run=run_dir, version=1, **SMALL))  # new prompts, never sampled from v0
    roll_cli("verify", "--run", run_dir, "--version", 1)
    roll_cli("score", "--run", run_dir, "--version", 1)
    with pytest.raises(RollError, match=r"apo needs version-0 samples of 6 prompt\(s\) of the window .* `roll train`"):
        train_stage(TrainConfig(run=run_dir, objective="apo", **FAST))
    assert Run(run_dir).policy_versions() == [0, 1]
    roll_cli("train", "--run", run_dir, "--objective", "apo", *(f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()))
    assert Run(run_dir).policy_versions() == [0, 1, 2]


def test_bad_input_gives_one_clear_line(run_dir, tmp_path):
    def error(*args):
        proc = roll_cli(*args, check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("roll: error: "), proc.stderr
        return lines[0]

    assert "unknown objective 'ppo2'" in error("train", "--run", run_dir, "--objective", "ppo2")
    assert "--beta 0.0: must be > 0" in error("train", "--run", run_dir, "--beta", "0")
    assert "--beta -1.0: must be > 0" in error("train", "--run", run_dir, "--beta", "-1")
    assert "holds no rollouts" in error("train", "--run", run_dir)  # nothing generated yet
    assert "policy version 7 does not exist" in error("train", "--run", run_dir, "--version", "7")
    assert "ppo is not a regression objective" in error("train", "--run", run_dir, "--objective", "ppo", "--anchor",
                                                          "parent")
    assert "--shift 2: ppo has no regression baseline" in error("train", "--run", run_dir, "--objective", "ppo",
                                                                 "--shift", "2")
    assert "--m2-budget 0.0: must be > 0" in error("train", "--run", run_dir, "--objective", "m2po", "--m2-budget", "0")
    assert "--data-slice '3/3': the index must satisfy" in error("train", "--run", run_dir, "--data-slice", "3/3")
    assert not Run(run_dir).policy_dir(1).exists()


def test_killed_update_leaves_no_new_version_and_the_rerun_equals_an_uninterrupted_one(run_dir, tmp_path):
    fixed_data_run(run_dir, prompts=16, group_size=8, max_new_tokens=32)
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    options = ["--epochs", "10", "--mini-batch", "32", "--micro-batch", "8"]  # 40 optimiser steps
    roll_cli("train", "--run", reference, *options)
    # killed once the progress bar of the optimiser steps is drawn (verify and score are done: the data was
    # prepared), so the kill lands inside the update
    kill_once_progress_is_drawn([sys.executable, "-m", "roll", "train", "--run", run_dir, *options], "train v0->v1")
    r = Run(run_dir)
    assert r.policy_versions() == [0] and not r.policy_dir(1).exists()
    assert query(r, "select count(*) from steps").fetchall() == [(0,)]
    roll_cli("train", "--run", run_dir, *options)  # the same command again
    assert r.policy_versions() == [0, 1]
    a = load_file(r.policy_dir(1) / "model.safetensors")
    b = load_file(Run(reference).policy_dir(1) / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6  # the same steps, in the same order
    assert not [p for p in r.root.rglob("*") if p.name.endswith(".tmp")]


def test_window_reads_rows_from_arrow_buffers_including_slices_and_nulls():
    """train's Window hands out each row's list columns as slices of Arrow's flat buffers: a sliced
    table (as DuckDB may return) and null lists (π_ref scored --no-ref) must give each row its own values."""
    import pyarrow as pa

    from roll.window import Window

    def lists(values, kind):
        return pa.array(values, pa.list_(kind)).slice(1)

    table = pa.table({
        "prompt_token_ids": lists([[9, 9], [3], None, [4, 5, 6]], pa.int32()),
        "token_ids": lists([[9], [2, 3], [4], [5]], pa.int32()),
        "trainer_logprobs": lists([[-9.0], [-0.2, -0.3], [-0.4], [-0.5]], pa.float32()),
        "ref_logprobs": lists([[-9.0], None, [-1.0], None], pa.float32()),
        "reward": [1.0, 0.0, 1.0],
    })
    window = Window(table)
    assert len(window) == 3 and window.scalars["reward"] == [1.0, 0.0, 1.0]
    assert [window[i]["prompt_token_ids"] is None for i in range(3)] == [False, True, False]
    assert window[0]["token_ids"].tolist() == [2, 3] and window[2]["prompt_token_ids"].tolist() == [4, 5, 6]
    assert window[1]["ref_logprobs"].tolist() == [-1.0] and window[0]["ref_logprobs"] is None
    assert [window.length("token_ids", i) for i in range(3)] == [2, 1, 1]
    assert window[0]["trainer_logprobs"].tolist() == pytest.approx([-0.2, -0.3])


def test_gradient_checkpointing_changes_memory_not_the_update(run_dir, tmp_path):
    """Recomputing each block's activations in backward is the same arithmetic again: the same step."""
    fixed_data_run(run_dir)
    plain = tmp_path / "plain"
    shutil.copytree(run_dir, plain)
    roll_cli("train", "--run", run_dir, "--gradient-checkpointing", "--lr", "1e-3")
    roll_cli("train", "--run", plain, "--lr", "1e-3")
    a = load_file(Run(run_dir).policy_dir(1) / "model.safetensors")
    b = load_file(Run(plain).policy_dir(1) / "model.safetensors")
    before = load_file(Run(run_dir).policy_dir(0) / "model.safetensors")
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-4  # a real step was taken
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_rows_sampled_at_different_temperatures_are_each_scored_at_their_own(run_dir):
    """One version's two shards sampled at T = 1.0 and T = 0.7, trained in one mini-batch: at the first step
    π_θ = π_b, so every token ratio must be 1 up to float32 rounding of log-probs under other padding (~1e-6;
    bound 1e-4). Scoring a micro-batch at its first row's temperature put the T = 0.7 rows' ratios far off."""
    for index, temperature in ((0, 1.0), (1, 0.7)):
        generate(GenerateConfig(run=run_dir, prompts=8, group_size=4, max_new_tokens=12, temperature=temperature,
                                shard=Shard(index, 2)))
    train(TrainConfig(run=run_dir, objective="pmd-mean", mini_batch=1000, micro_batch=5))  # micro-batches mix them
    (low, high), = query(Run(run_dir), "select ratio_min, ratio_max from steps where step = 0").fetchall()
    temperatures = query(Run(run_dir), "select distinct temperature from rollouts order by 1").fetchall()
    assert temperatures == [(0.7,), (1.0,)]
    assert 1 - 1e-4 < low <= high < 1 + 1e-4, (low, high)
