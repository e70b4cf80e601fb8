"""The `roll` command line. Each command parses options into a stage's frozen config and calls its `run`.

Heavy libraries (torch, transformers, duckdb) are imported inside the commands, so `roll --help` is quick.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from roll.errors import RollError



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


def shard_option(f):
    return click.option("--shard", default="0/1", show_default=True,
                        help="This process's part i/N of the version's prompts (a Slurm array task).")(f)


def seed_option(f):
    return click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")(f)


def version_option(f):
    return click.option("--version", "version", type=int, default=None,
                        help="Policy version to use. [default: the latest committed]")(f)


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
@click.option("--task", default="arith", help="Built-in task name, or a .jsonl/.parquet file with prompt and answer columns.")
@click.option("--model", default=None, help="Checkpoint directory (or hub id) of a causal LM. [default: the embedded model]")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True,
              help="Weights' dtype, kept by every commit (auto: the checkpoint's own). bf16 trains with fp32 master weights.")
@seed_option
def init(run_path, task, model, seed, dtype):
    """Create a run: the prompts table, policy v0000 and run.toml.

    \b
    Example:
      roll init --run runs/exp1 --task arith
    """
    from roll.runs import InitConfig, default_run_path, init_run

    print_summary(init_run(InitConfig(run=run_path or default_run_path(), task=task, model=model, seed=seed, dtype=dtype)))


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to save the checkpoint. [default: the package's data/default_model]")
@seed_option
@click.option("--steps", default=3000, help="Most supervised steps to take.")
@click.option("--batch-size", default=64, help="Solved examples per step.")
@click.option("--lr", default=1e-3, help="AdamW learning rate.")
@click.option("--eval-every", default=100, help="Measure sampled pass@1 every this many steps.")
@click.option("--eval-prompts", default=200, help="Test prompts per measurement (one sample each, T=1).")
@click.option("--target-accuracy", default=0.2, help="Stop once sampled pass@1 reaches this (a deliberately weak policy).")
def warmstart(out, seed, steps, batch_size, lr, eval_every, eval_prompts, target_accuracy):
    """Train the embedded default model by supervised learning on solved arith problems.

    Stops at a deliberately weak policy so RL has room to improve it.

    \b
    Example:
      roll warmstart --seed 0 --target-accuracy 0.2
    """
    from roll.warmstart import WarmstartConfig, run as run_warmstart

    config = WarmstartConfig(out=out, seed=seed, steps=steps, batch_size=batch_size, lr=lr,
                             eval_every=eval_every, eval_prompts=eval_prompts, target_accuracy=target_accuracy)
    summary = run_warmstart(config)
    summary.pop("losses")  # one number per step: in the returned dict for Python callers, not printed
    print_summary(summary)


def options(*decorators):
    """Apply a group of click options written once (STYLE: shared option groups)."""
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


SAMPLING_OPTIONS = options(
    click.option("--prompts", default=64, help="Train prompts drawn per version (across all shards)."),
    click.option("--group-size", default=8, help="Completions per prompt (G)."),
    click.option("--max-new-tokens", type=int, default=None,
                 help="Completion length limit. [default: the run's, from its task: 48 arith, 512 gsm8k, 1024 math]"),
    click.option("--temperature", default=1.0, help="Sampling temperature; 0 is greedy."),
    click.option("--top-p", default=1.0, help="Nucleus sampling mass (1 = off)."),
    click.option("--batch-size", default=256, help="Sequences per forward pass while sampling."),
    click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf",
                 help="Generation engine (vllm: GPU only, untested here)."),
)

GENERATE_FIELDS = ("prompts", "group_size", "max_new_tokens", "temperature", "top_p", "batch_size", "backend")


@cli.command()
@run_option
@version_option
@SAMPLING_OPTIONS
@seed_option
@shard_option
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--force", is_flag=True, help="Regenerate a shard that is already committed.")
def generate(run_path, version, seed, shard, device, force, **sampling):
    """Sample G completions per prompt from a policy version into rollouts/version=V/.

    A committed shard is skipped unless --force.

    \b
    Example:
      roll generate --prompts 64 --group-size 8 --shard 0/2
    """
    from roll.runs import ensure_run
    from roll.stages.generate import GenerateConfig, run as run_generate
    from roll.store import Shard

    parsed = Shard.parse(shard)  # refuse a bad --shard before creating anything
    config = GenerateConfig(run=ensure_run(run_path).root, version=version, seed=seed, shard=parsed,
                            device=device, force=force, **sampling)
    print_summary(run_generate(config))


def versions_option(f):
    return click.option("--version", "versions", type=int, multiple=True,
                        help="Behaviour version to process (repeatable). [default: every version with rollouts]")(f)


@cli.command()
@run_option
@versions_option
@shard_option
@click.option("--verifier", type=click.Choice(["arith", "math"]), default=None,
              help="Verifier. [default: chosen from each prompt's task]")
@click.option("--timeout", default=5.0, help="Hard bound in seconds on checking one answer.")
@click.option("--workers", default=2, help="Verifier worker processes (math verifier).")
@click.option("--format-penalty", default=0.0, help="Subtracted from the reward when no final answer is found.")
@click.option("--force", is_flag=True, help="Re-verify committed shards.")
def verify(run_path, versions, shard, verifier, timeout, workers, format_penalty, force):
    """Extract final answers, compare with the ground truth, write verdicts/version=V/.

    \b
    Example:
      roll verify --version 0 --shard 0/4
    """
    from roll.runs import ensure_run
    from roll.stages.verify import VerifyConfig, run as run_verify
    from roll.store import Shard

    parsed = Shard.parse(shard)
    print_summary(run_verify(VerifyConfig(run=ensure_run(run_path).root, versions=versions or None, shard=parsed,
                                          verifier=verifier, timeout=timeout, workers=workers,
                                          format_penalty=format_penalty, force=force)))


@cli.command()
@run_option
@versions_option
@shard_option
@click.option("--batch-size", default=64, help="Sequences per forward pass.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--ref/--no-ref", default=True,
              help="Also π_ref's log-probs (--no-ref: one forward pass fewer; train re-scores if its objective needs them).")
@click.option("--force", is_flag=True, help="Re-score committed shards.")
def score(run_path, versions, shard, batch_size, device, ref, force):
    """Teacher-forced log-probs under the behaviour checkpoint and π_ref, into scores/version=V/.

    \b
    Example:
      roll score --version 0
    """
    from roll.runs import ensure_run
    from roll.stages.score import ScoreConfig, run as run_score
    from roll.store import Shard

    parsed = Shard.parse(shard)
    print_summary(run_score(ScoreConfig(run=ensure_run(run_path).root, versions=versions or None, shard=parsed,
                                        batch_size=batch_size, device=device, ref=ref, force=force)))


TRAINING_OPTIONS = options(
    click.option("--objective", default="stable-pess", help="ppo, cispo, pg, oapl, apo, pmd-mean or stable-pess."),
    click.option("--lag", default=0, help="L: update v -> v+1 reads behaviour versions up to v - L."),
    click.option("--window", default=1, help="W: the number of behaviour versions read, ending at v - L."),
    click.option("--beta", default=0.1, help="β: KL temperature of the regression objectives and the Lambert diagnostics."),
    click.option("--beta1", default=0.2, help="β₁: temperature of the soft value in oapl and apo."),
    click.option("--shift", default=1.0, help="s: stable-pess baseline shift, in units of β."),
    click.option("--clip-low", default=0.2, help="PPO ε_low."),
    click.option("--clip-high", default=0.2, help="PPO ε_high (and the CISPO weight cap 1 + ε_high)."),
    click.option("--kl-ref", default=0.0, help="Weight of the k3 KL-to-π_ref term (ppo, cispo, pg)."),
    click.option("--adv-norm", type=click.Choice(["std", "none"]), default="std", help="ppo/cispo advantage normalisation."),
    click.option("--lr", default=3e-4, help="AdamW learning rate (after warm-up)."),
    click.option("--warmup-steps", default=0, help="Linear learning-rate warm-up over the run's first N optimiser steps."),
    click.option("--weight-decay", default=0.0, help="AdamW decoupled weight decay."),
    click.option("--fresh-optimizer", is_flag=True,
                 help="Start a new AdamW every update instead of resuming the parent version's state."),
    click.option("--drop-zero-variance", is_flag=True,
                 help="Leave out groups whose rewards are all equal (DAPO's dynamic sampling filter)."),
    click.option("--gradient-checkpointing", is_flag=True,
                 help="Recompute each transformer block's activations in backward: less memory, more time."),
    click.option("--epochs", default=1, help="Passes over the selected rows per update."),
    click.option("--mini-batch", default=512, help="Completions per optimiser step."),
    click.option("--micro-batch", default=64, help="Completions per forward/backward (gradient accumulation)."),
    click.option("--grad-clip", default=1.0, help="Max global gradient norm (0 = off)."),
)


def data_versions_type(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("..")
    try:
        return (int(lo), int(hi or lo))
    except ValueError:
        raise RollError(f"--data-versions {text}: write a..b (e.g. 3..5) or one version") from None


@cli.command()
@run_option
@click.option("--version", "version", type=int, default=None, help="Target policy version V. [default: the latest]")
@click.option("--data-versions", default=None, help="Behaviour versions a..b of the stale rollouts. [default: V-1]")
@click.option("--delta", default=0.05, show_default=True, help="The lower bound holds with probability >= 1 - delta.")
@click.option("--lambda", "lambda_rule", default="auto", show_default=True,
              help="λ of logarithmic smoothing: auto (best of a fixed grid, union bound), sqrt (1/sqrt(n)) or a number.")
@shard_option
@click.option("--batch-size", default=64, help="Sequences per forward pass.")
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--force", is_flag=True, help="Recompute log-weights already committed.")
def ope(run_path, version, data_versions, delta, lambda_rule, shard, batch_size, device, force):
    """Judge policy V on stale rollouts: pessimistic off-policy evaluation by logarithmic smoothing.

    Writes per-row log-weights to ope/version=V/ and one summary row (LS estimate and lower bound, IPS,
    SNIPS, effective sample size) to the `ope_summary` view.

    \b
    Example:
      roll ope --version 8 --data-versions 4..7
    """
    from roll.runs import default_run_path
    from roll.stages.ope import OpeConfig, run as run_ope
    from roll.store import Run, Shard

    run = Run(run_path or default_run_path())
    if not run.exists():
        raise RollError(f"{run.root}: no run here")
    print_summary(run_ope(OpeConfig(run=run.root, version=version,
                                    data_versions=data_versions_type(data_versions) if data_versions else None,
                                    delta=delta, lambda_rule=lambda_rule, shard=Shard.parse(shard),
                                    batch_size=batch_size, device=device, force=force)))


@cli.command()
@run_option
@version_option
@TRAINING_OPTIONS
@seed_option
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--force", is_flag=True, help="Retrain version v+1 even if it exists.")
@click.option("--nproc", default=1, help="Processes: >1 relaunches this command under torchrun (DDP; gloo on CPU).")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard weights, gradients and Adam state (FSDP2) instead of DDP.")
def train(run_path, version, seed, device, force, nproc, fsdp, **training):
    """Update policy v to v+1 with an objective on rollouts of versions [v-L-W+1, v-L].

    Runs verify and score first on selected versions that lack them.

    \b
    Example:
      roll generate && roll train --objective stable-pess
    """
    from roll.runs import ensure_run
    from roll.stages.train import TrainConfig, run as run_train

    root = ensure_run(run_path).root
    if nproc > 1:
        import subprocess

        argv = sys.argv[sys.argv.index("train") + 1:]
        argv = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
                and not a.startswith("--nproc=")]
        argv = [a for i, a in enumerate(argv) if a != "--run" and (i == 0 or argv[i - 1] != "--run")]
        # the run travels in $ROLL_RUN: torchrun's parser would take `--run` for its own --run-path
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
                   "-m", "roll", "train", *argv]
        sys.exit(subprocess.call(command, env={**os.environ, "ROLL_RUN": str(root)}))
    config = TrainConfig(run=root, version=version, seed=seed, device=device, fsdp=fsdp, force=force, **training)
    summary = run_train(config)
    if summary.get("rank", 0) == 0:
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
@click.option("--iterations", default=20, help="Updates to reach (the run ends at policy version N).")
@SAMPLING_OPTIONS
@TRAINING_OPTIONS
@click.option("--eval-every", default=5, help="Evaluate every E versions (and the last); 0 = never.")
@click.option("--eval-k", default=4, help="Samples per held-out prompt.")
@click.option("--eval-limit", type=int, default=None, help="Held-out prompts per evaluation. [default: all]")
@click.option("--sync-interval", default=1,
              help="S: each version samples S x --prompts prompts once and its update takes S optimiser steps on them.")
@click.option("--keep-policies", type=int, default=None,
              help="Delete checkpoints nothing needs after each iteration, keeping v0, evaluated and the latest N. [default: keep all]")
@seed_option
@click.option("--device", default="auto", help="auto, cpu or cuda.")
def iterate(run_path, iterations, eval_every, eval_k, eval_limit, sync_interval, keep_policies, seed, device, **options_):
    """Run generate -> verify -> score -> train -> evaluate for N iterations with the lag of --lag/--window.

    Rerunning the same command after a crash resumes where it stopped.

    \b
    Example:
      roll iterate --iterations 20 --objective stable-pess --lag 2
    """
    from roll.pipeline.iterate import IterateConfig, run as run_iterate
    from roll.runs import ensure_run
    from roll.stages.generate import GenerateConfig
    from roll.stages.train import TrainConfig

    root = ensure_run(run_path).root
    sampling = {k: v for k, v in options_.items() if k in GENERATE_FIELDS}
    training = {k: v for k, v in options_.items() if k not in GENERATE_FIELDS}
    config = IterateConfig(run=root, iterations=iterations, eval_every=eval_every, eval_k=eval_k,
                           eval_limit=eval_limit, sync_interval=sync_interval, keep_policies=keep_policies,
                           generate=GenerateConfig(run=root, seed=seed, device=device, **sampling),
                           train=TrainConfig(run=root, seed=seed, device=device, **training))
    print_summary(run_iterate(config))


@cli.command()
@run_option
@click.option("--keep", default=3, help="Keep the latest N policy versions.")
@click.option("--lag", default=0, help="L of the updates still to come: unscored versions in their window are kept.")
@click.option("--window", default=1, help="W of the updates still to come.")
@click.option("--version", "versions", type=int, multiple=True,
              help="Delete exactly this version (repeatable); refused if it is still needed. [default: every unneeded one]")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
def gc(run_path, keep, lag, window, versions, dry_run):
    """Delete policy checkpoints (weights and optimiser state) that nothing still needs.

    Always kept: v0, the latest N, evaluated versions, and versions a future lag window must still score.
    Rollouts, verdicts, scores and metrics are never deleted.

    \b
    Example:
      roll gc --keep 3 --lag 2
    """
    from roll.pipeline.retention import GcConfig, run as run_gc
    from roll.runs import default_run_path

    print_summary(run_gc(GcConfig(run=run_path or default_run_path(), keep=keep, lag=lag, window=window,
                                  versions=versions, dry_run=dry_run)))


@cli.command()
@run_option
@version_option
@click.option("--dataset", default=None, help="Bundled dataset (gsm8k, math, math500, aime24, aime25, amc23). [default: the run's test split]")
@click.option("--k", default=4, help="Samples per prompt.")
@click.option("--temperature", default=1.0, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, help="Nucleus sampling mass (1 = off).")
@click.option("--max-new-tokens", type=int, default=None,
              help="Completion length limit. [default: the run's, from its task: 48 arith, 512 gsm8k, 1024 math]")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N prompts. [default: all]")
@click.option("--batch-size", default=256, help="Sequences per forward pass.")
@seed_option
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--force", is_flag=True, help="Re-evaluate a committed version and dataset.")
def evaluate(run_path, version, dataset, k, temperature, top_p, max_new_tokens, limit, batch_size, seed, device, force):
    """Held-out pass@1 (mean over k samples), unbiased pass@k and maj@k, into evals/version=V/.

    \b
    Example:
      roll evaluate --k 8 --temperature 1.0
    """
    from roll.runs import ensure_run
    from roll.stages.evaluate import EvaluateConfig, run as run_evaluate

    config = EvaluateConfig(run=ensure_run(run_path).root, version=version, dataset=dataset, k=k,
                            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, limit=limit,
                            batch_size=batch_size, seed=seed, device=device, force=force)
    print_summary(run_evaluate(config))


@cli.command()
@click.option("--advantages", default=None, help="Comma-separated advantages of one group, e.g. 0.5,-0.5,-0.5.")
@click.option("--rewards", default=None, help="Comma-separated rewards of one group (advantages come from --objective).")
@click.option("--objective", default="stable-pess", help="Objective whose advantage turns --rewards (or a run's group) into A.")
@click.option("--beta", default=0.1, help="β.")
@click.option("--beta1", default=0.2, help="β₁ (oapl, apo).")
@click.option("--shift", default=1.0, help="s (stable-pess).")
@run_option
@click.option("--version", "data_version", type=int, default=None, help="Behaviour version of a group in the run.")
@click.option("--prompt-id", default=None, help="Prompt of a group in the run (with --version).")
def lambert(advantages, rewards, objective, beta, beta1, shift, run_path, data_version, prompt_id):
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
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/sweep"), help="Parent directory of the runs.")
@click.option("--objectives", default="ppo,pg,oapl,pmd-mean,stable-pess", help="Comma-separated objectives.")
@click.option("--lags", default="0,2,4,8", help="Comma-separated lags L.")
@click.option("--seeds", default="0,1,2", help="Comma-separated seeds.")
@click.option("--iterations", default=20, help="Updates per run.")
@click.option("--eval-every", default=5, help="Evaluate every E versions (and the last).")
@click.option("--eval-k", default=4, help="Samples per held-out prompt.")
@click.option("--eval-limit", type=int, default=None, help="Held-out prompts per evaluation. [default: all]")
@click.option("--model", default=None, help="Checkpoint for v0. [default: the embedded model]")
@SAMPLING_OPTIONS
@TRAINING_OPTIONS
def sweep(out, objectives, lags, seeds, iterations, eval_every, eval_k, eval_limit, model, **options_):
    """Run objective x lag x seed as separate runs, then `roll report` over them all (out/report/).

    --objective and --lag given here are ignored: the grid sets them.

    \b
    Example:
      roll sweep --objectives ppo,stable-pess --lags 0,4 --seeds 0 --iterations 10
    """
    from roll.pipeline.iterate import IterateConfig
    from roll.pipeline.sweep import SweepConfig, run as run_sweep
    from roll.stages.generate import GenerateConfig
    from roll.stages.train import TrainConfig

    def numbers(text):
        return tuple(int(x) for x in text.split(",") if x.strip())

    sampling = {k: v for k, v in options_.items() if k in GENERATE_FIELDS}
    training = {k: v for k, v in options_.items() if k not in GENERATE_FIELDS}
    loop = IterateConfig(run=out, iterations=iterations, eval_every=eval_every, eval_k=eval_k, eval_limit=eval_limit,
                         generate=GenerateConfig(run=out, **sampling), train=TrainConfig(run=out, **training))
    config = SweepConfig(out=out, objectives=tuple(x.strip() for x in objectives.split(",") if x.strip()),
                         lags=numbers(lags), seeds=numbers(seeds), iterate=loop, model=model)
    print_summary(run_sweep(config))


@cli.command()
@click.option("--run", "runs", type=click.Path(path_type=Path), multiple=True,
              help="Run directory to include (repeatable). [default: $ROLL_RUN, else ./runs/default]")
@click.option("--out", type=click.Path(path_type=Path), default=Path("report"), help="Directory for the PNGs and summary.md.")
def report(runs, out):
    """Plots (PNG) and a markdown summary over one or several runs: pass@1, entropy, KL, regimes by lag.

    \b
    Example:
      roll report --run runs/ppo-lag4 --run runs/stable-pess-lag4 --out report/
    """
    from roll.pipeline.report import ReportConfig, run as run_report
    from roll.runs import default_run_path

    print_summary(run_report(ReportConfig(runs=tuple(runs) or (default_run_path(),), out=out)))


@cli.group()
def slurm():
    """Render Slurm batch scripts (job arrays for generate/verify/score, torchrun for train).

    \b
    Example:
      roll slurm render --iterations 2 --array-size 4 --out slurm/
    """


@slurm.command("render")
@run_option
@click.option("--iterations", default=1, help="Updates to render.")
@click.option("--start", default=0, help="First policy version to train from.")
@click.option("--array-size", default=4, help="S: tasks per generate/verify/score job array.")
@click.option("--gpus-per-train", default=0, help="P: GPUs (torchrun processes) for train; 0 = one CPU process.")
@click.option("--partition", default=None, help="sbatch --partition.")
@click.option("--account", default=None, help="sbatch --account.")
@click.option("--time-limit", default="01:00:00", help="sbatch --time for every job.")
@click.option("--lag", default=0, help="L: train v reads data up to v - L, so generation overlaps training.")
@click.option("--window", default=1, help="W: behaviour versions per update.")
@click.option("--generate-args", default="", help="Extra options for roll generate, e.g. '--prompts 128'.")
@click.option("--train-args", default="", help="Extra options for roll train, e.g. '--objective ppo'.")
@click.option("--roll", "roll_command", default="roll", help="How the nodes call roll (e.g. a venv's bin/roll).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the scripts and submit.sh into this folder. [default: print them]")
def slurm_render(run_path, iterations, start, array_size, gpus_per_train, partition, account, time_limit, lag, window,
                 generate_args, train_args, roll_command, out):
    """Print (or write with --out) sbatch scripts for N iterations, chained with --dependency=afterok.

    \b
    Example:
      roll slurm render --iterations 4 --array-size 8 --gpus-per-train 2 --lag 1 --out slurm/ && bash slurm/submit.sh
    """
    from roll.pipeline.slurm import SlurmConfig, render, write
    from roll.runs import default_run_path

    config = SlurmConfig(run=(run_path or default_run_path()).resolve(), iterations=iterations, start=start,
                         array_size=array_size, gpus_per_train=gpus_per_train, partition=partition, account=account,
                         time_limit=time_limit, lag=lag, window=window, generate_args=generate_args,
                         train_args=train_args, roll=roll_command)
    if out:
        print_summary({"written": [str(p) for p in write(config, out)]})
    else:
        for name, text in render(config).items():
            click.echo(f"# ===== {name}\n{text}")


@cli.command()
@click.argument("query")
@run_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", help="Output format.")
def sql(query, run_path, fmt):
    """Run a read-only SQL QUERY over the run's tables with DuckDB.

    Views: prompts, rollouts, verdicts, scores, samples (their join), steps, groups, evals.

    \b
    Example:
      roll sql "select policy_version, count(*), avg(num_tokens) from rollouts group by 1"
    """
    from roll.runs import default_run_path
    from roll.sql import print_result
    from roll.store import Run, query as run_query

    run = Run(run_path or default_run_path())
    if not run.exists():
        raise RollError(f"{run.root}: no run here (create one with `roll init` or `roll generate`)")
    print_result(run_query(run, query), fmt)


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
