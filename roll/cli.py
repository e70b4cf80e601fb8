"""The `roll` command line. Each command parses options into a stage's frozen config and calls its `run`.

Every option is generated from a field of the stage's config dataclass (roll/options.py), which holds its
default and help once. Heavy libraries (torch, transformers, duckdb) are imported inside the commands and
stages, so `roll --help` is quick.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from roll.distributed import LaunchConfig
from roll.errors import RollError
from roll.options import VERSION_MAX, Bounded, Range, config_options, config_values
from roll.pipeline.iterate import IterateConfig
from roll.pipeline.report import ReportConfig
from roll.pipeline.retention import GcConfig
from roll.pipeline.slurm import SlurmConfig
from roll.pipeline.sweep import SweepConfig
from roll.runs import InitConfig, default_run_path, ensure_run
from roll.sql import SqlConfig
from roll.stages.evaluate import EvaluateConfig
from roll.stages.generate import GenerateConfig
from roll.stages.ingest import ImportConfig
from roll.stages.ope import OpeConfig
from roll.stages.score import ScoreConfig
from roll.stages.train import TrainConfig
from roll.stages.verify import VerifyConfig
from roll.warmstart import WarmstartConfig


class RollGroup(click.Group):
    """Turns a RollError, or an OS error (disk full, read-only file system, no permission …), into one line
    on stderr and exit status 2. Writers commit by rename, so whatever failed left nothing half-written."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RollError as exc:
            click.echo(f"roll: error: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            click.echo(f"roll: error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)


# -------------------------------------------------------------------------- option groups, defined once
def run_option(f):
    return click.option("--run", "run_path", type=click.Path(path_type=Path), default=None,
                        help="Run directory. [default: $ROLL_RUN, else ./runs/default; created from the "
                             "embedded default if missing]")(f)


def existing_run(run_path):
    """The run at --run (or the default path), which must exist: reading commands do not create one."""
    from roll.store import Run

    run = Run(run_path or default_run_path())
    if not run.exists():
        raise RollError(f"{run.root}: no run here (create one with `roll init` or `roll generate`)")
    return run


def json_safe(value):
    """JSON has no NaN or infinity: a non-finite float becomes null, so every summary is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def print_summary(summary: dict) -> None:
    click.echo(json.dumps(json_safe(summary), indent=2, default=str, allow_nan=False))


@click.group(cls=RollGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="roll", prog_name="roll", message="%(prog)s %(version)s")
def cli():
    """roll: RL for language-model reasoning from off-policy (stale, lagged) data.

    Stages exchange Parquet shards in a run directory; every rollout row records the policy version that
    made it. With no arguments everything runs offline on a built-in arithmetic task and a tiny model.

    \b
    Example:
      roll generate && roll sql "select policy_version, count(*) from rollouts group by 1"
    """


@cli.command()
@run_option
@config_options(InitConfig)
def init(run_path, **values):
    """Create a run: the prompts table, policy v0000 and run.toml.

    \b
    Example:
      roll init --run runs/exp1 --task arith
    """
    from roll.runs import init_run

    print_summary(init_run(InitConfig(run=run_path or default_run_path(), **config_values(InitConfig, values))))


@cli.command()
@config_options(WarmstartConfig)
def warmstart(**values):
    """Train a built-in task's bundled model by supervised learning on worked solutions.

    Stops at a deliberately weak policy so RL has room to improve it.

    \b
    Example:
      roll warmstart --seed 0 --target-accuracy 0.2
      roll warmstart --task chain
    """
    from roll.warmstart import run as run_warmstart

    summary = run_warmstart(WarmstartConfig(**config_values(WarmstartConfig, values)))
    summary.pop("losses")  # one number per step: in the returned dict for Python callers, not printed
    print_summary(summary)


@cli.command()
@run_option
@config_options(GenerateConfig)
def generate(run_path, **values):
    """Sample G completions per prompt from a policy version into rollouts/version=V/.

    A committed shard is skipped unless --force.

    \b
    Example:
      roll generate --prompts 64 --group-size 8 --shard 0/2
    """
    from roll.stages.generate import run as run_generate

    print_summary(run_generate(GenerateConfig(run=ensure_run(run_path).root, **config_values(GenerateConfig, values))))


@cli.command()
@run_option
@config_options(VerifyConfig)
def verify(run_path, **values):
    """Extract final answers, compare with the ground truth, write verdicts/version=V/.

    The reward is the verifier's (1 if correct, else 0), or with --reward the weighted sum of that term
    (`correct`) and your own functions f(completion, answer, prompt_row), each call bounded by --timeout; a
    call that fails gives its term 0 and its error. After changing --reward, rerun with --force.

    \b
    Example:
      roll verify --version 0 --shard 0/4
      roll verify --reward correct --reward my_rewards.py:format_reward --reward-weight 1 --reward-weight 0.2
    """
    from roll.stages.verify import run as run_verify

    print_summary(run_verify(VerifyConfig(run=ensure_run(run_path).root, **config_values(VerifyConfig, values))))


@cli.command()
@run_option
@config_options(ScoreConfig)
def score(run_path, **values):
    """Teacher-forced log-probs under the behaviour checkpoint and π_ref, into scores/version=V/.

    \b
    Example:
      roll score --version 0
    """
    from roll.stages.score import run as run_score

    print_summary(run_score(ScoreConfig(run=ensure_run(run_path).root, **config_values(ScoreConfig, values))))


@cli.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@run_option
@config_options(ImportConfig)
def import_(file, run_path, **values):
    """Import rollouts generated elsewhere (JSONL or Parquet) as version V's rollouts, and verdicts where the
    rows carry rewards. Every row is checked first; a bad row is one line naming the file, row and column.

    \b
    Example:
      roll sql --format jsonl "select prompt_id, token_ids, behaviour_logprobs, reward from samples" > rows.jsonl
      roll init --run other && roll import rows.jsonl --run other --version 0 && roll train --run other
    """
    from roll.stages.ingest import run as run_import

    print_summary(run_import(ImportConfig(file=file, run=existing_run(run_path).root,
                                          **config_values(ImportConfig, values))))


@cli.command()
@run_option
@config_options(OpeConfig)
def ope(run_path, **values):
    """Judge policy V on stale rollouts: pessimistic off-policy evaluation by logarithmic smoothing.

    Writes per-row log-weights to ope/version=V/ and one summary row (LS estimate and lower bound, IPS,
    SNIPS, effective sample size) to the `ope_summary` view.

    \b
    Example:
      roll ope --version 8 --data-versions 4..7
    """
    from roll.stages.ope import run as run_ope

    print_summary(run_ope(OpeConfig(run=existing_run(run_path).root, **config_values(OpeConfig, values))))


@cli.command()
@run_option
@config_options(TrainConfig)
@click.option("--nproc", default=1, type=Bounded(int, Range(1, 1024)),
              help="Processes on this machine: >1 (or --nnodes > 1) relaunches this command under torchrun "
                   "(DDP; gloo on CPU).")
@config_options(LaunchConfig)
def train(run_path, nproc, **values):
    """Update policy v to v+1 with an objective on rollouts of versions [v-L-W+1, v-L].

    Runs verify and score first on selected versions that lack them (and, for apo, samples the version-0
    completions it reads). On several machines, run the same command once on each (`srun` does) with
    --nnodes N and the first machine as --rdzv-endpoint; the run directory must be one every machine sees.

    \b
    Example:
      roll generate && roll train --objective stable-pess
      roll train --log-to tensorboard && tensorboard --logdir runs/default/logs/tensorboard
      srun --ntasks-per-node=1 roll train --nnodes 2 --nproc 8 --rdzv-endpoint node001:29400 --rdzv-id "$SLURM_JOB_ID"
    """
    from roll.pipeline.prepare import prepare_update
    from roll.sinks import check_sinks, log_update
    from roll.stages.train import run as run_train

    check_sinks(values["log_to"] or ())  # before ensure_run may create a run
    launch = LaunchConfig(**config_values(LaunchConfig, values))
    # across machines the run must already be there: a node that does not mount it must not make its own
    root = (existing_run(run_path) if launch.nnodes > 1 else ensure_run(run_path)).root
    config = TrainConfig(run=root, **config_values(TrainConfig, values))
    relaunch = nproc > 1 or launch.nnodes > 1 or launch.rdzv_endpoint is not None
    if os.environ.get("RANK", "0") == "0" and launch.nnodes == 1:
        # verify, score, apo's version-0 samples: in this process before torchrun starts the ranks, or under
        # torchrun in rank 0 alone while the others wait for it in train's process-group set-up (across
        # machines always the latter: every machine runs this command, and only one may prepare)
        prepare_update(config, world=nproc if relaunch else int(os.environ.get("WORLD_SIZE", "1")))
    if relaunch:
        from roll.distributed import launch as launch_torchrun

        launcher = {"--nproc", "--run", *(f"--{name.replace('_', '-')}" for name in config_values(LaunchConfig, values))}
        argv = sys.argv[sys.argv.index("train") + 1:]
        argv = [a for i, a in enumerate(argv) if a.split("=")[0] not in launcher and (i == 0 or argv[i - 1] not in launcher)]
        sys.exit(launch_torchrun(launch, nproc, argv, str(root)))
    summary = run_train(config)
    if summary.get("rank", 0) == 0:
        if config.log_to and not summary["skipped"]:
            log_update(config, summary["version"])
        print_summary(summary)
    else:
        # a torchrun rank other than 0 has left its process group cleanly (train's Distributed.finish); under
        # load, interpreter teardown of FSDP2's state then sometimes aborted the process ("terminate called
        # without an active exception", exit -6) after the update was made. Nothing of it is left to flush.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@cli.command()
@run_option
@config_options(IterateConfig)
@config_options(GenerateConfig, group="sampling")
@config_options(TrainConfig, group="training")
@config_options(GenerateConfig, only=("seed", "device"))  # given to every stage of the loop
def iterate(run_path, seed, device, **values):
    """Run generate -> verify -> score -> train -> evaluate for N iterations with the lag of --lag/--window.

    Rerunning the same command after a crash resumes where it stopped.

    \b
    Example:
      roll iterate --iterations 20 --objective stable-pess --lag 2
      roll iterate --log-to tensorboard && tensorboard --logdir runs/default/logs/tensorboard
    """
    from roll.pipeline.iterate import run as run_iterate
    from roll.sinks import check_sinks

    check_sinks(values["log_to"] or ())  # before ensure_run may create a run
    root = ensure_run(run_path).root
    config = IterateConfig(
        run=root, **config_values(IterateConfig, values),
        generate=GenerateConfig(run=root, seed=seed, device=device, **config_values(GenerateConfig, values, "sampling")),
        train=TrainConfig(run=root, seed=seed, device=device, **config_values(TrainConfig, values, "training")))
    print_summary(run_iterate(config))


@cli.command()
@run_option
@config_options(GcConfig)
def gc(run_path, **values):
    """Delete policy checkpoints (weights and optimiser state) that nothing still needs.

    Always kept: v0, the latest N, evaluated versions, and versions a future lag window must still score.
    Rollouts, verdicts, scores and metrics are never deleted.

    \b
    Example:
      roll gc --keep 3 --lag 2
    """
    from roll.pipeline.retention import run as run_gc

    print_summary(run_gc(GcConfig(run=run_path or default_run_path(), **config_values(GcConfig, values))))


@cli.command()
@run_option
@config_options(EvaluateConfig)
def evaluate(run_path, **values):
    """Held-out pass@1 (mean over k samples), unbiased pass@k and maj@k, into evals/version=V/.

    \b
    Example:
      roll evaluate --k 8 --temperature 1.0
    """
    from roll.stages.evaluate import run as run_evaluate

    print_summary(run_evaluate(EvaluateConfig(run=ensure_run(run_path).root, **config_values(EvaluateConfig, values))))


@cli.command()
@click.option("--advantages", default=None, help="Comma-separated advantages of one group, e.g. 0.5,-0.5,-0.5.")
@click.option("--rewards", default=None, help="Comma-separated rewards of one group (advantages come from --objective).")
@config_options(TrainConfig, only=("objective", "beta", "beta1", "shift"))  # the objective turns --rewards into A
@run_option
@click.option("--version", "data_version", type=Bounded(int, Range(0, VERSION_MAX)), default=None,
              help="Behaviour version of a group in the run.")
@click.option("--prompt-id", default=None, help="Prompt of a group in the run (with --version).")
def lambert(advantages, rewards, objective, run_path, data_version, prompt_id, beta, beta1, shift):
    """Print a group's nominal (Boltzmann) and induced (Lambert) targets side by side, with m, k and regime.

    \b
    Example:
      roll lambert --rewards 1,0,0,0,1,0,0,0 --objective pmd-mean --beta 0.1
      roll lambert --advantages 0.5,-0.25,-0.25 --beta 0.05
      roll lambert --version 0 --prompt-id arith-train-00042
    """
    from roll.lambert import show

    show(advantages=advantages, rewards=rewards, objective=objective, beta=beta, beta1=beta1, shift=shift,
         run_path=run_path, data_version=data_version, prompt_id=prompt_id)


@cli.command()
@config_options(SweepConfig)
@config_options(IterateConfig, group="loop")
@config_options(GenerateConfig, group="sampling")
@config_options(TrainConfig, group="training")
def sweep(**values):
    """Run objective x lag x seed as separate runs, then `roll report` over them all (out/report/).

    --objective and --lag given here are ignored: the grid sets them.

    \b
    Example:
      roll sweep --objectives ppo,stable-pess --lags 0,4 --seeds 0 --iterations 10
    """
    from roll.pipeline.sweep import run as run_sweep

    out = values["out"]
    loop = IterateConfig(run=out, **config_values(IterateConfig, values, "loop"),
                         generate=GenerateConfig(run=out, **config_values(GenerateConfig, values, "sampling")),
                         train=TrainConfig(run=out, **config_values(TrainConfig, values, "training")))
    print_summary(run_sweep(SweepConfig(**config_values(SweepConfig, values), iterate=loop)))


@cli.command()
@click.argument("run_paths", metavar="[RUN]...", nargs=-1, type=click.Path(path_type=Path))
@config_options(ReportConfig)
def report(run_paths, **values):
    """Plots (PNG) and a markdown summary over one or several runs: pass@1, entropy, KL, regimes by lag.

    Runs are named with --run or as arguments. With --to, rebuild the runs' TensorBoard (wandb, trackio)
    curves from their tables instead.

    \b
    Example:
      roll report --run runs/ppo-lag4 --run runs/stable-pess-lag4 --out report/
      roll report --to tensorboard runs/ppo-lag4 && tensorboard --logdir runs/ppo-lag4/logs/tensorboard
    """
    from roll.pipeline.report import run as run_report

    config = config_values(ReportConfig, values)
    runs = (*(config["runs"] or ()), *run_paths) or (default_run_path(),)
    print_summary(run_report(ReportConfig(**{**config, "runs": runs})))


@cli.group()
def slurm():
    """Render Slurm batch scripts (job arrays for generate/verify/score, torchrun for train).

    \b
    Example:
      roll slurm render --iterations 2 --array-size 4 --out slurm/
    """


@slurm.command("render")
@run_option
@config_options(SlurmConfig)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the scripts and submit.sh into this folder. [default: print them]")
def slurm_render(run_path, out, **values):
    """Print (or write with --out) sbatch scripts for N iterations, chained with --dependency=afterok.

    \b
    Example:
      roll slurm render --iterations 4 --array-size 8 --gpus-per-train 2 --lag 1 --out slurm/ && bash slurm/submit.sh

    \b
    On several nodes (train: 2 nodes × 8 GPUs under srun, one torchrun agent each; arrays: 16 tasks, 1 GPU each):
      roll slurm render --run /shared/runs/r1 --iterations 4 --nodes 2 --gpus-per-node 8 \\
        --array-size 16 --gpus-per-task 1 --out slurm/ && bash slurm/submit.sh
    """
    from roll.pipeline.slurm import render, write

    config = SlurmConfig(run=(run_path or default_run_path()).resolve(), **config_values(SlurmConfig, values))
    if out:
        print_summary({"written": [str(p) for p in write(config, out)]})
    else:
        for name, text in render(config).items():
            click.echo(f"# ===== {name}\n{text}")


@cli.command()
@click.argument("query")
@run_option
@config_options(SqlConfig)
def sql(query, run_path, **values):
    """Run a read-only SQL QUERY over the run's tables with DuckDB.

    Views: prompts, rollouts, verdicts, scores, samples (their join), steps, groups, evals, ope, ope_summary.
    A file whose content disagrees with its place (another version, shard or schema) is left out with a line
    on stderr. Ctrl-C stops the query (exit 130).

    \b
    Example:
      roll sql "select policy_version, count(*), avg(num_tokens) from rollouts group by 1"
    """
    from roll.sql import run as run_sql

    try:
        run_sql(SqlConfig(run=existing_run(run_path).root, query=query, **config_values(SqlConfig, values)))
    except KeyboardInterrupt:
        click.echo("roll: error: interrupted (Ctrl-C); the query was stopped", err=True)
        sys.exit(130)


@cli.command()
@click.option("--socket", "socket_path", required=True, type=click.Path(path_type=Path),
              help="Unix socket to serve on; commands reach it through $ROLL_WARM.")
def warm(socket_path):
    """Keep torch, transformers and duckdb imported; run each `roll` command in a fresh fork of this process.

    Five stage commands from a shell script otherwise pay five ~4.5 s imports. Runs until SIGTERM or
    Ctrl-C. A command starts cold (one line on stderr) if roll's source or an import-time setting differs.

    \b
    Example:
      roll warm --socket /tmp/roll.sock &  export ROLL_WARM=/tmp/roll.sock
      roll generate && roll verify && roll score && roll train
    """
    from roll.warm import serve

    # a child of `roll warm` runs its command here, never forwarded again (it would ask itself)
    serve(str(socket_path), command=run_here, ready=lambda: click.echo(f"roll: warm on {socket_path}", err=True))


def main():
    warm_socket = os.environ.get("ROLL_WARM")
    # not `roll warm` itself, nor a torchrun rank (torchrun must own its ranks)
    if warm_socket and sys.argv[1:2] != ["warm"] and "LOCAL_RANK" not in os.environ:
        from roll.warm import run_warm

        status = run_warm(warm_socket, sys.argv)
        if status is not None:
            sys.exit(status)
    run_here()


def run_here():
    """Parse sys.argv and run the command in this process."""
    try:
        cli(prog_name="roll")
    except RollError as exc:  # raised outside a command (while parsing)
        click.echo(f"roll: error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
