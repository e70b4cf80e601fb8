"""One writer per thing (DESIGN §6), tried with real processes started at the same moment, repeatedly."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from roll.stages.generate import GenerateConfig, run as generate
from roll.pipeline.prepare import prepare
from roll.store import Run, query

from conftest import roll_cli


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "roll", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def hidden_leftovers(run_dir) -> list[str]:
    root = Run(run_dir).root
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("trial", range(3))
def test_two_trainers_at_once_make_one_version(run_dir, tmp_path, trial):
    generate(GenerateConfig(run=run_dir, prompts=4, group_size=4, max_new_tokens=12))
    prepare(Run(run_dir), [0])
    procs = [start("train", "--run", run_dir, "--mini-batch", 8, "--epochs", 2) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    summaries = [json.loads(out) for out, _ in outs]
    assert sorted(s["skipped"] for s in summaries) == [False, True], summaries
    assert all(s["version"] == 1 for s in summaries)
    r = Run(run_dir)
    assert r.policy_versions() == [0, 1]
    made = next(s for s in summaries if not s["skipped"])
    assert query(r, "select count(*) from steps").fetchall() == [(made["steps"],)]
    assert hidden_leftovers(run_dir) == []


def test_concurrent_generators_with_two_layouts_commit_one(run_dir):
    procs = [start("generate", "--run", run_dir, "--prompts", 8, "--group-size", 2, "--max-new-tokens", 8,
                   "--shard", shard) for shard in ("0/1", "0/2")]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    refused = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2)
    assert [line for line in refused.splitlines() if line.startswith("roll: error: ")][0].count("already has rollouts in") == 1
    r = Run(run_dir)
    rows = query(r, "select count(*), count(distinct (prompt_id, sample_index)) from rollouts").fetchall()[0]
    assert rows[0] == rows[1]  # no key twice


def test_a_second_layout_after_a_partial_one_is_refused(run_dir):
    roll_cli("generate", "--run", run_dir, "--prompts", 8, "--group-size", 2, "--max-new-tokens", 8, "--shard", "0/2")
    proc = roll_cli("generate", "--run", run_dir, "--prompts", 8, "--group-size", 2, "--max-new-tokens", 8, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("roll: error: ")]
    assert proc.returncode == 2 and len(errors) == 1
    assert "already has rollouts in 2 shards (part-…-of-00002); use --shard i/2" in errors[0]
    assert sorted(Run(run_dir).files("rollouts", 0)) == ["part-00000-of-00002.parquet"]
    roll_cli("generate", "--run", run_dir, "--prompts", 8, "--group-size", 2, "--max-new-tokens", 8, "--shard", "1/2")
    assert query(Run(run_dir), "select count(*) from rollouts").fetchall() == [(16,)]


def test_a_stray_file_is_reported_and_left_out_by_sql_and_stages_alike(run_dir):
    generate(GenerateConfig(run=run_dir, prompts=2, group_size=2, max_new_tokens=8))
    r = Run(run_dir)
    shard = r.shard_path("rollouts", 0, next(iter(r.shards("rollouts", 0))))
    shutil.copy(shard, shard.with_name("part-00000-of-00001 (copy).parquet"))  # a duplicated shard
    (shard.parent / "notes.txt").write_text("junk")
    proc = roll_cli("sql", "select count(*) as n from rollouts", "--run", run_dir, "--format", "csv")
    assert proc.stdout.splitlines()[1] == "4"  # counted once
    assert "notes.txt: not a shard of table rollouts; left out" in proc.stderr
    assert "(copy).parquet: not a shard of table rollouts; left out" in proc.stderr
    out = json.loads(roll_cli("train", "--run", run_dir).stdout)
    assert out["rows"] == 4


def test_regenerating_a_version_in_another_layout_replaces_its_derived_files_too(run_dir):
    small = ["--prompts", 8, "--group-size", 2, "--max-new-tokens", 8]
    roll_cli("generate", "--run", run_dir, *small)
    roll_cli("verify", "--run", run_dir)
    roll_cli("score", "--run", run_dir)
    for shard in ("0/2", "1/2"):
        roll_cli("generate", "--run", run_dir, *small, "--shard", shard, "--force")
    r = Run(run_dir)
    assert sorted(r.files("verdicts", 0)) == [] and sorted(r.files("scores", 0)) == []  # the 1-shard layout's
    roll_cli("verify", "--run", run_dir)
    roll_cli("score", "--run", run_dir)
    assert sorted(r.files("verdicts", 0)) == sorted(r.files("rollouts", 0)) == \
        ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    assert query(r, "select count(*), count(reward) from samples").fetchall() == [(16, 16)]
