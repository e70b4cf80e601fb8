"""iterate: generate → verify → score → train → evaluate, N times, with the lag semantics of DESIGN §3.1.

Iteration v samples rollouts from policy v, then trains v → v+1 on the behaviour versions
[v − L − W + 1, v − L] (so with L > 0 it trains on data generated L iterations ago, as an asynchronous
system would), and evaluates v+1 every `eval_every` versions and at the end. Every stage skips work that
is already committed, so rerunning the same command after a crash or Ctrl-C resumes where it stopped.

The two kinds of staleness of DESIGN §3.1: version lag (`lag`, `window`), and the sync interval S of OAPL,
where policy v samples S × P prompts once and the update v → v+1 takes S optimiser steps, each on P of
those prompts (mini-batch P × G), with π_b fixed. S versions of one step and one version of S steps take
the same number of steps on the same number of completions. `sample_every` S is the sync interval with a
version committed after every step: only versions kS sample (S × P prompts), and update v → v+1 takes one
step on the (v mod S)-th P prompts of version S·⌊v/S⌋ (`--data-slice`), so it can be evaluated between
samplings; S ≥ the iterations is fully offline (one sampling, then every step on it). With `keep_policies`,
checkpoints that no later stage needs are deleted after each iteration (`roll gc`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from roll.options import COUNT_MAX, GROUP_MAX, VERSION_MAX, check_ranges, option
from roll.stages.generate import GenerateConfig, check_config
from roll.stages.train import TrainConfig


@dataclass(frozen=True)
class IterateConfig:
    run: Path  # run directory
    iterations: int = option(20, "Updates to reach (the run ends at policy version N).", group="loop", min=1,
                             max=VERSION_MAX)
    eval_every: int = option(5, "Evaluate every E versions (v0 included) and the last; 0 = never.", group="loop", min=0,
                             max=VERSION_MAX)
    eval_k: int = option(4, "Samples per held-out prompt.", group="loop", min=1, max=GROUP_MAX)
    eval_limit: int | None = option(None, "Held-out prompts per evaluation. [default: all]", group="loop",
                                    show_default=False, min=1, max=COUNT_MAX)
    sync_interval: int = option(1, "S: each version samples S x --prompts prompts once and its update takes S optimiser "
                                   "steps on them.", min=1, max=VERSION_MAX)
    sample_every: int = option(1, "S: sample only at versions k·S (S x --prompts prompts); each update takes one step on "
                                  "its own --prompts of them, π_b fixed until the next sampling (S >= --iterations: "
                                  "offline).", min=1, max=VERSION_MAX)
    keep_policies: int | None = option(None, "Delete checkpoints nothing needs after each iteration, keeping v0, evaluated "
                                             "and the latest N. [default: keep all]", show_default=False,
                                       min=1, max=VERSION_MAX)
    generate: GenerateConfig = field(default=None)  # sampling settings (version is set per iteration)
    train: TrainConfig = field(default=None)  # objective and optimiser settings (version set per iteration)

def run(config: IterateConfig) -> dict:
    """Run the loop; returns the versions reached, the evaluations, per-iteration stage times and wall time.

    Every stage is the same function its command calls, exchanging Parquet shards through the run
    directory; only the models stay loaded between stages (`keep_loaded`), so one iteration reads no
    checkpoint it just wrote.
    """
    from roll.objectives import uses_reference
    from roll.pipeline import retention
    from roll.pipeline.prepare import prepare_update
    from roll.policy import keep_loaded
    from roll.progress import progress_bar
    from roll.sinks import Sinks
    from roll.stages import generate, score, train, verify
    from roll.store import Run, data_window

    gen, trn = stage_settings(config)
    needs_ref = uses_reference(trn.objective, trn)  # else score skips π_ref's forward
    started = time.perf_counter()
    evals, timings = [], []

    def maybe_evaluate(version: int) -> None:
        if config.eval_every and (version % config.eval_every == 0 or version == config.iterations):
            result = evaluation(config, gen, version)
            evals.append({"version": version, "pass@1": result["pass@1"],
                          f"pass@{result['k']}": result[f"pass@{result['k']}"]})
            if not result["skipped"]:  # a rerun finds it committed and drawn already
                sinks.log_version(version, steps=False)

    def train_and_log(update: TrainConfig) -> None:
        if not train.run(update).get("skipped"):
            sinks.log_version(update.version + 1, evals=False)

    # the sinks (--log-to) draw each update's steps and each evaluation once committed, from the tables
    with keep_loaded(), Sinks(Run(config.run), trn.log_to or (), config) as sinks, \
            progress_bar(f"iterate {trn.objective} lag {trn.lag}", config.iterations, "updates") as advance:
        maybe_evaluate(0)
        committed = Run(config.run).latest_policy_version()
        for version in range(config.iterations):
            if version + 1 < committed:  # done, evaluated and collected before: its checkpoints may be gone (gc)
                advance()
                continue
            update = update_settings(config, trn, version)
            lo, hi = data_window(version, update.lag, update.window)
            stages = {
                "generate": lambda: version % config.sample_every == 0 and generate.run(
                    replace(gen, run=config.run, version=version)),
                "verify": lambda: verify.run(verify.VerifyConfig(run=config.run, versions=tuple(range(lo, hi + 1)))),
                "score": lambda: score.run(score.ScoreConfig(run=config.run, versions=tuple(range(lo, hi + 1)),
                                                             device=trn.device, ref=needs_ref)),
                # apo's version-0 samples (verify and score above made the rest)
                "prepare": lambda: prepare_update(replace(update, run=config.run, version=version)),
                "train": lambda: train_and_log(replace(update, run=config.run, version=version)),
                "evaluate": lambda: maybe_evaluate(version + 1),
                "gc": lambda: config.keep_policies is not None and retention.run(retention.GcConfig(
                    run=config.run, keep=config.keep_policies, lag=trn.lag, window=trn.window)),
            }
            if version + 1 == committed:  # trained before a rerun; only its evaluation and gc may be missing
                stages = {name: stages[name] for name in ("evaluate", "gc")}
            seconds = {"version": version}
            for name, stage in stages.items():
                stage_started = time.perf_counter()
                stage()
                seconds[name] = round(time.perf_counter() - stage_started, 3)
            timings.append(seconds)
            advance()
    return {"run": str(config.run), "objective": trn.objective, "lag": trn.lag, "window": trn.window,
            "sync_interval": config.sync_interval, "sample_every": config.sample_every,
            "versions": config.iterations, "evaluations": evals, "stage_seconds": timings,
            "seconds": round(time.perf_counter() - started, 1)}


def stage_settings(config: IterateConfig) -> tuple[GenerateConfig, TrainConfig]:
    """generate's and train's settings for every iteration (the version is set per iteration); under a sync
    interval S, each version samples S × P prompts and its update takes S steps of P × G rows."""
    from roll.errors import RollError
    from roll.sinks import check_sinks

    check_ranges(config)
    gen = config.generate or GenerateConfig(run=config.run)
    trn = config.train or TrainConfig(run=config.run)
    check_config(gen)  # generate's settings, and that --backend vllm finds vLLM, before v0 is evaluated
    check_sinks(trn.log_to or ())  # and that --log-to's packages are installed
    if config.sample_every > 1 and (config.sync_interval > 1 or trn.lag > 0 or trn.window > 1):
        raise RollError(f"--sample-every {config.sample_every} sets each update's lag (v mod S) and data slice itself; "
                        f"drop --sync-interval, --lag and --window")
    if config.sync_interval > 1:  # S slices of P prompts (whole groups) per version, one optimiser step each
        trn = replace(trn, mini_batch=gen.prompts * gen.group_size)
        gen = replace(gen, prompts=gen.prompts * config.sync_interval)
    if config.sample_every > 1:  # S × P prompts per sampling, one step of P × G rows per version
        trn = replace(trn, mini_batch=gen.prompts * gen.group_size)
        gen = replace(gen, prompts=gen.prompts * config.sample_every)
    return gen, trn


def update_settings(config: IterateConfig, trn: TrainConfig, version: int) -> TrainConfig:
    """Update v → v+1's own settings: under --sample-every S it reads version S·⌊v/S⌋ (lag v mod S), slice
    v mod S of S; otherwise the loop's lag and window."""
    from roll.store import Shard

    if config.sample_every == 1:
        return trn
    offset = version % config.sample_every
    return replace(trn, lag=offset, window=1, data_slice=Shard(offset, config.sample_every))


def evaluation(config: IterateConfig, gen: GenerateConfig, version: int) -> dict:
    """Evaluate `version` with the run's sampling settings: evaluate's summary (pass@1, pass@k, skipped …)."""
    from roll.stages import evaluate

    return evaluate.run(evaluate.EvaluateConfig(
        run=config.run, version=version, k=config.eval_k, limit=config.eval_limit, temperature=gen.temperature,
        top_p=gen.top_p, max_new_tokens=gen.max_new_tokens, seed=gen.seed, device=gen.device))
