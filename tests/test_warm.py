"""`roll warm`: commands run in forks of one warm process make the same files as cold processes, return the
same exit status and error line, start cold when a setting differs, and die with the command's process."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from roll.store import Run, query
from roll.warm import STATUS

from conftest import roll_cli, wait_for

ENV = {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A `roll warm` process serving on a socket; yields (socket path, its log file, process)."""
    folder = tmp_path_factory.mktemp("warm")
    socket_path, log_path = folder / "roll.sock", folder / "warm.log"
    env = {k: v for k, v in os.environ.items() if k != "ROLL_WARM"} | ENV
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "roll", "warm", "--socket", str(socket_path)],
                                env=env, stderr=log, stdout=subprocess.DEVNULL)
    wait_for(lambda: "warm on" in log_path.read_text() or proc.poll() is not None, what="roll warm to start")
    assert proc.poll() is None, log_path.read_text()
    yield socket_path, log_path, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def served(log_path, pid_of: str) -> list[str]:
    return [line for line in log_path.read_text().splitlines() if line.endswith(pid_of)]


GENERATE = ("generate", "--version", 0, "--prompts", 8, "--group-size", 4, "--max-new-tokens", 12)
AFTER_GENERATE = [("verify", "--version", 0), ("score", "--version", 0), ("train", "--version", 0, "--objective", "stable-pess")]


def test_warm_children_make_the_files_of_cold_processes(tmp_path, tiny_model_dir, warm):
    """One iteration as separate commands, generate as two concurrent shard processes, cold and warm."""
    socket_path, log_path, _ = warm
    runs = {}
    for mode, extra_env in (("cold", {}), ("warm", {"ROLL_WARM": str(socket_path)})):
        run = tmp_path / mode
        env = {**os.environ, **ENV, **extra_env}
        roll_cli("init", "--run", run, "--model", tiny_model_dir, env=env)
        shards = [[*map(str, GENERATE), "--shard", f"{i}/2", "--run", str(run)] for i in range(2)]
        procs = [subprocess.Popen([sys.executable, "-m", "roll", *args], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args in shards]
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "starting cold" not in err, err
            assert '"rows": 16' in out  # each shard's summary came back through its own stdout
        outputs = [roll_cli(*args, "--run", run, env=env) for args in AFTER_GENERATE]
        assert not any("starting cold" in proc.stderr for proc in outputs)
        if mode == "warm":  # the warm process forked a child for exactly these commands
            for args in [*shards, *([*map(str, a), "--run", str(run)] for a in AFTER_GENERATE)]:
                assert served(log_path, "roll " + " ".join(args)), log_path.read_text()
        runs[mode] = Run(run)
    cold, hot = runs["cold"], runs["warm"]
    for table, columns in (("rollouts", "token_ids, behaviour_logprobs"), ("verdicts", "reward"),
                           ("scores", "trainer_logprobs")):
        sql = f"select prompt_id, sample_index, {columns} from {table} order by 1, 2"
        assert query(cold, sql).fetchall() == query(hot, sql).fetchall()
    a = load_file(cold.policy_dir(1) / "model.safetensors")
    b = load_file(hot.policy_dir(1) / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(not torch.equal(a[k], load_file(cold.policy_dir(0) / "model.safetensors")[k]) for k in a)


def test_exit_status_and_the_one_error_line_come_back(tmp_path, tiny_model_dir, warm):
    socket_path, _, _ = warm
    env = ENV | {"ROLL_WARM": str(socket_path)}
    roll_cli("init", "--run", tmp_path / "run", "--model", tiny_model_dir, env=env)
    proc = roll_cli("generate", "--run", tmp_path / "run", "--version", 7, env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"roll: error: {tmp_path / 'run'}: policy version 7 does not exist (have: 0)"]


def test_another_import_time_setting_starts_cold(tmp_path, tiny_model_dir, warm):
    socket_path, log_path, _ = warm
    env = ENV | {"ROLL_WARM": str(socket_path), "OMP_NUM_THREADS": "1"}
    before = log_path.read_text()
    proc = roll_cli("init", "--run", tmp_path / "run", "--model", tiny_model_dir, env=env)
    assert "starting cold" in proc.stderr and '"task": "arith"' in proc.stdout
    assert log_path.read_text() == before  # nothing was forked for it
    proc = roll_cli("sql", "select 1", "--run", tmp_path / "run", env=ENV | {"ROLL_WARM": str(tmp_path / "nowhere")})
    assert "does not answer" in proc.stderr and "1" in proc.stdout


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_the_child_dies_with_the_command(tmp_path, tiny_model_dir, warm, how):
    socket_path, log_path, _ = warm
    env = {**os.environ, **ENV, "ROLL_WARM": str(socket_path)}
    run = tmp_path / "run"
    roll_cli("init", "--run", run, "--model", tiny_model_dir, env=env)
    args = ["generate", "--run", str(run), "--version", "0", "--prompts", "2000", "--max-new-tokens", "48"]
    client = subprocess.Popen([sys.executable, "-m", "roll", *args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: served(log_path, f"roll {' '.join(args)}"), what="the child to start")
    child = int(served(log_path, f"roll {' '.join(args)}")[-1].split(":")[1].split()[1])
    assert os.path.exists(f"/proc/{child}")
    client.send_signal(getattr(signal, how))
    code = client.wait(60)
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), timeout=30, what="the child to end")
    if how == "SIGTERM":  # passed on to the child, whose death by SIGTERM is the command's status
        assert code == 128 + signal.SIGTERM, client.stderr.read()
    assert Run(run).shards("rollouts", 0) == {}  # killed before its commit: nothing half-written is visible


def test_a_signal_sent_before_the_child_exists_is_passed_on_and_an_ignored_one_is_not(tmp_path):
    """SIGTERM reaching the command while the warm process has its request but has not yet answered: the
    command must hold it and pass it on once the child exists, not let one of its library threads take it
    and die by default, leaving the child to run on. SIGHUP, which the command was started ignoring (as under
    nohup), must stay ignored: not passed on to a child that starts with the default (death). A listening
    socket of the test's own plays the warm process, so the signals land exactly in that window."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "roll.sock"))
    listener.listen(1)
    listener.settimeout(120)
    client = subprocess.Popen([sys.executable, "-m", "roll", "sql", "select 1", "--run", str(tmp_path)],
                              env={**os.environ, **ENV, "ROLL_WARM": str(tmp_path / "roll.sock")},
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def delivered(signum) -> bool:  # it has died of it, or the signal is no longer pending: handled
        if client.poll() is not None:
            return True
        with open(f"/proc/{client.pid}/status") as status_file:
            status = dict(line.split(":", 1) for line in status_file.read().splitlines())
        return not int(status["ShdPnd"], 16) & 1 << (signum - 1)

    try:
        conn, _ = listener.accept()
        conn.settimeout(60)
        _, fds, _, _ = socket.recv_fds(conn, 65536, 3)  # the request: the command now waits for the answer
        for fd in fds:
            os.close(fd)
        for signum in (signal.SIGHUP, signal.SIGTERM):
            client.send_signal(signum)
            wait_for(lambda: delivered(signum), timeout=30, what=f"signal {signum} to be delivered")  # noqa: B023 (called here)
        conn.sendall(b"+")  # the child exists
        assert conn.recv(1) == bytes([signal.SIGTERM])  # SIGTERM alone, SIGHUP was never queued
        conn.sendall(STATUS.pack(128 + signal.SIGTERM))  # and the child died of it
        assert client.wait(60) == 128 + signal.SIGTERM
        assert conn.recv(16) == b""  # nothing more was passed on
    finally:
        client.kill()
        client.wait()
        print(client.stderr.read())  # shown by pytest when an assertion above failed
        listener.close()


def test_sigterm_stops_the_warm_process_and_removes_its_socket(tmp_path):
    socket_path, log_path = tmp_path / "roll.sock", tmp_path / "warm.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "roll", "warm", "--socket", str(socket_path)],
                                env={**os.environ, **ENV}, stderr=log, stdout=subprocess.DEVNULL)
    wait_for(lambda: socket_path.exists() or proc.poll() is not None, what="the socket")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not socket_path.exists()


def test_a_warm_child_takes_the_commands_umask_and_resource_limits(tmp_path, tiny_model_dir, warm):
    """A cold process inherits its shell's umask and ulimits; a warm child is given them. Under `ulimit -f 64`
    (64 KiB files) generate fails in one line, "File too large", as a cold one does, and writes nothing; under
    umask 027 its files are 0640."""
    import resource

    socket_path, log_path, _ = warm
    env = {**os.environ, **ENV, "ROLL_WARM": str(socket_path)}
    roll_cli("init", "--run", tmp_path / "run", "--model", tiny_model_dir, env=env)
    big = ["-m", "roll", "generate", "--run", str(tmp_path / "run"), "--prompts", 64, "--group-size", 8]

    def limited(soft: int, hard: int):
        def apply():
            os.umask(0o027)
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        return apply

    proc = subprocess.run([sys.executable, *map(str, big)], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=limited(64 << 10, 64 << 10))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("roll: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "File too large" in errors[0], proc.stderr
    assert "starting cold" not in proc.stderr and not Run(tmp_path / "run").files("rollouts", 0)
    proc = subprocess.run([sys.executable, *map(str, [*big[:5], "--prompts", 2, "--group-size", 2])], env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=limited(1 << 30, 1 << 30))
    assert proc.returncode == 0 and "starting cold" not in proc.stderr, proc.stderr
    assert {oct(p.stat().st_mode & 0o777) for p in Run(tmp_path / "run").files("rollouts", 0).values()} == {oct(0o640)}
