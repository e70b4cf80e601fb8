"""Slurm: the rendered scripts pass shellcheck, run as concurrent array tasks, and run on a real Slurm.

Real processes only. The real-Slurm tests start their own cluster of two nodes on this machine (munged,
slurmctld, and one slurmd per node — named after this host and `localhost`, both names that resolve here — on
127.0.0.1, everything in a temp folder, on free ports), submit with sbatch and stop the daemons by pid at the
end. Where Slurm or shellcheck is not installed the test is skipped with the reason, except
under CI (the CI environment variable set, as .ci/run does), where it fails instead: .ci/run installs them.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from roll.store import Run, query

from conftest import fixed_data_run, roll_cli

GENERATE = "--prompts 6 --group-size 4 --max-new-tokens 16"
ARRAY = 2  # tasks per generate/verify/score array
APT = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge shellcheck"


# --------------------------------------------------------------------------------------------- helpers
def which(program: str) -> str | None:
    """The program on PATH, or in the sbin folders a non-root PATH lacks (the daemons live there)."""
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/local/sbin")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require(*programs: str, what: str) -> dict[str, str]:
    """Paths of `programs`; skip where one is missing (a laptop), but fail under CI, which installs them."""
    found = {p: which(p) for p in programs}
    missing = sorted(p for p, path in found.items() if path is None)
    if missing:
        reason = f"{what} is not installed (no {', '.join(missing)}); install it with: {APT}"
        if in_ci():
            pytest.fail(f"{reason}. CI must run this test: .ci/run installs the packages", pytrace=False)
        pytest.skip(reason)
    return found


def job_env(**extra: str) -> dict[str, str]:
    """The environment jobs run in: this Python's bin folder first on PATH (so `roll` is this install),
    no SLURM_* variables inherited from an enclosing job, one thread per process (2 cores, modest CPU)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def render(run: Path, out: Path, iterations: int, *options) -> dict[str, Path]:
    """`roll slurm render … --out out` (in this process: it only writes text); the scripts by name.
    The scripts call `roll` from PATH, or this Python's `-m roll` where no roll is on the jobs' PATH."""
    from click.testing import CliRunner

    from roll.cli import cli

    roll = [] if shutil.which("roll", path=job_env()["PATH"]) else ["--roll", f"{shlex.quote(sys.executable)} -m roll"]
    args = ["slurm", "render", "--run", run, "--iterations", iterations, "--array-size", ARRAY,
            "--generate-args", GENERATE, "--out", out, *roll, *options]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return {p.name: p for p in sorted(out.iterdir())}


def init(path: Path, model: Path) -> Path:
    """`roll init --run path --model model`, in this process (as conftest's run_dir does)."""
    from roll.runs import InitConfig, init_run

    init_run(InitConfig(run=path, model=str(model)))
    return path


def array_env(task: int, job: int) -> dict[str, str]:
    """What slurmstepd sets for array task `task` of array job `job`."""
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(ARRAY), "SLURM_ARRAY_TASK_MIN": "0",
            "SLURM_ARRAY_TASK_MAX": str(ARRAY - 1), "SLURM_ARRAY_JOB_ID": str(job), "SLURM_JOB_ID": str(job + 1 + task),
            "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1", "SLURM_CPUS_ON_NODE": "1",
            "SLURMD_NODENAME": socket.gethostname()}


def summary(output: str) -> dict:
    """The JSON summary a roll command prints last (after any progress bar on stderr)."""
    match = re.search(r"^\{$.*^\}$", output, re.MULTILINE | re.DOTALL)
    assert match, output[-3000:]
    return json.loads(match.group(0))


def counts(run: Path, table: str) -> list[tuple]:
    """(policy_version, rows, distinct keys) per version of a sharded table."""
    return query(Run(run), f"select policy_version, count(*), count(distinct (prompt_id, sample_index)) "
                           f"from {table} group by 1 order by 1").fetchall()


# ---------------------------------------------------------------------------------------------- shellcheck
@pytest.mark.parametrize("options", [
    [],
    ["--lag", "1", "--window", "2", "--start", "1"],
    ["--gpus-per-train", "2", "--partition", "gpu", "--account", "lab", "--train-args", "--objective ppo"],
    ["--nodes", "2", "--gpus-per-node", "8", "--gpus-per-task", "1", "--lag", "1", "--train-args", "--objective ppo"],
], ids=["plain", "lag-window-start", "torchrun-partition", "nodes"])
def test_rendered_scripts_pass_shellcheck(tmp_path, options):
    shellcheck = require("shellcheck", what="shellcheck")["shellcheck"]
    scripts = render(tmp_path / "a run with spaces", tmp_path / "out", 3, *options)
    assert len(scripts) == 3 * 4 + 1 and "submit.sh" in scripts
    proc = subprocess.run([shellcheck, "--shell=bash", "--severity=style", *map(str, scripts.values())],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpus_per_train_is_gpus_per_node_on_one_node_and_the_two_must_agree(tmp_path):
    from click.testing import CliRunner

    from roll.cli import cli

    one = render(tmp_path / "run", tmp_path / "a", 1, "--gpus-per-train", 2)
    same = render(tmp_path / "run", tmp_path / "b", 1, "--gpus-per-node", 2)
    assert [p.read_text() for p in one.values()] == [p.read_text() for p in same.values()]
    result = CliRunner().invoke(cli, ["slurm", "render", "--run", str(tmp_path / "run"), "--gpus-per-train", "2",
                                      "--gpus-per-node", "4", "--nodes", "2"])
    assert result.exit_code != 0 and result.output.strip().splitlines() == [
        "roll: error: --gpus-per-train 2 and --gpus-per-node 4 disagree: give --gpus-per-node (with --nodes) alone"]


def test_score_skips_pi_ref_only_when_the_rendered_objective_never_reads_it(tmp_path):
    for train_args, no_ref in (("", True), ("--objective ppo", True), ("--objective apo", False),
                               ("--objective=pg --kl-ref 0.05", False)):
        scripts = render(tmp_path / "run", tmp_path / f"out{len(train_args)}", 1, "--train-args", train_args)
        score_line = scripts["v0000-score.sbatch"].read_text().strip().splitlines()[-1]
        assert score_line.endswith("--no-ref") == no_ref, (train_args, score_line)


# ------------------------------------------------------------- array tasks as concurrent local processes
def run_one_process(commands: list[list[str]]) -> None:
    """The same `roll` commands, one after another inside one Python process (the reference)."""
    program = textwrap.dedent(f"""
        from roll.cli import cli
        for args in {commands!r}:
            cli.main(args, prog_name="roll", standalone_mode=False)
    """)
    proc = subprocess.run([sys.executable, "-c", program], env=job_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


def command_of(script: Path, task: int | None) -> list[str]:
    """The script's `roll …` command as arguments after `roll`, with the array task id filled in."""
    line = script.read_text().strip().splitlines()[-1]
    words = shlex.split(line.replace("$SLURM_ARRAY_TASK_ID", str(task)))
    return words[words.index("roll") + 1:]  # after `roll`, or after `python -m roll`


def test_array_tasks_as_concurrent_processes_make_the_rows_of_one_process(tmp_path, tiny_model_dir):
    concurrent = init(tmp_path / "concurrent run", tiny_model_dir)
    reference = init(tmp_path / "reference", tiny_model_dir)
    scripts = render(concurrent, tmp_path / "slurm", 1)
    for n, stage in enumerate(("generate", "verify", "score")):
        job = 1000 * (n + 1)
        procs = [subprocess.Popen(["bash", str(scripts[f"v0000-{stage}.sbatch"])], env=job_env(**array_env(task, job)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for task in range(ARRAY)]  # all tasks of the array at once, as Slurm would start them
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        for task, (p, out) in enumerate(zip(procs, outputs)):
            assert p.returncode == 0, f"{stage} task {task} failed ({p.returncode}):\n{out[-3000:]}"
            assert summary(out)["rows"] == 12, out[-3000:]  # each task did its half of 6 prompts × 4
    train = subprocess.run(["bash", str(scripts["v0000-train.sbatch"])], env=job_env(SLURM_JOB_ID="4000"),
                           capture_output=True, text=True, timeout=300, check=False)
    assert train.returncode == 0, train.stderr[-3000:]

    # the reference: the very same commands, for shard 0/2 then 1/2, in one process, on a twin run
    commands = [command_of(scripts[f"v0000-{stage}.sbatch"], task) for stage in ("generate", "verify", "score")
                for task in range(ARRAY)] + [command_of(scripts["v0000-train.sbatch"], None)]
    run_one_process([[str(reference) if str(w) == str(concurrent) else w for w in c] for c in commands])

    a, b = Run(concurrent), Run(reference)
    assert a.policy_versions() == b.policy_versions() == [0, 1]
    for table in ("rollouts", "verdicts", "scores"):
        assert sorted(p.name for p in a.version_dir(table, 0).iterdir()) == \
               [f"part-0000{i}-of-0000{ARRAY}.parquet" for i in range(ARRAY)], table
        assert counts(concurrent, table) == counts(reference, table) == [(0, 24, 24)], table
    rows = {
        "rollouts": "select prompt_id, sample_index, token_ids, completion, finish_reason, seed from rollouts",
        "verdicts": "select prompt_id, sample_index, reward, correct, extracted_answer from verdicts",
        "scores": "select prompt_id, sample_index, group_size, group_reward_mean, group_reward_std from scores",
    }
    for table, sql in rows.items():
        ordered = f"{sql} order by prompt_id, sample_index"
        assert query(a, ordered).fetchall() == query(b, ordered).fetchall(), table
    logprobs = "select behaviour_logprob_sum, ref_logprob_sum from scores order by prompt_id, sample_index"
    for x, y in zip(query(a, logprobs).fetchall(), query(b, logprobs).fetchall()):
        for u, v in zip(x, y):  # ref_logprob_sum is NULL on both sides when scored --no-ref
            assert (u is None and v is None) or u == pytest.approx(v, rel=1e-4, abs=1e-4)
    steps = "select policy_version, step, tokens, loss from steps order by step"
    sa, sb = query(a, steps).fetchall(), query(b, steps).fetchall()
    assert [s[:3] for s in sa] == [s[:3] for s in sb] and len(sa) >= 1
    assert [s[3] for s in sa] == pytest.approx([s[3] for s in sb], rel=1e-4, abs=1e-5)


# ------------------------------------------------------------------------------- a real single-node Slurm
SLURM_CONF = """\
ClusterName=roll-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
PlugStackConfig={dir}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
DependencyParameters=kill_invalid_depend
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} Port={port_a} CPUs={cpus} State=UNKNOWN
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname={host} Port={port_b} CPUs={cpus} State=UNKNOWN
PartitionName=roll Nodes={host},localhost Default=YES MaxTime=INFINITE State=UP
"""


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def gone(pid: int) -> bool:
    """No such process, or only its zombie (a container's PID 1 may never reap the daemons it adopts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


class Cluster:
    """munged, slurmctld and two slurmd (two nodes of one machine) for this test module, as child processes in
    the foreground. Debian's slurmd runs twice on one host given distinct NodeName (-N) and Port."""

    def __init__(self, folder: Path, programs: dict[str, str]):
        self.dir, self.programs = folder, programs
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = job_env(SLURM_CONF=str(folder / "slurm.conf"))

    def start(self) -> None:
        d, host = self.dir, socket.gethostname().split(".")[0]
        for sub in ("munge", "state"):
            (d / sub).mkdir(parents=True)
        os.chmod(d / "munge", 0o755)
        key = d / "munge" / "munge.key"  # a fresh key: nothing of the machine's own munge is touched
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        (d / "plugstack.conf").write_text("")
        ctld_port, port_a, port_b = free_ports(3)
        (d / "slurm.conf").write_text(SLURM_CONF.format(host=host, dir=d, ctld_port=ctld_port, port_a=port_a,
                                                        port_b=port_b, cpus=ARRAY))
        m = d / "munge"
        self.launch("munged", [self.programs["munged"], "--foreground", "--force", f"--socket={m}/munge.socket",
                               f"--key-file={key}", f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid",
                               f"--seed-file={m}/munged.seed"])
        self.wait_for(lambda: (m / "munge.socket").exists(), "munged's socket", 10)
        self.launch("slurmctld", [self.programs["slurmctld"], "-D", "-i", "-f", str(d / "slurm.conf")])
        for node in (host, "localhost"):
            self.launch(f"slurmd-{node}", [self.programs["slurmd"], "-D", "-f", str(d / "slurm.conf"), "-N", node])
        self.wait_for(lambda: self.sinfo() == "idle", "both nodes to be idle in sinfo", 30)

    def launch(self, name: str, argv: list[str]) -> None:
        with open(self.dir / f"{name}.stdout", "w") as log:  # the child keeps its own copy of the descriptor
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)

    def sinfo(self) -> str:
        proc = subprocess.run([self.programs["sinfo"], "-h", "-o", "%t"], env=self.env, capture_output=True,
                              text=True, check=False)
        return proc.stdout.strip()

    def wait_for(self, ready, what: str, seconds: float) -> None:
        deadline = time.time() + seconds
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                raise AssertionError(f"Slurm did not start: waited for {what}; exited: {dead}\n{self.logs()}")
            time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.dir.rglob("*.log"))
                         if p.is_file()) + "".join(f"\n== {p.name}\n{p.read_text()[-2000:]}"
                                                   for p in sorted(self.dir.glob("*.stdout")))

    def stop(self) -> list[int]:
        """Cancel what is left, then stop slurmd, slurmctld and munged by pid; the pids they had."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run([self.programs["scancel"], "--user", str(os.getuid())], env=self.env,
                           capture_output=True, check=False)
        for name in (*(n for n in self.procs if n.startswith("slurmd-")), "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        return [p.pid for p in self.procs.values()]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A two-node Slurm of our own (own conf, ports, munge socket and key), stopped by pid afterwards."""
    programs = require("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel",
                       what="Slurm (slurmctld, slurmd, slurm-client, munge)")
    if os.geteuid() != 0:
        message = "the single-node Slurm of this test runs its daemons as root (SlurmUser=root)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"), programs)
    try:
        cluster.start()
        yield cluster
    finally:
        pids = cluster.stop()
        alive = [pid for pid in pids if not gone(pid)]
        assert not alive, f"Slurm daemons still running after stop: {alive}"


def wait_for_jobs(cluster: Cluster, timeout: float) -> dict[str, str]:
    """Poll squeue until no job is pending, running or completing; job id → final state."""
    squeue = cluster.programs["squeue"]
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run([squeue, "-h", "-t", "all", "-o", "%i %T %j"], env=cluster.env,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        jobs = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if line.strip()}
        if jobs and not any(s in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") for s in jobs.values()):
            return jobs
        if time.monotonic() > deadline:
            raise AssertionError(f"Slurm jobs not finished after {timeout} s: {jobs}\n{cluster.logs()}")
        time.sleep(0.5)


def test_real_slurm_runs_two_iterations_like_roll_iterate(tmp_path, tiny_model_dir, slurm_cluster):
    run, reference = init(tmp_path / "slurm run", tiny_model_dir), init(tmp_path / "iterate-run", tiny_model_dir)
    scripts = render(run, tmp_path / "scripts", 2)
    submit = subprocess.run(["bash", str(scripts["submit.sh"])], env=slurm_cluster.env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert submit.returncode == 0, submit.stderr
    last_train = submit.stdout.strip().splitlines()[-1]
    # the reference runs while Slurm works: the same settings, one shard per version, in one command
    iterate = subprocess.Popen([sys.executable, "-m", "roll", "iterate", "--run", str(reference), "--iterations", "2",
                                "--eval-every", "0", *GENERATE.split()], env=job_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        jobs = wait_for_jobs(slurm_cluster, timeout=600)  # hang guards, not speed checks
        iterate_err = iterate.communicate(timeout=600)[1]
    finally:
        if iterate.poll() is None:
            iterate.kill()
            iterate.wait()
    assert iterate.returncode == 0, iterate_err[-3000:]

    outputs = sorted((run / "slurm").glob("*.out"))
    failed = {job: state for job, state in jobs.items() if state != "COMPLETED"}
    assert not failed, f"jobs not COMPLETED: {failed}\n" + "\n".join(
        f"== {p.name}\n{p.read_text()[-1500:]}" for p in outputs)
    # 2 versions × (generate, verify, score arrays of 2 tasks + 1 train job): 14 jobs, one output file each
    assert len(jobs) == 14 and last_train in jobs, jobs
    assert len(outputs) == 14, [p.name for p in outputs]
    for p in outputs:  # every array task did its half (so each ran after the job it depends on)
        assert "Traceback" not in p.read_text(), p.read_text()
        if "train" not in p.name:
            assert summary(p.read_text())["rows"] == 12, (p.name, p.read_text())

    a, b = Run(run), Run(reference)
    assert a.policy_versions() == b.policy_versions() == [0, 1, 2]
    for table in ("rollouts", "verdicts", "scores"):
        assert counts(run, table) == counts(reference, table) == [(0, 24, 24), (1, 24, 24)], table
        assert a.complete_shard_count(table, 0) == a.complete_shard_count(table, 1) == ARRAY, table
    prompts = "select policy_version, list(distinct prompt_id order by prompt_id) from rollouts group by 1 order by 1"
    assert query(a, prompts).fetchall() == query(b, prompts).fetchall()
    for table in ("steps", "groups"):
        per_version = f"select policy_version, count(*) from {table} group by 1 order by 1"
        assert query(a, per_version).fetchall() == query(b, per_version).fetchall(), table


def test_real_slurm_trains_on_two_nodes_as_one_process_does(tmp_path, tiny_model_dir, slurm_cluster):
    """`roll slurm render --nodes 2`'s train job on the two-node cluster: srun starts one agent per node, they
    meet at the allocation's first node, and the v1 of the two ranks is one process's v1 within the bound that
    tests/test_distributed.py derives (one Adam step)."""
    import torch
    from safetensors.torch import load_file

    run = init(tmp_path / "two nodes", tiny_model_dir)
    fixed_data_run(run)
    reference = tmp_path / "one process"
    shutil.copytree(run, reference)
    step = "--objective stable-pess --mini-batch 1000 --micro-batch 4 --lr 1e-3"
    scripts = render(run, tmp_path / "scripts", 1, "--nodes", 2, "--train-args", step)
    (run / "slurm").mkdir()
    # MASTER_PORT (which the script prefers to its port from the job id): other test runs on this machine
    # number their jobs from 1 too
    env = {**slurm_cluster.env, "MASTER_PORT": str(free_ports(1)[0])}
    submit = subprocess.run([slurm_cluster.programs["sbatch"], "--parsable", str(scripts["v0000-train.sbatch"])],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    roll_cli("train", "--run", reference, *step.split())  # the reference, while Slurm works
    jobs = wait_for_jobs(slurm_cluster, timeout=300)
    # the whole output: after the update, the agent that did not host the rendezvous store may log torch's C++
    # warning (a trace of ~40 lines) that the store went away while it closed the rendezvous
    output = "\n".join(p.read_text() for p in (run / "slurm").glob("*.out"))
    assert jobs.get(job) == "COMPLETED", f"{jobs}\n{output[-3000:]}\n{slurm_cluster.logs()}"
    shown = subprocess.run([which("scontrol"), "show", "job", job, "-o"], env=env, capture_output=True, text=True,
                           check=True).stdout
    assert "NumNodes=2 " in shown and "NodeList=" in shown, shown
    assert summary(output)["version"] == 1 and summary(output)["steps"] == 1, output[-3000:]

    a = load_file(Run(run).policy_dir(1) / "model.safetensors")
    b = load_file(Run(reference).policy_dir(1) / "model.safetensors")
    before = load_file(Run(run).policy_dir(0) / "model.safetensors")
    assert max((a[k] - before[k]).abs().max().item() for k in a) > 1e-4  # an optimiser step happened
    gaps = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert gaps.max().item() <= 1.3 * 2 * 1e-3 * 1 and gaps.median().item() < 1.2e-7, gaps.median()
