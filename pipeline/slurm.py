"""Slurm rendering: batch scripts for N iterations, every command a plain `roll` command (DESIGN §5).

For each iteration v the folder holds four scripts:

    v0003-generate.sbatch   job array of S tasks: roll generate --version 3 --shard $SLURM_ARRAY_TASK_ID/S
    v0003-verify.sbatch     job array of S tasks: roll verify   --version 3 --shard $SLURM_ARRAY_TASK_ID/S
    v0003-score.sbatch      job array of S tasks: roll score    --version 3 --shard $SLURM_ARRAY_TASK_ID/S
    v0003-train.sbatch      one job: torchrun … -m roll train --version 3 (or plain roll train on CPU);
                            with --nodes N > 1, N nodes, each running one torchrun agent under srun
                            (`roll train --nnodes N --nproc P --rdzv-endpoint HEAD:PORT`)

and submit.sh submits them all with `sbatch --parsable`, chained by `--dependency=afterok`:

    generate v  after train v−1 (policy v must exist)
    verify v    after generate v;   score v after verify v
    train v     after train v−1 and after score of every version in its window [v−L−W+1, v−L]

With --lag L > 0, train v waits only for data L versions old, so generation of the next versions runs
while older data trains, as an asynchronous cluster would. roll invents no scheduler: Slurm runs it all.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from roll.errors import RollError
from roll.options import VERSION_MAX, check_ranges, option
from roll.store import data_window


@dataclass(frozen=True)
class SlurmConfig:
    run: Path  # run directory (must be on a filesystem every node sees)
    iterations: int = option(1, "Updates to render: versions start … start+iterations−1 are trained.", min=1,
                             max=VERSION_MAX)
    start: int = option(0, "First policy version to train from.", min=0, max=VERSION_MAX)
    array_size: int = option(4, "S: tasks per generate/verify/score job array (on GPUs: N×P, one GPU each, fills "
                                "the train job's nodes).", min=1, max=100000)
    gpus_per_task: int = option(0, "GPUs for each generate/verify/score array task (#SBATCH --gpus=G); 0 = none.",
                                min=0, max=1024)
    gpus_per_train: int = option(0, "P: GPUs (torchrun processes) for train on one node; 0 = one CPU process. "
                                    "The same as --gpus-per-node P with --nodes 1.", min=0, max=1024)
    nodes: int = option(1, "N: nodes for train: one torchrun agent per node (srun), meeting over c10d at the "
                           "allocation's first node.", min=1, max=4096)
    gpus_per_node: int = option(0, "P: GPUs (torchrun processes) per train node; 0 = one CPU process per node.",
                                min=0, max=1024)
    partition: str | None = option(None, "sbatch --partition.", show_default=False)
    account: str | None = option(None, "sbatch --account.", show_default=False)
    time_limit: str = option("01:00:00", "sbatch --time for every job.")
    lag: int = option(0, "L: train v reads data up to v - L, so generation overlaps training.", min=0, max=VERSION_MAX)
    window: int = option(1, "W: behaviour versions per update.", min=1, max=VERSION_MAX)
    generate_args: str = option("", "Extra options for roll generate, e.g. '--prompts 128'.")
    train_args: str = option("", "Extra options for roll train, e.g. '--objective ppo'.")
    roll: str = option("roll", "How the nodes call roll (e.g. a venv's bin/roll).", flag="--roll")

def _header(config: SlurmConfig, name: str, array: bool) -> list[str]:
    # quoted where needed: sbatch splits an #SBATCH line at spaces unless quoted (a run path with a space)
    output = shlex.quote(f"{config.run}/slurm/%x-%A_%a.out" if array else f"{config.run}/slurm/%x-%j.out")
    lines = ["#!/bin/bash", f"#SBATCH --job-name={name}", f"#SBATCH --time={config.time_limit}",
             f"#SBATCH --output={output}"]
    if array:
        lines.append(f"#SBATCH --array=0-{config.array_size - 1}")
        if config.gpus_per_task:
            lines.append(f"#SBATCH --gpus={config.gpus_per_task}")
    if config.partition:
        lines.append(f"#SBATCH --partition={config.partition}")
    if config.account:
        lines.append(f"#SBATCH --account={config.account}")
    return lines + ["set -euo pipefail"]


def score_args(train_args: str) -> str:
    """`--no-ref` when the rendered train's objective never reads π_ref (as roll iterate does); if it does,
    or cannot be told, score computes π_ref's log-probs (train would re-score a version that lacks them)."""
    from roll.objectives import OBJECTIVES, ObjectiveConfig, uses_reference

    tokens, values = shlex.split(train_args), {"--objective": "stable-pess", "--kl-ref": "0"}
    for i, token in enumerate(tokens):
        name, _, inline = token.partition("=")
        if name in values:
            values[name] = inline or (tokens[i + 1] if i + 1 < len(tokens) else values[name])
    try:
        kl_ref = float(values["--kl-ref"])
    except ValueError:
        return ""
    if values["--objective"] not in OBJECTIVES:
        return ""
    return "" if uses_reference(values["--objective"], ObjectiveConfig(kl_ref=kl_ref)) else "--no-ref"


def gpus_per_node(config: SlurmConfig) -> int:
    if config.gpus_per_train and config.gpus_per_node and config.gpus_per_train != config.gpus_per_node:
        raise RollError(f"--gpus-per-train {config.gpus_per_train} and --gpus-per-node {config.gpus_per_node} disagree: "
                        "give --gpus-per-node (with --nodes) alone")
    return config.gpus_per_node or config.gpus_per_train


def train_command(config: SlurmConfig, run: str, options: str) -> tuple[list[str], list[str]]:
    """The train job's #SBATCH resource lines and its command lines."""
    gpus = gpus_per_node(config)
    resources = [f"#SBATCH --gpus-per-node={gpus}"] if gpus else []
    if config.nodes == 1:
        if gpus == 0:
            return resources, [f"{config.roll} train --run {run} {options}"]
        # the run goes in $ROLL_RUN: torchrun's parser would take `--run` for its own --run-path
        return resources, [f"ROLL_RUN={run} torchrun --standalone --nproc-per-node {gpus} -m roll train {options}"]
    # one task per node, each a torchrun agent (run by `roll train --nnodes`, which says a failed rendezvous in
    # one line) starting --nproc ranks; the agents meet at the allocation's first node, on a port set by the
    # job id (two jobs sharing a node do not clash) unless MASTER_PORT is set
    resources = [f"#SBATCH --nodes={config.nodes}", "#SBATCH --ntasks-per-node=1", *resources]
    return resources, [
        "# one torchrun agent per node: torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HEAD:PORT",
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'port="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"',
        f"srun --nodes={config.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 {config.roll} train --run {run} "
        f'--nnodes {config.nodes} --nproc {max(gpus, 1)} --rdzv-endpoint "${{nodes[0]}}:$port" '
        f'--rdzv-id "roll-$SLURM_JOB_ID" {options}'.rstrip()]


def render(config: SlurmConfig) -> dict[str, str]:
    """File name → script text for the whole chain, submit.sh included."""
    check_ranges(config)
    gpus_per_node(config)
    run = shlex.quote(str(config.run))
    roll = config.roll
    scripts: dict[str, str] = {}
    submit = ["#!/bin/bash", "# Submits the whole chain (job ids feed later --dependency flags); prints the last train job id.",
              "set -euo pipefail", 'cd "$(dirname "$0")"', f"mkdir -p {run}/slurm"]
    shard = f'"$SLURM_ARRAY_TASK_ID/{config.array_size}"'  # quoted: shellcheck SC2086
    windows = [data_window(v, config.lag, config.window) for v in range(config.start, config.start + config.iterations)]
    for v in range(config.start, config.start + config.iterations):
        tag = f"v{v:04d}"
        for stage, extra in (("generate", config.generate_args), ("verify", ""), ("score", score_args(config.train_args))):
            command = f"{roll} {stage} --run {run} --version {v} --shard {shard} {extra}".rstrip()
            scripts[f"{tag}-{stage}.sbatch"] = "\n".join(_header(config, f"roll-{stage}-{tag}", True) + [command]) + "\n"
        options = f"--version {v} --lag {config.lag} --window {config.window} {config.train_args}".rstrip()
        header = _header(config, f"roll-train-{tag}", False)
        resources, train_lines = train_command(config, run, options)
        scripts[f"{tag}-train.sbatch"] = "\n".join(header[:-1] + resources + header[-1:] + train_lines) + "\n"

        previous_train = f"$train_v{v - 1:04d}" if v > config.start else ""
        lo, hi = data_window(v, config.lag, config.window)
        after = lambda *ids: f'"--dependency=afterok:{":".join(i for i in ids if i)}" ' if any(ids) else ""  # noqa: E731
        submit.append(f"gen_{tag}=$(sbatch --parsable {after(previous_train)}{tag}-generate.sbatch)")
        submit.append(f"verify_{tag}=$(sbatch --parsable {after(f'$gen_{tag}')}{tag}-verify.sbatch)")
        # a score job no rendered train waits for (the last L versions when --lag L) keeps no variable (SC2034)
        score_used = any(lo_t <= v <= hi_t for lo_t, hi_t in windows[v - config.start:])
        score_job = f"sbatch --parsable {after(f'$verify_{tag}')}{tag}-score.sbatch"
        submit.append(f"score_{tag}=$({score_job})" if score_used else f"{score_job} >/dev/null")
        data = [f"$score_v{d:04d}" for d in range(lo, hi + 1) if d >= config.start]
        submit.append(f"train_{tag}=$(sbatch --parsable {after(previous_train, *data)}{tag}-train.sbatch)")
    last = f"v{config.start + config.iterations - 1:04d}"
    submit.append(f'echo "$train_{last}"')
    scripts["submit.sh"] = "\n".join(submit) + "\n"
    return scripts


def write(config: SlurmConfig, out: Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render(config).items():
        path = out / name
        path.write_text(text)
        path.chmod(0o755)
        paths.append(path)
    return paths
