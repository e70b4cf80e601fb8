"""roll ope: logarithmic-smoothing estimates and bounds (roll/ope.py) and the stage that feeds them stale rows."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from roll.ope import LAMBDA_GRID, evaluate, log_prompt_values, ls_bound, ls_estimate
from roll.store import Run, query

from conftest import fixed_data_run, roll_cli, wait_for


def test_estimate_and_bound_against_hand_computation():
    """One row per prompt: the paper's formulas written out with plain floats."""
    w = [0.5, 2.0, 1.0, 4.0, 0.25]
    r = [1.0, 0.0, 1.0, 0.5, 1.0]
    lam, delta, n = 0.3, 0.1, 5
    terms = [math.log(1 + lam * wi * ri) for wi, ri in zip(w, r)]
    by_hand_estimate = sum(terms) / n / lam
    by_hand_bound = (math.exp(sum(terms) / n - math.log(1 / delta) / n) - 1) / lam
    log_z = log_prompt_values(np.log(w), np.array(r), np.arange(5))
    # log-space arithmetic against direct: a few ulps of numbers of size ~1
    assert ls_estimate(log_z, lam) == pytest.approx(by_hand_estimate, rel=1e-12)
    assert ls_bound(log_z, lam, delta) == pytest.approx(max(0.0, by_hand_bound), abs=1e-12)
    out = evaluate(np.log(w), r, np.arange(5), delta, lam)
    assert out["ips"] == pytest.approx(sum(wi * ri for wi, ri in zip(w, r)) / n, rel=1e-12)
    assert out["snips"] == pytest.approx(sum(wi * ri for wi, ri in zip(w, r)) / sum(w), rel=1e-12)
    assert out["ess"] == pytest.approx(sum(w) ** 2 / sum(wi * wi for wi in w), rel=1e-12)
    assert out["ls_estimate"] <= out["ips"]  # log(1 + x) ≤ x
    assert evaluate(np.log(w), r, np.arange(5), delta, "sqrt")["lambda"] == pytest.approx(1 / math.sqrt(5))


def test_a_prompts_rows_make_one_unit_the_mean_of_w_times_r():
    """G completions of one prompt are one independent unit: z = mean of w·r over the group."""
    log_w = np.log([1.0, 3.0, 2.0, 0.5])
    rewards = np.array([1.0, 0.5, 0.0, 1.0])
    log_z = log_prompt_values(log_w, rewards, np.array(["a", "a", "b", "b"]))
    assert np.exp(log_z) == pytest.approx([(1.0 + 1.5) / 2, (0.0 + 0.5) / 2], rel=1e-12)
    assert np.isneginf(log_prompt_values(np.zeros(2), np.zeros(2), np.array(["c", "c"]))).all()  # z = 0


def test_log_weights_of_plus_minus_1000_give_finite_numbers():
    log_w = np.array([1000.0, -1000.0, 0.0, 999.0, -5.0, 3.0])
    rewards = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.5])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # overflow or NaN fails (underflow to 0 is exact enough)
        for rule in ("auto", "sqrt", 0.01):
            out = evaluate(log_w, rewards, np.arange(6), 0.05, rule)
            finite = {k: out[k] for k in ("ls_estimate", "ls_bound", "snips", "ess", "ess_share", "log_ips", "lambda")}
            assert all(math.isfinite(v) for v in finite.values()), finite
            assert 0.0 <= out["ls_bound"] <= 1.0
            assert out["heavy_share"] == pytest.approx(2 / 6)
    assert out["log_ips"] == pytest.approx(1000.0 + math.log(1 + math.exp(-1000)) - math.log(6), abs=1e-9)
    # the rows of weight e^1000 (reward 1) and e^999 (reward 0) hold all the weight: e / (e + 1)
    assert out["snips"] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)


def bandit(rng, pi, pi_b, means, n):
    actions = rng.choice(len(pi_b), size=n, p=pi_b)
    rewards = (rng.random(n) < means[actions]).astype(float)
    return np.log(pi[actions] / pi_b[actions]), rewards


def test_the_bound_covers_the_true_value_and_is_tighter_than_hoeffding_on_clipped_ips():
    """K = 10 arms, known π and π_b (π puts its mass where π_b rarely looks: max weight 9), Bernoulli rewards.
    Over 400 replications of n = 500 the LS bound (δ = 0.05) must lie below V in at least 95 % of them (the
    theorem says ≥ 1 − δ for each); and on average it must sit above the Hoeffding bound on IPS clipped at M
    (which is valid: clipping only lowers a nonnegative estimate), mean − M·√(log(1/δ)/2n), for M = √n as in
    the paper's code and for M = 9, the largest weight, where clipped IPS is IPS itself."""
    rng = np.random.default_rng(0)
    k, n, delta, replications = 10, 500, 0.05, 400
    pi_b = np.full(k, 1 / k)
    pi = np.array([0.9] + [0.1 / (k - 1)] * (k - 1))
    means = np.linspace(0.8, 0.1, k)
    truth = float(pi @ means)
    ls = {"sqrt": [], "auto": []}
    hoeffding = {math.sqrt(n): [], 9.0: []}
    for _ in range(replications):
        log_w, rewards = bandit(rng, pi, pi_b, means, n)
        for rule in ls:
            ls[rule].append(evaluate(log_w, rewards, np.arange(n), delta, rule)["ls_bound"])
        for m in hoeffding:
            clipped = np.minimum(np.exp(log_w), m) * rewards
            hoeffding[m].append(max(0.0, clipped.mean() - m * math.sqrt(math.log(1 / delta) / (2 * n))))
    for rule, bounds in ls.items():
        coverage = np.mean(np.array(bounds) <= truth)
        assert coverage >= 1 - delta, (rule, coverage)
        assert np.mean(bounds) > max(np.mean(h) for h in hoeffding.values()), (rule, np.mean(bounds))
    assert np.mean(ls["sqrt"]) > 0.3 * truth  # informative, not a trivial 0


def test_auto_lambda_pays_for_the_grid_in_delta():
    log_z = np.log(np.full(200, 0.5))
    lam, bound = __import__("roll.ope", fromlist=["choose_lambda"]).choose_lambda(log_z, "auto", 0.05)
    assert lam in LAMBDA_GRID
    assert bound == pytest.approx(ls_bound(log_z, lam, 0.05 / len(LAMBDA_GRID)), rel=1e-12)
    assert bound == max(ls_bound(log_z, g, 0.05 / len(LAMBDA_GRID)) for g in LAMBDA_GRID)


@pytest.fixture
def verified_run(run_dir):
    """v0's rollouts, verified, in two shards."""
    for index in (0, 1):
        roll_cli("generate", "--run", run_dir, "--prompts", 8, "--group-size", 4, "--max-new-tokens", 16,
                 "--shard", f"{index}/2")
    roll_cli("verify", "--run", run_dir)
    return run_dir


def test_ope_of_the_behaviour_policy_on_its_own_rows_recovers_its_reward(verified_run):
    """Target = behaviour (v0 on v0's rows): every log-weight is the scorer-vs-sampler gap (float32, ~1e-6 per
    token over ≤ 16 tokens), so IPS and SNIPS equal the mean reward to ~1e-4. Shards resume: the summary
    appears once both shards' weights are committed, and a rerun weighs nothing."""
    run = verified_run
    first = json.loads(roll_cli("ope", "--run", run, "--version", 0, "--data-versions", "0..0", "--shard", "0/2").stdout)
    assert first["complete"] is False and first["rows_weighed"] == 16
    second = json.loads(roll_cli("ope", "--run", run, "--version", 0, "--data-versions", "0..0", "--shard", "1/2").stdout)
    assert second["complete"] is True and second["rows"] == 32 and second["prompts"] == 8
    mean_reward = query(Run(run), "select avg(reward) from verdicts").fetchall()[0][0]
    worst = query(Run(run), "select max(abs(log_weight)) from ope").fetchall()[0][0]
    assert worst < 16 * 1e-5
    assert second["ips"] == pytest.approx(mean_reward, abs=1e-3) and second["snips"] == pytest.approx(mean_reward, abs=1e-3)
    assert second["ess_share"] == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= second["ls_bound"] <= mean_reward + 1e-3
    again = json.loads(roll_cli("ope", "--run", run, "--version", 0, "--data-versions", "0..0").stdout)
    assert again["rows_weighed"] == 0 and again["ls_bound"] == second["ls_bound"]
    assert query(Run(run), "select count(*) from ope_summary").fetchall() == [(1,)]
    # the bound against the truth as a figure: v0's own rows are its on-policy data (data lag 0)
    roll_cli("report", "--run", run, "--out", run / "report")
    png = (run / "report" / "ope.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "![ope](ope.png)" in (run / "report" / "summary.md").read_text()


def test_bad_ope_input_is_one_line_and_exit_2(verified_run, tmp_path, run_dir):
    cases = [
        (["--version", 5, "--data-versions", "0..0"], "policy"),  # no checkpoint v5
        (["--version", 0, "--data-versions", "0..0", "--delta", 1.5], "--delta"),
        (["--version", 0, "--data-versions", "0..0", "--delta", 0], "--delta"),
        (["--version", 0, "--data-versions", "3..4"], "no rollouts"),
        (["--version", 0, "--data-versions", "0..0", "--lambda", "big"], "--lambda"),
    ]
    for args, words in cases:
        proc = roll_cli("ope", "--run", verified_run, *args, check=False)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
    unverified = tmp_path / "unverified"
    roll_cli("init", "--run", unverified)
    roll_cli("generate", "--run", unverified, "--prompts", 2, "--group-size", 2, "--max-new-tokens", 8)
    proc = roll_cli("ope", "--run", unverified, "--version", 0, "--data-versions", "0..0", check=False)
    assert proc.returncode == 2 and "no verdicts" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not Run(unverified).committed_files("ope")


def test_a_killed_ope_resumes_and_ends_like_an_uninterrupted_one(run_dir, tmp_path):
    """Per-row weights are committed one file per rollout file: killed after the first, a rerun weighs only the
    rest, and the estimates equal an uninterrupted run's (the same rows, weighed by the same code)."""
    import shutil
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from roll.pipeline.prepare import prepare
    from roll.stages.generate import GenerateConfig, run as generate
    from roll.store import Shard

    for index in range(4):  # in this process: the rollouts are the setting, the ope processes the test
        generate(GenerateConfig(run=run_dir, prompts=16, group_size=2, max_new_tokens=16, shard=Shard(index, 4)))
    prepare(Run(run_dir), [0], ref=False)
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    args = ["ope", "--version", "0", "--data-versions", "0..0"]
    uninterrupted = json.loads(roll_cli(*args, "--run", reference).stdout)
    directory = Run(run_dir).version_dir("ope", 0)

    def weighed():
        return [p for p in directory.iterdir() if p.name.startswith("from-")] if directory.is_dir() else []

    proc = subprocess.Popen([sys.executable, "-m", "roll", *args, "--run", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: weighed() or proc.poll() is not None, timeout=300, what="the first file of log-weights")
    proc.kill()
    proc.wait()
    done = weighed()
    assert all(pq.read_table(path).num_rows == 8 for path in done)  # whatever is visible is whole
    summaries = query(Run(run_dir), "select count(*) from ope_summary").fetchone()[0]
    assert len(done) == 4 or summaries == 0  # no summary before every file is weighed
    resumed = json.loads(roll_cli(*args, "--run", run_dir).stdout)
    assert resumed["complete"] is True and resumed["rows_weighed"] == 32 - 8 * len(done)
    for key in ("ls_bound", "ls_estimate", "ips", "snips", "ess"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-12), key


def test_judging_a_checkpoint_on_rows_its_ancestry_trained_on_is_flagged(run_dir):
    """EXPERIMENTS.md (lag 4): on rows an update of V's ancestry read, the bound failed; roll says so."""
    fixed_data_run(run_dir)
    roll_cli("train", "--run", run_dir)  # v1, trained on v0's rows
    assert Run(run_dir).trained_on(1) == {0} and Run(run_dir).trained_on(0) == set()
    flagged = roll_cli("ope", "--run", run_dir, "--version", 1, "--data-versions", "0..0")
    assert [line for line in flagged.stderr.splitlines() if line.startswith("roll:")] == [flagged.stderr.splitlines()[0]]
    assert "version(s) 0 of 0..0 trained v1 or an ancestor: the estimates are in-sample" in flagged.stderr
    assert "in-sample" not in roll_cli("ope", "--run", run_dir, "--version", 0, "--data-versions", "0..0").stderr
