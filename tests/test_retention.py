"""Checkpoint retention: `roll iterate --keep-policies N` and `roll gc` delete only what nothing needs."""
from __future__ import annotations

import json

from roll.store import Run, query

from conftest import roll_cli

TINY = ["--prompts", 2, "--group-size", 2, "--max-new-tokens", 8, "--mini-batch", 4]


def test_iterate_keeps_v0_the_evaluated_versions_and_the_latest_n(run_dir):
    roll_cli("iterate", "--run", run_dir, "--iterations", 30, "--keep-policies", 3, "--eval-every", 10,
             "--eval-k", 1, "--eval-limit", 2, *TINY, timeout=900)
    r = Run(run_dir)
    assert r.checkpoint_versions() == [0, 10, 20, 28, 29, 30]  # v0, evaluated 10 and 20 (and 30), the latest 3
    # nothing else is deleted: every version's rollouts, verdicts, scores and metrics are still there
    assert query(r, "select count(distinct policy_version) from rollouts").fetchall() == [(30,)]
    assert query(r, "select count(distinct policy_version) from scores").fetchall() == [(30,)]
    assert query(r, "select count(distinct policy_version) from steps").fetchall() == [(30,)]
    # a collected version keeps only its policy.json, the record that it was committed
    assert r.policy_versions() == list(range(31))
    assert sorted(p.name for p in r.policy_dir(5).iterdir()) == ["policy.json"]
    assert sum(p.stat().st_size for p in r.root.joinpath("policies").rglob("*") if p.is_file()) < \
        7 * sum(p.stat().st_size for p in r.policy_dir(30).iterdir())
    # a rerun of the same command finds everything done, and needs none of the deleted checkpoints
    again = json.loads(roll_cli("iterate", "--run", run_dir, "--iterations", 30, "--keep-policies", 3,
                                "--eval-every", 10, "--eval-k", 1, "--eval-limit", 2, *TINY).stdout)
    assert again["versions"] == 30 and r.checkpoint_versions() == [0, 10, 20, 28, 29, 30]


def test_lagged_iterate_keeps_the_checkpoints_its_future_windows_must_still_score(run_dir):
    roll_cli("iterate", "--run", run_dir, "--iterations", 6, "--lag", 3, "--keep-policies", 1, "--eval-every", 0, *TINY)
    r = Run(run_dir)
    # update 6 → 7 will read version 3; versions 4, 5 and 6 have rollouts that no update has scored yet
    assert r.checkpoint_versions() == [0, 3, 4, 5, 6]
    assert query(r, "select distinct policy_version from scores order by 1").fetchall() == [(0,), (1,), (2,)]
    roll_cli("iterate", "--run", run_dir, "--iterations", 7, "--lag", 3, "--keep-policies", 1, "--eval-every", 0, *TINY)
    assert r.checkpoint_versions() == [0, 4, 5, 6, 7]


def test_gc_refuses_to_delete_a_needed_checkpoint_with_one_line(run_dir):
    roll_cli("iterate", "--run", run_dir, "--iterations", 4, "--eval-every", 2, "--eval-k", 1, "--eval-limit", 2, *TINY)
    r = Run(run_dir)
    for version, keep, why in ((0, 1, "π_ref"), (2, 1, "evaluated"), (4, 1, "latest 1"), (3, 2, "latest 2")):
        proc = roll_cli("gc", "--run", run_dir, "--keep", keep, "--version", version, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and why in lines[0], proc.stderr
        assert f"v{version:04d} is still needed" in lines[0]
    assert r.checkpoint_versions() == [0, 1, 2, 3, 4]
    dry = json.loads(roll_cli("gc", "--run", run_dir, "--keep", 1, "--dry-run").stdout)
    assert dry["deleted"] == [1, 3] and r.checkpoint_versions() == [0, 1, 2, 3, 4]
    assert json.loads(roll_cli("gc", "--run", run_dir, "--version", 1).stdout)["deleted"] == [1]
    assert json.loads(roll_cli("gc", "--run", run_dir, "--keep", 1).stdout)["deleted"] == [3]
    assert r.checkpoint_versions() == [0, 2, 4]
    assert not [p for p in (r.root / "policies").iterdir() if p.name.startswith(".")]
    proc = roll_cli("generate", "--run", run_dir, "--version", 1, check=False)
    assert proc.returncode == 2 and "policy version 1 was deleted by `roll gc`" in proc.stderr


def test_gc_keeps_a_checkpoint_whose_rollouts_are_not_scored_whatever_lag_it_is_told(run_dir):
    roll_cli("iterate", "--run", run_dir, "--iterations", 4, "--lag", 2, "--eval-every", 0, *TINY)
    r = Run(run_dir)
    # versions 2 and 3 have rollouts that no update has scored yet (lag 2); gc is not told the lag
    out = json.loads(roll_cli("gc", "--run", run_dir, "--keep", 1).stdout)
    assert out["deleted"] == [1] and r.checkpoint_versions() == [0, 2, 3, 4]
    proc = roll_cli("gc", "--run", run_dir, "--keep", 1, "--version", 2, check=False)
    assert proc.returncode == 2 and "its rollouts are not scored yet" in proc.stderr
