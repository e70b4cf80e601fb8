"""Training under torchrun: 2 CPU processes (gloo), under DDP or FSDP, give the same v+1 weights as one process."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from roll.stages.generate import GenerateConfig, run as generate
from roll.pipeline.prepare import prepare
from roll.store import Run, Shard, write_table

from conftest import fixed_data_run, roll_cli


@pytest.mark.parametrize("objective,sharding", [("stable-pess", []), ("ppo", []), ("stable-pess", ["--fsdp"])])
def test_torchrun_two_ranks_match_one_process(run_dir, tmp_path, objective, sharding):
    generate(GenerateConfig(run=run_dir, prompts=6, group_size=4, max_new_tokens=16))
    prepare(Run(run_dir), [0])  # verify and score once, so both copies train on identical tables
    # the tiny random model never answers right; give every group a spread of rewards (as a custom reward
    # job rewriting verdicts would) so every objective has a non-zero gradient
    path = Run(run_dir).shard_path("verdicts", 0, Shard(0, 1))
    verdicts = pq.read_table(path)
    rewards = pa.array([float(i % 2) for i in verdicts.column("sample_index").to_pylist()])
    write_table(path, "verdicts", verdicts.set_column(verdicts.schema.get_field_index("reward"), "reward", rewards))
    single = tmp_path / "single"
    shutil.copytree(run_dir, single)
    args = ["train", "--objective", objective, "--epochs", "2", "--mini-batch", "24", "--micro-batch", "4",
            "--lr", "1e-3"]
    # the run goes in $ROLL_RUN: torchrun's own parser would take `--run` for an abbreviation of its --run-path
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "roll", *args, *sharding], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ROLL_RUN": str(run_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    roll_cli(*args, "--run", single)
    a = load_file(Run(run_dir).policy_dir(1) / "model.safetensors")
    b = load_file(Run(single).policy_dir(1) / "model.safetensors")
    before = load_file(Run(run_dir).policy_dir(0) / "model.safetensors")
    moved = max((a[k] - before[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # two real optimiser steps happened (Adam moves each weight by up to ~lr a step)
    # Ranks sum gradients in another order than one process. Where a weight's gradient is of the size of that
    # rounding, Adam (m̂/√v̂) may step it another way: no bound below Adam's own step can hold there, and Adam
    # moves a weight by at most ~lr a step (|m̂/√v̂| ≤ 1 on the first step, ≤ ~1.3 on the second). Everywhere
    # else the two agree to float32 rounding of weights of size ≲ 1 (an ulp is ≤ 1.2e-7): so the median gap.
    lr, steps = 1e-3, 2
    gaps = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert gaps.max().item() <= 1.3 * 2 * lr * steps
    assert gaps.median().item() < 1.2e-7, gaps.median()
    # metrics reduced across ranks equal the single process's
    steps_a = Run(run_dir).connect().execute("select loss, tokens, entropy, ratio_max from steps order by step").fetchall()
    steps_b = Run(single).connect().execute("select loss, tokens, entropy, ratio_max from steps order by step").fetchall()
    assert [s[1] for s in steps_a] == [s[1] for s in steps_b]
    assert torch.allclose(torch.tensor(steps_a), torch.tensor(steps_b), atol=1e-5)


def torchrun_train(run_dir, *args):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "roll", "train", *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ROLL_RUN": str(run_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_machines_train(run_dir, *args):
    """`roll train --nnodes 2 --nproc 1` twice at once, as `srun` starts it on two nodes: two torchrun agents
    meeting over c10d at localhost, one rank (gloo) each. Returns each agent's stderr."""
    endpoint = f"localhost:{free_port()}"
    agents = [subprocess.Popen([sys.executable, "-m", "roll", "train", "--run", str(run_dir), "--nnodes", "2", "--nproc",
                                "1", "--rdzv-endpoint", endpoint, "--rdzv-id", f"test-{os.getpid()}", "--rdzv-timeout",
                                "120", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [agent.communicate(timeout=600) for agent in agents]
    for agent, (_, err) in zip(agents, outputs):
        assert agent.returncode == 0, err[-3000:]
    return [err for _, err in outputs]


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_optimizer_state_saved_by_two_machines_resumes_in_one_process_and_back(run_dir, tmp_path, sharding):
    """DESIGN §3.1a: the state is committed full and name-keyed, so the world size may change between updates —
    here from two machines (two torchrun agents, `roll train --nnodes 2`, as under Slurm) to one process and back.
    (One machine's two ranks, `--standalone`, are the tests above and below.)"""
    fixed_data_run(run_dir)
    step = ["--objective", "stable-pess", "--mini-batch", "1000", "--micro-batch", "4", "--lr", "1e-3"]
    two_then_one, one_then_two, one_one = (tmp_path / name for name in ("two_then_one", "one_then_two", "one_one"))
    for path in (two_then_one, one_then_two, one_one):
        shutil.copytree(run_dir, path)
    two_machines_train(two_then_one, *step, *sharding)
    roll_cli("train", "--run", two_then_one, "--lag", 1, *step)
    roll_cli("train", "--run", one_then_two, *step)
    two_machines_train(one_then_two, "--lag", 1, *step, *sharding)
    roll_cli("train", "--run", one_one, *step)
    roll_cli("train", "--run", one_one, "--lag", 1, *step)

    def bounded(w: dict, reference: dict, steps: int) -> None:
        # as in the first test: Adam's step bounds the gap where rounding decides a direction, float32 rounding
        # everywhere else; a fresh AdamW in the second update (state lost) would move most weights by ~lr
        # (a sign step) and fail the median
        gaps = torch.cat([(w[k] - reference[k]).abs().flatten() for k in w])
        assert gaps.max().item() <= 1.3 * 2 * 1e-3 * steps and gaps.median().item() < 1.2e-7, gaps.median()

    # the two machines' v1 is the one process's v1 (one step)
    bounded(load_file(Run(two_then_one).policy_dir(1) / "model.safetensors"),
            load_file(Run(one_one).policy_dir(1) / "model.safetensors"), 1)
    reference = load_file(Run(one_one).policy_dir(2) / "model.safetensors")
    state_reference = torch.load(Run(one_one).policy_dir(2) / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    for path in (two_then_one, one_then_two):
        assert json.loads((Run(path).policy_dir(2) / "policy.json").read_text())["optimizer"] == "resumed from v0001"
        bounded(load_file(Run(path).policy_dir(2) / "model.safetensors"), reference, 2)
        state = torch.load(Run(path).policy_dir(2) / "optimizer.pt", weights_only=True)["optimizer"]["state"]
        assert state.keys() == state_reference.keys()
        assert {float(s["step"]) for s in state.values()} == {2.0}
        for name in state:  # a lost state would differ by ~100 % (a one-step moment); summation order by far less
            for moment in ("exp_avg", "exp_avg_sq"):
                a, b = state[name][moment], state_reference[name][moment]
                assert (a - b).norm() <= 1e-3 * b.norm() + 1e-12, (name, moment)


def test_ranks_that_read_different_rows_refuse_to_train_all_at_once():
    """Across machines every rank reads the window from its own mount of the run: rank 1 here read one reward
    other than rank 0 did (a stale cache), so the digests differ and the update stops before a step. The process
    group is a stand-in with the collectives' semantics (rank 0's value broadcast; the flag's AND over ranks)."""
    from roll.errors import RollError
    from roll.stages.train import check_same_rows
    from roll.window import Window

    def window(rewards):
        lists = {name: [[1, 2], [3]] for name in Window.LISTS}
        return Window(pa.table({"policy_version": [0, 0], "prompt_id": ["a", "a"], "sample_index": [0, 1],
                                "reward": rewards, **lists}))

    class Rank:
        def __init__(self, rank, zero):
            self.active, self.rank, self.zero = True, rank, zero

        def broadcast(self, value):
            return self.zero

        def all_true(self, flag):  # both ranks' flags: rank 0 always agrees with itself
            return flag

    import hashlib
    rank0_digest = hashlib.sha256(repr([[0, 0], ["a", "a"], [0, 1], [1.0, 0.0]]).encode()).hexdigest()
    check_same_rows(window([1.0, 0.0]), 0, Rank(0, rank0_digest))  # the same rows: nothing said
    with pytest.raises(RollError, match=r"ranks of update 0 -> 1 read different rows .*rank 1: 2 rows"):
        check_same_rows(window([1.0, 1.0]), 0, Rank(1, rank0_digest))


def test_a_rendezvous_that_cannot_complete_ends_in_one_line_and_commits_nothing(run_dir):
    """One of two agents never starts: the other gives up after --rdzv-timeout seconds, before any rank exists,
    saying so in one line (no traceback), and no policy v1 appears."""
    import time

    started = time.monotonic()
    proc = roll_cli("train", "--run", run_dir, "--nnodes", 2, "--nproc", 1, "--rdzv-endpoint", f"localhost:{free_port()}",
                    "--rdzv-id", "alone", "--rdzv-timeout", 3, check=False, timeout=120)
    elapsed = time.monotonic() - started
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("roll: error: the rendezvous at localhost:") and "within 3 s" in lines[0], lines
    assert elapsed < 60, elapsed  # 3 s to wait, plus the start of one process
    assert Run(run_dir).policy_versions() == [0]


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_ranks_train_rows_sampled_at_two_temperatures(run_dir, sharding):
    """One version's shards sampled at T = 1.0 (3 prompts) and 0.5 (5), G = 3, on 2 ranks in micro-batches of 2: every rank
    runs the same number of forward/backward passes (each is a collective step), so the update ends — splitting
    micro-batches by temperature once hung FSDP and aborted DDP — and at the first step π_θ = π_b, so every
    token ratio is 1 up to float32 rounding of log-probs under other padding (~1e-6; bound 1e-4)."""
    from roll.store import query

    for index, temperature in ((0, 1.0), (1, 0.5), (2, 0.5)):  # 3 prompts at T = 1, 5 at T = 0.5
        generate(GenerateConfig(run=run_dir, prompts=8, group_size=3, max_new_tokens=10, temperature=temperature,
                                shard=Shard(index, 3)))
    prepare(Run(run_dir), [0])
    torchrun_train(run_dir, "--objective", "pmd-mean", "--mini-batch", 1000, "--micro-batch", 2, *sharding)
    (low, high), = query(Run(run_dir), "select ratio_min, ratio_max from steps where step = 0").fetchall()
    assert 1 - 1e-4 < low <= high < 1 + 1e-4, (low, high)
