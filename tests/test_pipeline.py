"""iterate and report: resuming after SIGKILL inside a stage, and real PNG plots from SQL over runs."""
from __future__ import annotations

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
