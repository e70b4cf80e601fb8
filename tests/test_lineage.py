"""Lineage: a version with descendants is not re-made in place, an ancestor replaced by hand is reported, and a
failed `train --force` leaves the version's weights and metrics as they were (DESIGN §6)."""
from __future__ import annotations

import hashlib
import json
import resource
import shutil
import subprocess
import sys

from roll.store import Run, query

from conftest import fixed_data_run, roll_cli

TINY = ["--prompts", 2, "--group-size", 2, "--max-new-tokens", 8, "--mini-batch", 4]


def snapshot(root) -> dict[str, str]:
    """Every file of the run (but its lock files) with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".locks" not in p.parts}


def one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("roll: error: "), proc.stderr
    return lines[0]


def test_force_over_descendants_is_refused_and_the_prune_removes_exactly_what_it_lists(run_dir):
    # v0 … v3; rollouts, verdicts and scores of v0 … v2; evals of v0, v2 and v3; v1 judged on v2's rows and v2 on v1's
    roll_cli("iterate", "--run", run_dir, "--iterations", 3, "--eval-every", 2, "--eval-k", 1, "--eval-limit", 2, *TINY)
    roll_cli("ope", "--run", run_dir, "--version", 1, "--data-versions", "2..2")
    roll_cli("ope", "--run", run_dir, "--version", 2, "--data-versions", "1..1")
    r = Run(run_dir)
    assert r.policy_versions() == [0, 1, 2, 3] and r.versions("rollouts") == [0, 1, 2]
    assert r.versions("evals") == [0, 2, 3] and r.versions("ope") == [1, 2]
    before = snapshot(r.root)

    # remaking v2 (update 1 → 2): v3 was trained from its weights, and v2's rollouts, evals and ope rows drawn from them
    line = one_line_error(roll_cli("train", "--run", run_dir, "--version", 1, "--force", "--lr", "1e-2", check=False))
    assert "policy v0002 has descendants v0003 and data drawn from it (evals, ope, rollouts, scores, verdicts)" in line
    assert "--prune-descendants" in line
    assert snapshot(r.root) == before  # nothing touched

    proc = roll_cli("train", "--run", run_dir, "--version", 1, "--force", "--lr", "1e-2", "--prune-descendants")
    pruned = json.loads(proc.stdout)["pruned"]
    summary = [p for p in pruned if p.startswith("ope/version=0001/summary-0002-0002-")]
    assert pruned == ["evals/version=0003", "policies/v0003", "train/version=0003",  # v3, newest first, then v2's data
                      "evals/version=0002", "ope/version=0001/from-0002-part-00000-of-00001.parquet", *summary,
                      "ope/version=0002", "rollouts/version=0002", "scores/version=0002", "verdicts/version=0002"]
    assert len(summary) == 1
    for path in pruned:  # each listed on stderr as it goes
        assert f"roll: --prune-descendants: deleted {path}" in proc.stderr
    after = snapshot(r.root)
    gone = {f for f in before if f not in after}
    assert gone == {f for f in before if any(f == p or f.startswith(p + "/") for p in pruned)}
    # what stays is byte for byte what was there, but v2 itself and its metrics, which the update replaced
    changed = {f for f in before if f in after and before[f] != after[f]}
    assert changed and all(f.startswith(("policies/v0002/", "train/version=0002/")) for f in changed)
    assert r.policy_versions() == [0, 1, 2] and r.versions("rollouts") == [0, 1]
    assert query(r, "select policy_version, lr from steps order by 1").fetchall() == [(1, 3e-4), (2, 1e-2)]
    assert not [p for p in r.root.rglob(".*") if p.name != ".locks" and ".locks" not in p.parts]


def test_an_ancestor_replaced_by_hand_is_reported_not_trained_on(run_dir):
    roll_cli("iterate", "--run", run_dir, "--iterations", 3, "--eval-every", 0, *TINY)
    r = Run(run_dir)
    assert json.loads((r.policy_dir(3) / "policy.json").read_text())["parent_weights"].startswith("sha256:")
    roll_cli("generate", "--run", run_dir, "--version", 3, "--prompts", 2, "--group-size", 2, "--max-new-tokens", 8)
    shutil.copyfile(r.policy_dir(1) / "model.safetensors", r.policy_dir(2) / "model.safetensors")  # v2 ← v1's weights
    for command in (["train", "--mini-batch", 4], ["generate", "--version", 3, "--force", "--prompts", 2]):
        line = one_line_error(roll_cli(*command, "--run", run_dir, check=False))
        assert f"{r.policy_dir(2)}: its weights are not the ones v0003 was trained from" in line
    assert r.policy_versions() == [0, 1, 2, 3]  # no v4 trained on the swapped line
    # v2 itself still loads: nothing recorded says what its own weights should be but its child
    roll_cli("generate", "--run", run_dir, "--version", 2, "--force", "--prompts", 2, "--group-size", 2,
             "--max-new-tokens", 8)


def limit_file_size(limit: int):
    def apply():  # a write past `limit` bytes fails with EFBIG (Python ignores SIGXFSZ), as a full disk would
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_failed_force_leaves_the_old_weights_and_the_old_steps_row(run_dir):
    fixed_data_run(run_dir)
    roll_cli("train", "--run", run_dir, "--mini-batch", 24)
    r = Run(run_dir)
    weights = (r.policy_dir(1) / "model.safetensors").read_bytes()
    steps = query(r, "select lr, loss from steps").fetchall()
    assert [lr for lr, _ in steps] == [3e-4] and len(weights) > 256 * 1024
    # the retrain's checkpoint (≥ 256 KiB of weights) cannot be written; its steps table (a few KiB) could
    proc = subprocess.run([sys.executable, "-m", "roll", "train", "--run", str(run_dir), "--version", "0", "--force",
                           "--lr", "1e-2", "--mini-batch", "24"], capture_output=True, text=True, timeout=300,
                          preexec_fn=limit_file_size(64 * 1024))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("roll: error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr  # after the update's progress bar
    assert str(r.policy_dir(1)) in errors[0] and "File too large" in errors[0]
    assert (r.policy_dir(1) / "model.safetensors").read_bytes() == weights
    assert query(r, "select lr, loss from steps").fetchall() == steps
    assert not [p for p in r.root.rglob(".*") if ".locks" not in p.parts]
    # the same command with room to write replaces both, together
    roll_cli("train", "--run", run_dir, "--version", 0, "--force", "--lr", "1e-2", "--mini-batch", 24)
    assert [lr for (lr, _) in query(r, "select lr, loss from steps").fetchall()] == [1e-2]
    assert (r.policy_dir(1) / "model.safetensors").read_bytes() != weights
