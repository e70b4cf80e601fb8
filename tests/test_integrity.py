"""Nothing lost, nothing mixed, nothing non-finite committed (DESIGN §6), tried as a careless user would."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from roll.stages.generate import GenerateConfig, run as generate
from roll.pipeline.prepare import prepare
from roll.store import Run, Shard, query, write_table

from conftest import roll_cli


def one_line_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("roll: error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def committed(run_dir) -> set[str]:
    """Every visible file of the run (what a reader or SQL can see)."""
    root = Run(run_dir).root
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def set_rewards(run_dir, rewards):
    path = Run(run_dir).shard_path("verdicts", 0, Shard(0, 1))
    verdicts = pq.read_table(path)
    values = pa.array([rewards(i) for i in range(verdicts.num_rows)], pa.float64())
    write_table(path, "verdicts", verdicts.set_column(verdicts.schema.get_field_index("reward"), "reward", values))


def test_an_update_with_a_non_finite_outcome_is_refused_and_nothing_is_committed(run_dir):
    generate(GenerateConfig(run=run_dir, prompts=4, group_size=4, max_new_tokens=12))
    prepare(Run(run_dir), [0])
    set_rewards(run_dir, lambda i: float(i % 2))
    before = committed(run_dir)
    # weights of ±1e30 are finite, but the policy they make is not: its log-probs are NaN
    assert "log-probs are not finite" in one_line_error(roll_cli("train", "--run", run_dir, "--lr", "1e30", check=False))
    assert committed(run_dir) == before and Run(run_dir).policy_versions() == [0]
    set_rewards(run_dir, lambda i: 1e39 * (i % 2))  # finite, absurd rewards: (β·Δ − A)² overflows float32
    for objective in ("stable-pess", "pmd-mean"):  # (ppo normalises its advantages: it trains on them)
        line = one_line_error(roll_cli("train", "--run", run_dir, "--objective", objective, check=False))
        assert "nothing committed" in line
        assert committed(run_dir) == before and Run(run_dir).policy_versions() == [0]


def test_temperatures_that_overflow_the_diagnostics_are_refused_with_one_line(run_dir):
    assert "--beta 1e-300: must be at least 1e-08" in one_line_error(
        roll_cli("train", "--run", run_dir, "--beta", "1e-300", check=False))
    assert "--beta1 1e-30: must be at least 1e-08" in one_line_error(
        roll_cli("train", "--run", run_dir, "--beta1", "1e-30", check=False))


def test_summaries_are_valid_json_with_null_for_non_finite_numbers(capsys):
    from roll.cli import print_summary

    print_summary({"loss": math.nan, "k": [math.inf, 1.0], "nested": {"x": -math.inf}})
    assert json.loads(capsys.readouterr().out) == {"loss": None, "k": [None, 1.0], "nested": {"x": None}}


def test_flat_groups_are_named_with_their_share_and_can_be_dropped(run_dir):
    generate(GenerateConfig(run=run_dir, prompts=4, group_size=4, max_new_tokens=12))
    prepare(Run(run_dir), [0])
    set_rewards(run_dir, lambda i: float(i < 4))  # group 1 all correct, groups 2-4 all wrong: no spread anywhere
    proc = roll_cli("train", "--run", run_dir, "--objective", "ppo", check=False)
    assert "roll: 4 of 4 groups (100%) have no reward spread; ppo: no gradient (advantage 0)" in proc.stderr
    line = one_line_error(roll_cli("train", "--run", run_dir, "--version", 0, "--force", "--drop-zero-variance", check=False))
    assert "nothing left to train on" in line
    set_rewards(run_dir, lambda i: float(i in (0, 4, 5)))  # groups 1 and 2 have a spread, 3 and 4 do not
    proc = roll_cli("train", "--run", run_dir, "--version", 0, "--force", "--drop-zero-variance")
    assert "roll: 2 of 4 groups (50%) have no reward spread; left out (--drop-zero-variance)" in proc.stderr
    assert json.loads(proc.stdout)["groups"] == 2 and json.loads(proc.stdout)["rows"] == 8


def test_groups_of_one_sample_are_named(run_dir):
    generate(GenerateConfig(run=run_dir, prompts=3, group_size=1, max_new_tokens=12))
    proc = roll_cli("train", "--run", run_dir, "--objective", "stable-pess")
    assert "roll: 3 of 3 groups (100%) have one sample (3) or no reward spread; stable-pess: raises every sampled " \
           "completion (advantage s·β)" in proc.stderr


def test_a_lag_window_before_version_0_is_clamped_loudly_and_recorded(run_dir):
    generate(GenerateConfig(run=run_dir, prompts=2, group_size=2, max_new_tokens=8))
    proc = roll_cli("train", "--run", run_dir, "--lag", 5, "--window", 3)
    assert "roll: the lag window [-7, -5] of update 0 -> 1 reaches before version 0; reading [0, 0] (lag 0)" in proc.stderr
    meta = json.loads((Run(run_dir).policy_dir(1) / "policy.json").read_text())
    assert meta["data_versions"] == [0] and meta["data_window"] == [0, 0] and meta["hyperparameters"]["lag"] == 5


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs of our own, to fill and to remount read-only (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs under CI: {proc.stderr.strip()}")
        pytest.skip(f"mounting a tmpfs needs root: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk, leave: int) -> None:
    """Fill the file system of `disk` until about `leave` bytes are free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def test_disk_full_and_read_only_give_one_line_and_leave_nothing_half_written(run_dir, small_disk):
    run = small_disk / "run"
    shutil.copytree(run_dir, run)
    generate(GenerateConfig(run=run, prompts=4, group_size=4, max_new_tokens=12))
    prepare(Run(run), [0])
    before = committed(run)
    fill(small_disk, 64 * 1024)  # the steps and groups tables fit, the checkpoint does not
    line = one_line_error(roll_cli("train", "--run", run, check=False))
    assert "No space left on device" in line and str(run) in line
    assert committed(run) == before and Run(run).policy_versions() == [0]
    assert not [p for p in Run(run).root.rglob("*") if p.name.endswith(".tmp")]  # no temporary left behind
    line = one_line_error(roll_cli("generate", "--run", run, "--version", 0, "--shard", "0/1", "--force", check=False))
    assert "No space left on device" in line
    assert committed(run) == before
    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    line = one_line_error(roll_cli("train", "--run", run, check=False))
    assert "Read-only file system" in line
    assert committed(run) == before


def test_shards_and_checkpoints_get_the_process_umask(run_dir):
    generate(GenerateConfig(run=run_dir, prompts=2, group_size=2, max_new_tokens=8))
    roll_cli("train", "--run", run_dir)
    run = Run(run_dir)
    files = [*run.files("rollouts", 0).values(), run.train_path("steps", 1), *run.policy_dir(1).iterdir()]
    assert {oct(path.stat().st_mode & 0o777) for path in files} == {oct(0o644)}  # the test runner's umask 022
    old = os.umask(0o002)  # a group-writable project directory
    try:
        roll_cli("generate", "--run", run_dir, "--version", 1)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in run.files("rollouts", 1).values()} == {oct(0o664)}


def test_verdicts_and_scores_of_replaced_rollouts_are_redone_never_joined(run_dir):
    small = ["--prompts", 4, "--group-size", 4, "--max-new-tokens", 12]
    roll_cli("generate", "--run", run_dir, *small)
    roll_cli("verify", "--run", run_dir)
    roll_cli("score", "--run", run_dir)
    r = Run(run_dir)
    joined = "select count(*), count(reward), count(trainer_logprobs) from samples"
    assert query(r, joined).fetchall() == [(16, 16, 16)]
    # the same command again with --force draws the same completions: verdicts and scores stay valid
    roll_cli("generate", "--run", run_dir, *small, "--force")
    assert json.loads(roll_cli("verify", "--run", run_dir).stdout)["shards"] == 0
    # other completions (another seed): the old verdicts and scores no longer join, and are redone
    roll_cli("generate", "--run", run_dir, *small, "--force", "--seed", 1)
    assert query(r, joined).fetchall() == [(16, 0, 0)]
    line = one_line_error(roll_cli("score", "--run", run_dir, check=False))
    assert "regenerated; run `roll verify`" in line
    out = roll_cli("train", "--run", run_dir)  # prepares (verify, score) what is stale, then trains
    assert "running verify" in out.stderr and "running score" in out.stderr
    assert query(r, joined).fetchall() == [(16, 16, 16)]
    assert query(r, "select count(distinct generation_id) from samples").fetchall() == [(1,)]


def test_an_evaluation_with_other_settings_is_never_a_cache_hit(run_dir):
    first = json.loads(roll_cli("evaluate", "--run", run_dir, "--k", 4, "--limit", 6, "--max-new-tokens", 8).stdout)
    again = json.loads(roll_cli("evaluate", "--run", run_dir, "--k", 4, "--limit", 6, "--max-new-tokens", 8).stdout)
    assert again["skipped"] and again["pass@1"] == first["pass@1"]
    other = json.loads(roll_cli("evaluate", "--run", run_dir, "--k", 1, "--limit", 6, "--max-new-tokens", 8).stdout)
    assert not other["skipped"] and other["k"] == 1
    r = Run(run_dir)
    rows = query(r, "select json_extract(settings, '$.k')::INT as k, count(*) from evals group by 1 order by 1").fetchall()
    assert rows == [(1, 6), (4, 24)]


def test_a_device_that_is_not_there_is_one_line(run_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    generate(GenerateConfig(run=run_dir, prompts=2, group_size=2, max_new_tokens=8))
    for command in (["generate", "--version", 0, "--force"], ["score"], ["train"], ["evaluate", "--limit", 2]):
        line = one_line_error(roll_cli(*command, "--run", run_dir, "--device", "cuda", check=False))
        assert "--device cuda: no CUDA device is available" in line


# A file's content must match its place (DESIGN §3.2): v0's rows copied under version=0001, a float version
# column, other columns, a shard copied over another shard's name. `roll sql` answers without the file and
# names it in one line on stderr; every stage that would read it refuses, naming it, with exit 2.
def _v0_shard(run: Run, index: int) -> pa.Table:
    return pq.read_table(run.shard_path("rollouts", 0, Shard(index, 2)))


def _with_version(table: pa.Table, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index("policy_version"), "policy_version", values)


MISPLACED = {  # case → (where the file goes, what it holds)
    "v0 rows copied under version 1": (
        "rollouts/version=0001/part-00000-of-00002.parquet", lambda run: _v0_shard(run, 0)),
    "a float version column": (
        "rollouts/version=0001/part-00000-of-00002.parquet",
        lambda run: _with_version(_v0_shard(run, 0), pa.array([1.0] * _v0_shard(run, 0).num_rows, pa.float64()))),
    "other columns": (
        "rollouts/version=0001/part-00000-of-00002.parquet",
        lambda run: _with_version(_v0_shard(run, 0), pa.array([1] * _v0_shard(run, 0).num_rows, pa.int64()))
        .drop(["behaviour_logprobs"]).append_column("note", pa.array(["x"] * _v0_shard(run, 0).num_rows))),
    "shard 0 copied over shard 1": (
        "rollouts/version=0000/part-00001-of-00002.parquet", lambda run: _v0_shard(run, 0)),
    "a float version column in the version train reads": (
        "rollouts/version=0000/extra-float.parquet",
        lambda run: _with_version(_v0_shard(run, 1), pa.array([0.0] * _v0_shard(run, 1).num_rows, pa.float64()))),
}


@pytest.mark.parametrize("case", list(MISPLACED))
def test_a_file_whose_content_disagrees_with_its_place_is_left_out_by_sql_and_refused_by_the_stages(run_dir, case):
    for index in (0, 1):
        generate(GenerateConfig(run=run_dir, prompts=4, group_size=2, max_new_tokens=8, shard=Shard(index, 2)))
    run = Run(run_dir)
    prepare(run, [0])
    rows = {i: _v0_shard(run, i).num_rows for i in (0, 1)}
    place, make = MISPLACED[case]
    bad = run.root / place
    bad.parent.mkdir(parents=True, exist_ok=True)
    if case == "v0 rows copied under version 1" or case == "shard 0 copied over shard 1":
        shutil.copyfile(run.shard_path("rollouts", 0, Shard(0, 2)), bad)  # the committed file itself, byte for byte
    else:
        pq.write_table(make(run), bad)
    # what SQL may count: version 0's two shards, less shard 1 where shard 0's copy replaced it
    expected = rows[0] + (0 if case == "shard 0 copied over shard 1" else rows[1])

    proc = roll_cli("sql", "select policy_version, count(*) as n from rollouts group by 1 order by 1",
                    "--format", "csv", "--run", run_dir)
    assert proc.stdout == f"policy_version,n\n0,{expected}\n", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"roll: warning: {bad}: ") and lines[0].endswith("left out"), proc.stderr
    samples = roll_cli("sql", "select count(*) as n from samples", "--format", "csv", "--run", run_dir)
    assert samples.stdout == f"n\n{expected}\n"

    stages = ["verify", "score"] + (["train"] if "version=0000" in place else [])
    for stage in stages:
        line = one_line_error(roll_cli(stage, "--run", run_dir, check=False))
        assert line.startswith(f"roll: error: {bad}: "), (stage, line)
    assert run.policy_versions() == [0]
