"""iterate and report: resuming after SIGKILL inside a stage, and real PNG plots from SQL over runs."""
from __future__ import annotations

import json
import random
import signal
import struct
import subprocess
import sys
import time

import pytest

from roll.store import Run, query

from conftest import roll_cli

ITERATE = ["iterate", "--iterations", 3, "--prompts", 6, "--group-size", 4, "--max-new-tokens", 16,
           "--eval-every", 0, "--lag", 1, "--window", 2]


def stage_files(run: Run) -> set[str]:
    """Every file in the run, hidden ones included: a temporary left by the killed process must be gone too."""
    return {str(p.relative_to(run.root)) for p in run.root.rglob("*") if p.is_file()}


def kill_inside(run_dir, marker: str, timeout: float = 120.0) -> None:
    """Start `roll iterate`, SIGKILL it once `marker` (a path glob inside the run) exists, plus a random beat."""
    proc = subprocess.Popen([sys.executable, "-m", "roll", *map(str, ITERATE), "--run", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not list(run_dir.glob(marker)) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(marker).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Run:
    """The run every killed-and-rerun one must end like (made once for the module)."""
    path = tmp_path_factory.mktemp("uninterrupted") / "run"
    roll_cli("init", "--run", path, "--model", tiny_model_dir)
    roll_cli(*ITERATE, "--run", path)
    return Run(path)


@pytest.mark.parametrize("marker", [
    "policies/v0001/policy.json",  # then inside generate of version 1 (sampling or its commit)
    "rollouts/version=0001/part-*",  # then inside train 1 → 2's verify and score
    "scores/version=0001/*.parquet",  # then inside train 1 → 2's optimisation or its commit
])
def test_sigkill_inside_a_stage_then_rerun_ends_like_an_uninterrupted_run(tmp_path, tiny_model_dir, uninterrupted,
                                                                          marker):
    killed = tmp_path / "killed"
    roll_cli("init", "--run", killed, "--model", tiny_model_dir)
    kill_inside(killed, marker)
    roll_cli(*ITERATE, "--run", killed)
    a, b = uninterrupted, Run(killed)
    assert a.policy_versions() == b.policy_versions() == [0, 1, 2, 3]
    count = "select policy_version, count(*), count(distinct (prompt_id, sample_index)) from {} group by 1 order by 1"
    for table in ("rollouts", "verdicts", "scores"):
        assert query(a, count.format(table)).fetchall() == query(b, count.format(table)).fetchall()
    assert query(b, "select count(*) from steps").fetchall() == query(a, "select count(*) from steps").fetchall()
    assert stage_files(a) == stage_files(b)


def test_report_writes_real_images_and_a_summary(tmp_path, tiny_model_dir):
    runs = []
    for objective in ("ppo", "stable-pess"):
        path = tmp_path / objective
        roll_cli("init", "--run", path, "--model", tiny_model_dir)
        roll_cli("iterate", "--run", path, "--objective", objective, "--iterations", 2, "--prompts", 4,
                 "--group-size", 4, "--max-new-tokens", 12, "--eval-every", 1, "--eval-k", 2, "--eval-limit", 8)
        runs += ["--run", path]
    roll_cli("report", *runs, "--out", tmp_path / "report")
    for name in ("pass1.png", "training.png", "regimes.png"):
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        width, height = struct.unpack(">II", data[16:24])  # IHDR: a real, full-size figure
        assert width >= 1000 and height >= 400
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "| ppo | ppo |" in summary and "| stable-pess | stable-pess |" in summary
    assert summary.count("![") == 3


def test_sample_every_commits_a_version_per_step_on_disjoint_slices_of_one_sampling(tmp_path, tiny_model_dir):
    """--sample-every S (the sync interval with a version per step; S ≥ iterations is offline): with S = 3 and
    P = 2, version 0 alone samples 3 × 2 prompts, and updates 0→1, 1→2, 2→3 each take one step on 2 of them, the
    three slices disjoint and together the whole sampling, at lags 0, 1, 2."""
    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", tiny_model_dir)
    roll_cli("iterate", "--run", run, "--iterations", 3, "--sample-every", 3, "--prompts", 2, "--group-size", 4,
             "--max-new-tokens", 12, "--eval-every", 0, "--objective", "decoupled-ppo")
    r = Run(run)
    assert r.policy_versions() == [0, 1, 2, 3]
    assert query(r, "select policy_version, count(*), count(distinct prompt_id) from rollouts group by 1").fetchall() == [
        (0, 24, 6)]
    assert query(r, "select policy_version, step, lag_mean from steps order by 1").fetchall() == [
        (1, 0, 0.0), (2, 0, 1.0), (3, 0, 2.0)]
    slices = [{p for (p,) in query(r, f"select prompt_id from groups where policy_version = {v}").fetchall()}
              for v in (1, 2, 3)]
    assert [len(s) for s in slices] == [2, 2, 2] and len(slices[0] | slices[1] | slices[2]) == 6
    metas = [json.loads((r.policy_dir(v) / "policy.json").read_text()) for v in (1, 2, 3)]
    assert [m["parent_forward_rows"] for m in metas] == [0, 8, 8]  # v0 sampled update 0's rows; later parents did not
    refused = roll_cli("iterate", "--run", run, "--sample-every", 3, "--lag", 1, check=False)
    assert refused.returncode == 2 and "drop --sync-interval, --lag and --window" in refused.stderr


def test_a_sync_interval_samples_once_per_version_and_takes_that_many_steps(tmp_path, tiny_model_dir):
    """DESIGN §3.1's second kind of staleness: with S = 2 and P = 3, each version samples 2 × 3 prompts once and
    its update takes 2 optimiser steps, each on 3 whole groups (3 × G rows) that the other step does not see,
    all sampled by the version being updated (π_b fixed through the update)."""
    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", tiny_model_dir)
    roll_cli("iterate", "--run", run, "--iterations", 2, "--sync-interval", 2, "--prompts", 3, "--group-size", 4,
             "--max-new-tokens", 12, "--eval-every", 0, "--micro-batch", 6)
    r = Run(run)
    assert r.policy_versions() == [0, 1, 2]
    assert query(r, "select policy_version, count(*), count(distinct prompt_id) from rollouts group by 1 order by 1"
                 ).fetchall() == [(0, 24, 6), (1, 24, 6)]
    # one steps row per optimiser step; its tokens are those of its 3 groups, its lag 0 (v's own rows)
    steps = query(r, "select policy_version, step, tokens, lag_mean from steps order by 1, 2").fetchall()
    assert [(v, s, lag) for v, s, _, lag in steps] == [(1, 0, 0.0), (1, 1, 0.0), (2, 0, 0.0), (2, 1, 0.0)]
    tokens_of_step = {(v, s): t for v, s, t, _ in steps}
    for version in (1, 2):
        prompts_of_step = {step: {p for (p,) in query(r, f"select prompt_id from groups where policy_version = "
                                                       f"{version} and step = {step}").fetchall()} for step in (0, 1)}
        assert len(prompts_of_step[0]) == len(prompts_of_step[1]) == 3
        assert not prompts_of_step[0] & prompts_of_step[1]
        sampled = {p for (p,) in query(r, f"select distinct prompt_id from rollouts where policy_version = "
                                          f"{version - 1}").fetchall()}
        assert prompts_of_step[0] | prompts_of_step[1] == sampled
        for step in (0, 1):
            tokens = query(r, f"select sum(len(token_ids)) from rollouts where policy_version = {version - 1} and "
                              f"prompt_id in ({', '.join(repr(p) for p in prompts_of_step[step])})").fetchone()[0]
            assert tokens_of_step[(version, step)] == tokens
    refused = roll_cli("iterate", "--run", run, "--sync-interval", 0, check=False)
    assert refused.returncode == 2 and refused.stderr.strip() == "roll: error: --sync-interval 0: must be at least 1"


def test_a_run_has_collapsed_when_its_final_pass1_falls_more_than_two_standard_errors_below_its_first():
    from roll.pipeline.report import collapsed

    first = {"pass1": 0.30, "pass1_se": 0.02}  # the bar: 0.30 − 2 × 0.02 = 0.26
    assert collapsed([first, {"pass1": 0.40}, {"pass1": 0.2599}])
    assert not collapsed([first, {"pass1": 0.10}, {"pass1": 0.2601}])  # judged on the final evaluation
    assert not collapsed([first])


def test_the_chain_task_runs_two_iterations_from_its_bundled_model(tmp_path):
    """`roll init --task chain && roll iterate --iterations 2` (at a small scale): the run starts from
    data/chain_model, records 256 new tokens (32 per step at S = 8), the exact verifier judges `answer: N`, and
    the bundled model writes step lines (it was trained on them) that run past the arith task's 48 tokens."""
    import tomllib

    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--task", "chain")
    config = tomllib.loads((run / "run.toml").read_text())
    assert config["max_new_tokens"] == 256 and config["model"].endswith("chain_model")
    summary = json.loads(roll_cli("iterate", "--run", run, "--iterations", 2, "--prompts", 4, "--group-size", 2,
                                  "--eval-every", 0, timeout=900).stdout)
    assert summary["versions"] == 2 and Run(run).policy_versions() == [0, 1, 2]
    rows = query(Run(run), "select max_new_tokens, len(token_ids) as n, completion, reward, verifier "
                           "from samples where policy_version = 0").fetchall()
    assert {r[0] for r in rows} == {256} and {r[4] for r in rows} == {"arith arith 1"}
    assert sum(r[1] for r in rows) / len(rows) > 100 and all(r[2].startswith("s0 = ") for r in rows)
