"""Checkpoint retention: `roll iterate --keep-policies N` and `roll gc` delete only what nothing needs."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from roll.store import Run, query

from conftest import roll_cli, wait_for

TINY = ["--prompts", 2, "--group-size", 2, "--max-new-tokens", 8, "--mini-batch", 4]


def test_iterate_keeps_v0_the_evaluated_versions_and_the_latest_n(run_dir):
    roll_cli("iterate", "--run", run_dir, "--iterations", 12, "--keep-policies", 3, "--eval-every", 4,
             "--eval-k", 1, "--eval-limit", 2, *TINY, timeout=900)
    r = Run(run_dir)
    assert r.checkpoint_versions() == [0, 4, 8, 10, 11, 12]  # v0, evaluated 4 and 8 (and 12), the latest 3
    # nothing else is deleted: every version's rollouts, verdicts, scores and metrics are still there
    assert query(r, "select count(distinct policy_version) from rollouts").fetchall() == [(12,)]
    assert query(r, "select count(distinct policy_version) from scores").fetchall() == [(12,)]
    assert query(r, "select count(distinct policy_version) from steps").fetchall() == [(12,)]
    # a collected version keeps only its policy.json, the record that it was committed
    assert r.policy_versions() == list(range(13))
    assert sorted(p.name for p in r.policy_dir(5).iterdir()) == ["policy.json"]
    assert sum(p.stat().st_size for p in r.root.joinpath("policies").rglob("*") if p.is_file()) < \
        7 * sum(p.stat().st_size for p in r.policy_dir(12).iterdir())
    # a rerun of the same command finds everything done, and needs none of the deleted checkpoints
    again = json.loads(roll_cli("iterate", "--run", run_dir, "--iterations", 12, "--keep-policies", 3,
                                "--eval-every", 4, "--eval-k", 1, "--eval-limit", 2, *TINY).stdout)
    assert again["versions"] == 12 and r.checkpoint_versions() == [0, 4, 8, 10, 11, 12]


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


# Run as a program before `roll …`: an audit hook that acts at the N-th `os.rename`, `os.remove` or `os.mkdir`
# (of a path containing a given text) the command makes: SIGKILL (a kill inside gc) or SIGSTOP (gc frozen
# mid-way). The process, the files and the signal are real; the hook only picks a deterministic moment.
SIGNAL_AT = """
import os, signal, sys
_event, _nth, _signal, _text = sys.argv[1], int(sys.argv[2]), getattr(signal, sys.argv[3]), sys.argv[4]
_seen = [0]
def _hook(event, args):
    if event == _event and _text in str(args[0]):
        _seen[0] += 1
        if _seen[0] == _nth:
            os.kill(os.getpid(), _signal)
sys.addaudithook(_hook)
sys.argv = ["roll"] + sys.argv[5:]
from roll.cli import main
main()
"""


def gc_with_signal(event: str, nth: int, sig: str, text: str, *args, stderr=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SIGNAL_AT, event, str(nth), sig, text, "gc", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=stderr or subprocess.DEVNULL)


def leftovers(r: Run) -> list[str]:
    """Hidden entries (temporaries) anywhere in the run but its lock files, and anything beside the policy.json
    of a collected version."""
    hidden = [str(p.relative_to(r.root)) for p in r.root.rglob(".*") if ".locks" not in p.parts]
    beside = [str(p.relative_to(r.root)) for v in set(r.policy_versions()) - set(r.checkpoint_versions())
              for p in r.policy_dir(v).iterdir() if p.name != "policy.json"]
    return hidden + beside


@pytest.mark.parametrize("event", ["os.rename", "os.remove"])
def test_a_gc_killed_mid_deletion_leaves_only_what_the_next_gc_removes(run_dir, event):
    roll_cli("iterate", "--run", run_dir, "--iterations", 4, "--eval-every", 0, *TINY)
    r = Run(run_dir)
    weights = sum(p.stat().st_size for p in r.policy_dir(1).iterdir())
    # the 2nd rename moves v1's weights after its config.json; the 2nd removal deletes inside the renamed-away copy
    proc = gc_with_signal(event, 2, "SIGKILL", "", "--run", run_dir, "--keep", 1)
    assert proc.wait(timeout=300) == -signal.SIGKILL  # it died at that moment, not after finishing
    assert r.policy_versions() == [0, 1, 2, 3, 4] and 1 not in r.checkpoint_versions()  # no record lost
    left = leftovers(r)
    assert left and sum(p.stat().st_size for p in r.root.rglob("*") if p.is_file() and
                        str(p.relative_to(r.root)).startswith(tuple(left))) > weights / 2  # ~ v1's weights
    out = json.loads(roll_cli("gc", "--run", run_dir, "--keep", 1).stdout)
    assert out["deleted"] == [2, 3] and out["swept"]
    assert leftovers(r) == [] and r.checkpoint_versions() == [0, 4] and r.policy_versions() == [0, 1, 2, 3, 4]
    for version in (1, 2, 3):
        assert sorted(p.name for p in r.policy_dir(version).iterdir()) == ["policy.json"]


def test_generate_force_that_waits_for_gc_says_the_version_was_deleted_by_gc(run_dir, tmp_path):
    roll_cli("iterate", "--run", run_dir, "--iterations", 3, "--eval-every", 0, *TINY)
    r = Run(run_dir)
    # gc frozen as it starts deleting v1 (making the temporary its files move into), v1 still whole
    gc = gc_with_signal("os.mkdir", 1, "SIGSTOP", ".v0001.", "--run", run_dir, "--keep", 1, "--version", 1)
    wait_for(lambda: gc.poll() is not None or Path(f"/proc/{gc.pid}/stat").read_text().split(") ")[1][0] == "T",
             what="gc to stop mid-deletion")
    assert gc.poll() is None
    with open(tmp_path / "stderr", "w+") as stderr:
        generate = subprocess.Popen([sys.executable, "-m", "roll", "generate", "--run", str(run_dir), "--version", "1",
                                     "--force", "--prompts", "2", "--group-size", "2", "--max-new-tokens", "8"],
                                    stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        wait_for(lambda: "waiting for it" in (tmp_path / "stderr").read_text() or generate.poll() is not None,
                 what="generate to wait for gc")
        os.kill(gc.pid, signal.SIGCONT)
        assert gc.wait(timeout=300) == 0 and generate.wait(timeout=300) == 2
        lines = (tmp_path / "stderr").read_text().strip().splitlines()
    assert "the checkpoint of policy version 1 is in use by" in lines[0] and "waiting for it" in lines[0]
    assert len(lines) == 2 and "policy version 1 was deleted by `roll gc`" in lines[1], lines
    assert r.checkpoint_versions() == [0, 2, 3] and leftovers(r) == []
    assert r.versions("rollouts") == [0, 1, 2]  # v1's rollouts are as they were


def test_an_os_error_names_the_path(run_dir):
    roll_cli("generate", "--run", run_dir, "--prompts", 2, "--group-size", 2, "--max-new-tokens", 8)
    before = sorted(p.name for p in Run(run_dir).version_dir("rollouts", 0).iterdir())
    # no file may grow at all (as on a full disk): the first write is a lock file's holder line
    proc = subprocess.run([sys.executable, "-m", "roll", "generate", "--run", str(run_dir), "--force", "--prompts", "2",
                           "--group-size", "2", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"roll: error: {Run(run_dir).root}/.locks/") and "File too large" in lines[0]
    assert sorted(p.name for p in Run(run_dir).version_dir("rollouts", 0).iterdir()) == before
