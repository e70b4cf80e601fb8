"""train: one update v → v+1 with the chosen objective on rollouts of a chosen staleness (DESIGN §2, §3.1).

    select   rows of behaviour versions [v − L − W + 1, v − L] (clamped at 0) through DuckDB
    check    every selected version verified and scored (else one line naming the command: `roll train`'s
             command line and `roll iterate` make them first, pipeline/prepare.py)
    advantage per group of G samples of one prompt, from the objective's registry entry
    optimise epochs × mini-batches of whole groups, gradient accumulation over micro-batches, AdamW resumed
             from the state committed with v (DESIGN §3.1a)
    commit   train/version=v+1/{steps,groups}.parquet, then policies/v(v+1)/ with its optimiser state
             (policy.json last)

Per step it records loss, token entropy of π_θ, KL(π_b‖π_θ) (k3), raw ratio min/mean/max, clip fraction,
ESS of the sequence weights e^Δ, grad norm, lr, tokens and wall time; per group the Lambert analysis of
its advantages at β (m, k, regime, entropies of the induced and Boltzmann targets) with its lag. π_θ
log-probs are computed at the temperature that produced each sample (no top-p, as verl and TRL do).
"""
from __future__ import annotations

import math
import random
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from roll import lora
from roll.errors import RollError
from roll.objectives import Objective, ObjectiveConfig, check_anchor, get_objective, uses_parent, uses_reference
from roll.options import (BATCH_MAX, COUNT_MAX, FLOAT32_MAX, VERSION_MAX, check_ranges, device_option, option, seed_option,
                          version_option)
from roll.store import Run, Shard, adapter_settings, data_window
from roll.window import Window

if TYPE_CHECKING:  # for an annotation only; the functions import numpy where they use it
    import numpy as np

MIN_TEMPERATURE = 1e-8  # the Lambert solve is checked down to β = 1e-8 (tests/test_lambert.py)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ObjectiveConfig):
    """An update's settings: the objective's own (β, β₁, s, clipping, KL weight: ObjectiveConfig, inherited, so
    the config itself is what the objective functions read) and the optimiser's, the data's and the process's."""
    run: Path  # run directory
    objective: str = option("stable-pess", "ppo, m2po, decoupled-ppo, cispo, pg, oapl, apo, pmd-mean or stable-pess.",
                            group="training")
    version: int | None = version_option("Policy version v to update. [default: the latest committed]")
    lag: int = option(0, "L: update v -> v+1 reads behaviour versions up to v - L.", group="training", min=0,
                      max=VERSION_MAX)
    window: int = option(1, "W: the number of behaviour versions read, ending at v - L.", group="training", min=1,
                         max=VERSION_MAX)
    data_slice: Shard = option(help="J/S: train on the J-th of S equal parts of the window's groups (a fixed shuffle by "
                                    "--seed), so S updates on one sampled version see disjoint prompts.",
                               factory=lambda: Shard(0, 1), group="training")
    lr: float = option(3e-4, "AdamW learning rate (after warm-up).", group="training", min=0, min_open=True,
                       max=FLOAT32_MAX)
    warmup_steps: int = option(0, "Linear learning-rate warm-up over the run's first N optimiser steps (0 = none, as TRL "
                                  "and verl).", group="training", min=0, max=COUNT_MAX)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (TRL's default 0).", group="training", min=0,
                                 max=FLOAT32_MAX)
    fresh_optimizer: bool = option(False, "A new AdamW every update (no state carried from the parent version).",
                                   group="training")
    drop_zero_variance: bool = option(False, "Leave out groups whose rewards are all equal (DAPO's dynamic sampling).",
                                      group="training")
    lora_rank: int = option(0, "Train LoRA adapters of this rank on v0's frozen weights through PEFT (0 = every "
                               "weight).", group="training", min=0, max=65536)
    lora_alpha: float = option(16.0, "LoRA scale numerator: the adapter adds (alpha/rank)·B·A (verl's and "
                                     "OpenRLHF's default 16).", group="training", min=0,
                                min_open=True, max=FLOAT32_MAX)
    gradient_checkpointing: bool = option(False, "Recompute transformer blocks' activations in backward (less memory, "
                                                 "more time).", group="training")
    epochs: int = option(1, "Passes over the selected rows per update.", group="training", min=1, max=10000)
    mini_batch: int = option(512, "Completions per optimiser step.", group="training", min=1, max=COUNT_MAX)
    micro_batch: int = option(64, "Completions per forward/backward (gradient accumulation).", group="training", min=1,
                              max=BATCH_MAX)
    grad_clip: float = option(1.0, "Max global gradient norm (0 = off).", group="training", min=0, max=FLOAT32_MAX)
    seed: int = seed_option("Random seed of the row shuffling.")
    device: str = device_option()
    fsdp: bool = option(False, "Under torchrun: shard weights, gradients and Adam state (FSDP2) instead of DDP.")
    force: bool = option(False, "Retrain version v+1 even if it exists (refused while anything was built on it or "
                                "drawn from it; see --prune-descendants).")
    log_to: tuple[str, ...] | None = option(None, "Also draw each step's metrics (and roll iterate's evaluations) in "
                                                  "these sinks, comma-separated: tensorboard, wandb, trackio; under "
                                                  "RUN/logs/. [default: none]", group="training", show_default=False)
    prune_descendants: bool = option(False, "With --force: first delete the versions built on v+1 and everything "
                                            "made with them or drawn from v+1 (rollouts, verdicts, scores, steps, "
                                            "groups, evals, ope files), listing each.")


def check_config(config: TrainConfig) -> None:
    check_ranges(config)  # each option's declared range (--grad-clip -1, --lr nan, ...), the objective's included
    check_anchor(config.objective, config)
    for name in ("beta", "beta1"):  # A/β must stay inside float64 for the soft value and the Lambert solve
        if getattr(config, name) < MIN_TEMPERATURE:
            raise RollError(f"--{name} {getattr(config, name)}: must be at least {MIN_TEMPERATURE:g} "
                            f"(A/β would leave float64's range in the Lambert diagnostics)")
    if config.lora_rank and config.fsdp:
        raise RollError("--lora-rank with --fsdp: LoRA trains under DDP (drop --fsdp); its adapters are small "
                        "enough not to need sharding")
    if config.adv_norm not in ("std", "none"):
        raise RollError(f"--adv-norm '{config.adv_norm}': choose std or none")


def load_rows(run: Run, lo: int, hi: int) -> Window:
    """Every sample of behaviour versions lo…hi with its reward and scores, checked complete and finite."""
    import pyarrow.compute as pc

    from roll.store import named_query_arrow

    table = named_query_arrow(run, "window_samples", versions=range(lo, hi + 1), lo=lo, hi=hi)
    incomplete = pc.or_(pc.is_null(table.column("reward")), pc.is_null(table.column("trainer_logprobs")))
    infinite = pc.invert(pc.is_finite(pc.fill_null(table.column("reward"), 0.0)))
    for bad, problem in ((incomplete, "has no verdict or score"), (infinite, "has reward {reward}; rewards must be finite")):
        if pc.any(bad).as_py():
            row = table.slice(pc.index(bad, True).as_py(), 1).to_pylist()[0]
            where = f"version {row['policy_version']}, prompt {row['prompt_id']}, sample {row['sample_index']}"
            raise RollError(f"{run.root}: {where} {problem.format(reward=row['reward'])}")
    return Window(table)


def steps_since(run: Run, data_version: int, version: int) -> int:
    """Optimiser steps taken from behaviour version `data_version` up to policy `version`."""
    from roll.store import named_query

    return named_query(run, "optimizer_steps_between", lo=data_version, hi=version)[0]["steps"]


def run(config: TrainConfig) -> dict:
    """Train v → v+1; returns a summary (version, rows, steps, loss, regimes, optimiser, seconds)."""
    from roll.distributed import Distributed

    check_config(config)
    config = with_shift(config)
    run_dir = Run(config.run)
    dist = Distributed.from_env(config.fsdp)
    # rank 0 decides which update to make and whether it is already made, and every rank follows it: ranks
    # reading the run on their own could pick different versions while another trainer commits
    version = dist.broadcast(run_dir.latest_policy_version() if config.version is None else config.version)
    new_version = version + 1
    # one update v → v+1 at a time (DESIGN §6): a second trainer waits for the first, then finds v+1 made
    with run_dir.lock(f"train-{new_version:04d}", f"update {version} -> {new_version}") if dist.is_main else nullcontext():
        made = dist.broadcast(new_version in run_dir.policy_versions() and not config.force)
        if made:
            dist.finish()
            return {"run": str(run_dir.root), "version": new_version, "skipped": True}
        if dist.is_main:
            refuse_remaking(run_dir, new_version, config)
        # the parent's checkpoint stays while it is read: `roll gc` waits for the update (DESIGN §6)
        with run_dir.policy_lock(version, shared=True) if dist.is_main else nullcontext():
            from roll.store import check_lineage

            check_lineage(run_dir.require_policy(version))  # an ancestor replaced by hand: before any work
            return update(run_dir, version, config, dist)


def refuse_remaking(run_dir: Run, new_version: int, config: TrainConfig) -> None:
    """Refuse to remake a version in place (--force) while versions built on its weights, or data drawn from
    them, exist: they would go on describing weights that are gone. --prune-descendants deletes them instead,
    just before the commit (`prune`)."""
    if new_version not in run_dir.policy_versions():
        return
    descendants = run_dir.descendants(new_version)
    drawn = sorted({p.relative_to(run_dir.root).parts[0] for p in run_dir.drawn_from(new_version)})
    if (descendants or drawn) and not config.prune_descendants:
        built = f"descendants {', '.join(f'v{v:04d}' for v in descendants)}" if descendants else "no descendants"
        raise RollError(f"{run_dir.root}: policy v{new_version:04d} has {built} and "
                        f"{'data drawn from it (' + ', '.join(drawn) + ')' if drawn else 'no data drawn from it'}; "
                        f"--force would leave them describing weights that no longer exist: add "
                        f"--prune-descendants to delete them, or train from the latest version")


def prune(run_dir: Run, new_version: int) -> list[str]:
    """Delete v+1's descendants (newest first: a version goes before its parent) with everything made from
    them, then the data drawn from v+1, each under its locks; say each path on stderr. Returns them."""
    removed = []
    while descendants := run_dir.descendants(new_version):
        removed += run_dir.remove_drawn_from(descendants[-1], whole=True)
    removed += run_dir.remove_drawn_from(new_version)
    listed = [str(p.relative_to(run_dir.root)) for p in removed]
    for path in listed:
        print(f"roll: --prune-descendants: deleted {path}", file=sys.stderr)
    return listed


def with_shift(config: TrainConfig) -> TrainConfig:
    """The config with the baseline shift the objective uses (its default unless --shift), so policy.json records
    the number, not "default"."""
    from dataclasses import replace

    default = getattr(get_objective(config.objective).advantage, "default_shift", None)
    return config if config.shift is not None or default is None else replace(config, shift=default)


def update(run_dir: Run, version: int, config: TrainConfig, dist) -> dict:
    """The update v → v+1 itself: select, per-group targets, optimise, commit (under the update's lock)."""
    import numpy as np

    from roll.policy import load_policy
    from roll.store import weights_digest

    new_version = version + 1
    parent_weights = weights_digest(run_dir.policy_dir(version)) if dist.is_main else None
    dtype = training_dtype(run_dir, version)
    check_update(run_dir, version, config, dist.device(config.device), dist.world)
    rows, data_versions = select_rows(run_dir, version, config, dist)
    started = time.perf_counter()

    model, tokenizer = load_policy(run_dir.policy_dir(version), dist.device(config.device), to_train=True)
    # LoRA (DESIGN §3.1c): `model` becomes the base with adapters injected; `adapter` is what is committed
    model, adapter = lora.adapt(model, config.lora_rank, config.lora_alpha, config.seed, dtype)
    # π_prox, the parent (the policy as the update starts), before any step moves it (DESIGN §2.2)
    parent = parent_anchor(model, rows, version, config, dtype) if uses_parent(config.objective, config) else None
    advantages, group_records = group_targets(run_dir, rows, version, config, dist, parent)
    if config.gradient_checkpointing:  # recompute each block's activations in backward: memory for time
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    wrapped = dist.wrap(model)  # before the optimiser: FSDP replaces the parameters by their shards
    optimizer, global_step, resumed = resume_optimizer(model, run_dir, version, config, dist)
    stale_base = {v: steps_since(run_dir, v, version) for v in data_versions}
    step_records, first_use = optimise(Update(wrapped, model, optimizer, rows, advantages, config,
                                              get_objective(config.objective), version, global_step, stale_base,
                                              dist, dtype, parent))
    check_finite(step_records, model, optimizer, version, dist)
    # when each group was first used, and how far π_θ had moved from π_b by then (records in rows.groups()' order)
    for record, members in zip(group_records, rows.groups().values(), strict=True):
        record["step"] = first_use[members[0]][0]
        record["optimizer_steps"] = stale_base[record["data_version"]] + record["step"]
        record["log_ratio_mean"] = float(np.mean([first_use[i][1] for i in members]))
    # collectives under FSDP: every rank takes part, rank 0 receives
    weights = dist.full_state_dict(model)
    optimizer_state = None if config.fresh_optimizer else {
        "optimizer": dist.optimizer_state(model, optimizer), "global_step": global_step + len(step_records),
        "schedule": {"kind": "constant with linear warm-up", "lr": config.lr, "warmup_steps": config.warmup_steps}}
    if not dist.is_main:  # only rank 0 commits; the others wait for it, then leave the process group
        dist.finish()
        return {"run": str(run_dir.root), "version": new_version, "rank": dist.rank}
    if weights is not None:  # FSDP: the sharded module cannot save itself; an unsharded copy can
        model, _ = load_policy(run_dir.policy_dir(version), "cpu", to_train=True)
        model.load_state_dict(weights)
    meta = {"version": new_version, "parent": version, "parent_weights": parent_weights, "objective": config.objective,
            "hyperparameters": {k: v for k, v in asdict(config).items()
                                if k not in ("run", "force", "prune_descendants", "device", "log_to")},
            "data_versions": data_versions, "data_window": list(data_window(version, config.lag, config.window)),
            "rows": len(rows), "optimizer_steps": len(step_records),
            # rows whose π_prox log-probs took a forward pass of the parent (0 where the parent sampled them all)
            "parent_forward_rows": parent.passes if parent is not None else 0,
            "global_step": global_step + len(step_records), "dtype": dtype,
            "optimizer": "fresh" if config.fresh_optimizer else (f"resumed from v{version:04d}" if resumed else "new")}
    if adapter is not None:
        meta["lora"] = lora.settings(adapter)
    pruned = prune(run_dir, new_version) if config.force and config.prune_descendants else []
    commit(run_dir, new_version, step_records, group_records, model if adapter is None else adapter, tokenizer, meta,
           optimizer_state, dtype if adapter is None else None)
    dist.finish()
    regimes = dict(Counter(g["regime"] for g in group_records))
    ks = [g["k"] for g in group_records if not math.isnan(g["k"])]
    return {"run": str(run_dir.root), "version": new_version, "skipped": False, "objective": config.objective,
            "data_versions": data_versions, "rows": len(rows), "groups": len(group_records),
            "steps": len(step_records), "global_step": meta["global_step"], "optimizer": meta["optimizer"],
            "loss": step_records[-1]["loss"], "regimes": regimes, "k_min": min(ks) if ks else None,
            "reward_mean": float(np.mean(rows.scalars["reward"])), "seconds": round(time.perf_counter() - started, 3),
            **({"pruned": pruned} if pruned else {})}


def check_update(run_dir: Run, version: int, config: TrainConfig, device: str, world: int) -> None:
    """Refuse, before any work (pipeline/prepare.py calls it before it verifies or scores), an update whose
    parent's ancestors were replaced by hand, whose parent is stored in float16, that cannot continue its
    parent's LoRA settings, or whose lag window would not fit in memory."""
    from roll.memory import check_training
    from roll.store import check_lineage

    parent = run_dir.require_policy(version)
    check_lineage(parent)
    training_dtype(run_dir, version)
    lora.check(parent, version, adapter_settings(parent), config.lora_rank, config.lora_alpha)
    lo, hi = data_window(version, config.lag, config.window)
    check_training(parent, device, [path for v in range(lo, hi + 1) for path in run_dir.files("rollouts", v).values()],
                   micro_batch=config.micro_batch, lora=config.lora_rank > 0,
                   checkpointing=config.gradient_checkpointing, world=world, sharded=config.fsdp)


def select_rows(run_dir: Run, version: int, config: TrainConfig, dist) -> tuple[Window, list[int]]:
    """The lag window's samples with rewards and trainer log-probs (verified and scored first where missing).

    A window that reaches before version 0 is clamped at 0, and said in one line: update v → v+1 then reads
    data of a smaller lag than asked for, which policy.json records as `data_versions`.
    """
    lo, hi = data_window(version, config.lag, config.window)
    if version - config.lag - config.window + 1 < 0 and dist.is_main:
        asked = f"[{version - config.lag - config.window + 1}, {version - config.lag}]"
        print(f"roll: the lag window {asked} of update {version} -> {version + 1} reaches before version 0; "
              f"reading [{lo}, {hi}] (lag {version - hi})", file=sys.stderr)
    data_versions = [v for v in run_dir.versions("rollouts") if lo <= v <= hi]
    if not data_versions:
        raise RollError(f"{run_dir.root}: the lag window [{lo}, {hi}] of update {version} -> {version + 1} holds no "
                        f"rollouts (have versions: {', '.join(map(str, run_dir.versions('rollouts'))) or 'none'}; "
                        f"run `roll generate --version {hi}`)")
    check_prepared(run_dir, data_versions, config)
    rows = take_slice(load_rows(run_dir, lo, hi), config)
    check_same_rows(rows, version, dist)
    return check_groups(rows, config, dist), data_versions


def check_same_rows(rows: Window, version: int, dist) -> None:
    """Every rank reads the window itself (from a run directory that, across machines, each node mounts): refuse,
    on every rank at once, an update whose ranks read different rows — a shard committed between their reads,
    or a node that sees another directory or a stale cache of it — rather than train each rank on other data."""
    import hashlib

    if not dist.active:
        return
    mine = hashlib.sha256(repr([rows.scalars[k] for k in ("policy_version", "prompt_id", "sample_index", "reward")])
                          .encode()).hexdigest()
    if not dist.all_true(dist.broadcast(mine) == mine):
        raise RollError(f"the ranks of update {version} -> {version + 1} read different rows of its window (rank "
                        f"{dist.rank}: {len(rows)} rows): is the run directory one shared file system every node sees, "
                        "and was nothing committed into the window while training started?")


def check_prepared(run_dir: Run, data_versions: list[int], config: TrainConfig) -> None:
    """Refuse, in one line naming the command, a window with versions not verified or not scored (or scored
    without the π_ref log-probs the objective reads): train only trains. `roll train` and `roll iterate` make
    them first (pipeline/prepare.py)."""
    from roll.store import named_query

    def flags(versions) -> str:
        return " ".join(f"--version {v}" for v in versions)

    for table, stage in (("verdicts", "verify"), ("scores", "score")):
        todo = run_dir.versions_pending(table, data_versions)
        if todo:
            raise RollError(f"{run_dir.root}: version(s) {', '.join(map(str, todo))} of the lag window have no {table}; "
                            f"run `roll {stage} {flags(todo)}` first (the `roll train` command does)")
    if uses_reference(config.objective, config):
        lacking = [r["policy_version"] for r in named_query(run_dir, "versions_without_ref", versions=data_versions)]
        if lacking:
            raise RollError(f"{run_dir.root}: {config.objective} reads π_ref and the scores of version(s) "
                            f"{', '.join(map(str, lacking))} have none; run `roll score {flags(lacking)} --ref --force` "
                            f"first (the `roll train` command does)")


def take_slice(rows: Window, config: TrainConfig) -> Window:
    """The J-th of S parts of the window's groups (--data-slice J/S): whole groups in a shuffle fixed by the seed
    and the window, cut into S near-equal consecutive parts, so S updates with J = 0 … S−1 partition them."""
    import numpy as np

    part = config.data_slice
    if part.count == 1:
        return rows
    groups = sorted(rows.groups().items())
    random.Random(f"{config.seed}/slice/{groups[0][0][0]}").shuffle(groups)
    if len(groups) < part.count:
        raise RollError(f"--data-slice {part}: the window holds only {len(groups)} groups")
    mine = np.array_split(np.arange(len(groups)), part.count)[part.index]
    return rows.take(sorted(i for g in mine for i in groups[g][1]))


@dataclass
class ParentAnchor:
    """π_prox, the parent version, on the update's rows: its per-token log-probs and the parent anchor's sequence
    weights min(π_prox/π_b, C), normalised to mean 1 within each group (DESIGN §2.2)."""

    logprobs: list  # per row, a float32 array of log π_prox per completion token
    weights: "np.ndarray"  # (rows,) float64
    passes: int  # rows whose log-probs needed a forward pass (their behaviour version is not the parent)


def parent_anchor(model, rows: Window, version: int, config: TrainConfig, dtype: str) -> ParentAnchor:
    """log π_prox on every row: the stored trainer log-probs where the parent sampled the row (no pass: it is the
    behaviour policy), else one no-grad forward pass of the parent in micro-batches, under training numerics."""
    import numpy as np
    import torch

    logprobs = [None] * len(rows)
    stale = []
    for i in range(len(rows)):
        if rows.scalars["policy_version"][i] == version:
            logprobs[i] = np.asarray(rows[i]["trainer_logprobs"], dtype=np.float32)
        else:
            stale.append(i)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for micro in micro_batches_of(stale, rows, config.micro_batch):
            values, mask = policy_logprobs(model, [rows[i] for i in micro], dtype)
            for row, lp, m in zip(micro, values.float().cpu().numpy(), mask.cpu().numpy()):
                logprobs[row] = lp[m]
    model.train(was_training)
    log_w = np.array([float(np.sum(logprobs[i], dtype=np.float64) - np.sum(rows[i]["trainer_logprobs"], dtype=np.float64))
                      for i in range(len(rows))])
    capped = np.minimum(log_w, math.log(config.weight_cap))  # truncation, in log space (e^Δ may overflow)
    weights = np.ones(len(rows))
    for members in rows.groups().values():
        w = np.exp(capped[members] - capped[members].max())
        weights[members] = w * len(members) / w.sum()
    return ParentAnchor(logprobs, weights, len(stale))


def check_groups(rows: Window, config: TrainConfig, dist) -> Window:
    """Say, in one line, what share of the groups has one sample or no reward spread and what the objective
    does with them; with `drop_zero_variance`, leave them out (DAPO's dynamic sampling filter)."""
    import numpy as np

    groups = rows.groups()
    rewards = rows.scalars["reward"]
    flat = [members for members in groups.values() if len(members) < 2 or len({rewards[i] for i in members}) == 1]
    if flat and dist.is_main:
        singles = sum(1 for members in flat if len(members) < 2)
        what = f"{len(flat)} of {len(groups)} groups ({100 * len(flat) / len(groups):.0f}%)"
        kind = f"have one sample ({singles}) or no reward spread" if singles else "have no reward spread"
        action = "left out (--drop-zero-variance)" if config.drop_zero_variance else f"{config.objective}: {get_objective(config.objective).flat_group}"
        print(f"roll: {what} {kind}; {action}", file=sys.stderr)
    if not config.drop_zero_variance or not flat:
        return rows
    keep = np.ones(len(rows), bool)
    for members in flat:
        keep[members] = False
    if not keep.any():
        raise RollError("every group of the lag window has one sample or no reward spread; nothing left to train "
                        "on with --drop-zero-variance")
    return rows.take(np.flatnonzero(keep))


def group_targets(run_dir: Run, rows: Window, version: int, config: TrainConfig, dist, parent=None) -> tuple:
    """Per group (one prompt's samples from one behaviour version): the objective's advantages and the
    Lambert analysis of the target they induce at β (DESIGN §2.1), relative to the objective's anchor: with
    --anchor parent, over the group's samples weighted by their π_prox/π_b (the parent's measure). Returns
    (advantages per row, records)."""
    import torch

    from roll import lambert

    objective = get_objective(config.objective)
    ref_values = reference_values(run_dir, rows, config) if objective.value == "version0" else {}
    advantages = torch.zeros(len(rows), dtype=torch.float64)
    records = []
    for (data_version, prompt_id), members in rows.groups().items():
        rewards = torch.tensor([rows.scalars["reward"][i] for i in members], dtype=torch.float64)
        weights = parent.weights[members] if parent is not None and objective.regression else None
        adv = objective.advantage(rewards, config, ref_values.get(prompt_id),
                                  None if weights is None else torch.as_tensor(weights))
        advantages[members] = adv
        target = lambert.solve(adv.numpy(), config.beta, weights) if objective.regression else None
        records.append({
            "policy_version": version + 1, "data_version": data_version, "lag": version - data_version,
            "prompt_id": prompt_id, "objective": config.objective, "beta": config.beta,
            "m": target.m if target else math.nan, "k": target.k if target else math.nan,
            "regime": target.regime if target else "n/a",
            "induced_entropy": target.induced_entropy if target else math.nan,
            "boltzmann_entropy": target.boltzmann_entropy if target else math.nan,
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False)),
        })
    return advantages, records


def check_finite(step_records: list[dict], model, optimizer, version: int, dist) -> None:
    """Refuse to commit an update whose loss, weights or AdamW state are not all finite (DESIGN §6)."""
    import torch

    def local(tensor):  # an FSDP parameter or state is a DTensor: check this rank's shard
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    problem = None
    for record in step_records:
        if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
            problem = f"the loss is {record['loss']} and the gradient norm {record['grad_norm']} at step {record['step']}"
            break
    probe_ok = dist.all_true(step_records[-1].pop("probe_finite"))
    if problem is None and not probe_ok:
        problem = "the updated policy's log-probs are not finite"
    weights_ok = all(bool(torch.isfinite(local(p)).all()) for p in model.parameters())
    state_ok = all(bool(torch.isfinite(local(value)).all()) for state in optimizer.state.values()
                   for value in state.values() if torch.is_tensor(value))
    weights_ok, state_ok = dist.all_true(weights_ok), dist.all_true(state_ok)
    if problem is None and not weights_ok:
        problem = "the updated weights hold non-finite values"
    if problem is None and not state_ok:
        problem = "the AdamW state holds non-finite values"
    if problem:
        dist.finish()
        raise RollError(f"update {version} -> {version + 1}: {problem}; nothing committed "
                        f"(check the rewards, or lower --lr)")


def training_dtype(run_dir: Run, version: int) -> str:
    """The dtype policy `version` is stored in, which v+1 keeps (DESIGN §3.1b). float32 trains as it always
    did; bfloat16 trains float32 master weights under bf16 autocast — as TRL's and the HF Trainer's `bf16=True`
    do — and commits bf16 weights with the float32 masters beside them. float16 is refused: without loss
    scaling its gradients underflow, and roll does not scale losses."""
    from roll.store import checkpoint_dtype

    dtype = checkpoint_dtype(run_dir.policy_dir(version))
    if dtype == "float16":
        raise RollError(f"{run_dir.policy_dir(version)}: float16 weights; roll trains float32 or bfloat16 "
                        f"(float16 would need loss scaling). Create the run with roll init --dtype bfloat16")
    return dtype


def autocast(device, dtype: str):
    """bf16 autocast of the forward pass for a bf16 policy (weights stay float32); nothing for float32."""
    import torch

    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def learning_rate(config: TrainConfig, global_step: int) -> float:
    """Constant, after a linear warm-up over the run's first `warmup_steps` optimiser steps: step t (counted
    over the whole run, from 0) uses lr·(t+1)/(W+1) while t < W, so no step is taken at rate zero."""
    if global_step < config.warmup_steps:
        return config.lr * (global_step + 1) / (config.warmup_steps + 1)
    return config.lr


def resume_optimizer(model, run_dir: Run, version: int, config: TrainConfig, dist):
    """AdamW over `model`'s parameters, resuming the state committed with policy `version` (its moments,
    step counts and the run's global optimiser step, DESIGN §3.1a). Returns (optimizer, global step, resumed).

    A parent without state (v0, or one made with --fresh-optimizer) starts a new AdamW; so does
    --fresh-optimizer, which takes every update as Adam's first step (roll's behaviour before state was kept).
    The global step then comes from the steps table, so the warm-up schedule continues either way.
    """
    import torch

    from roll.store import load_optimizer_state

    # no stale .grad (a model kept loaded by roll iterate has last update's): torch's loader initialises the
    # optimiser's state with one zero-gradient step, and skips that when gradients exist
    model.zero_grad(set_to_none=True)
    trained = [p for p in model.parameters() if p.requires_grad]  # all of them, or a LoRA run's adapters
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    state = None if config.fresh_optimizer else load_optimizer_state(run_dir.policy_dir(version))
    if state is None:
        if version > 0 and not config.fresh_optimizer and dist.is_main:
            print(f"roll: policy v{version:04d} has no optimiser state; starting a new AdamW", file=sys.stderr)
        return optimizer, steps_since(run_dir, 0, version), False
    dist.load_optimizer_state(model, optimizer, state["optimizer"])
    for group in optimizer.param_groups:  # this update's settings, not the saved ones
        group["weight_decay"] = config.weight_decay
    return optimizer, int(state["global_step"]), True


def mini_batches(groups: list[list[int]], size: int, rng: random.Random) -> list[list[int]]:
    """Whole groups in a shuffled order, packed into mini-batches of at most `size` rows (at least one group
    each): a step sees disjoint prompts, as verl counts its mini-batches in prompts."""
    order = list(groups)
    rng.shuffle(order)
    batches, current = [], []
    for members in order:
        if current and len(current) + len(members) > size:
            batches.append(current)
            current = []
        current = current + members
    return batches + ([current] if current else [])


def micro_batches_of(mine: list[int], rows: Window, size: int) -> list[list[int]]:
    """This rank's rows of a step in micro-batches of at most `size`, shortest first, so each pads to a similar
    length (length bucketing: a step's gradient is the same sum over the same rows, with far less padding).
    The row index breaks ties, so the same rows always make the same micro-batches whatever order they were
    drawn in."""
    mine = sorted(mine, key=lambda i: (rows.length("token_ids", i), rows.length("prompt_token_ids", i), i))
    return [mine[j:j + size] for j in range(0, len(mine), size)]


def row_temperatures(batch_rows) -> float | list[float]:
    """The temperature π_θ's log-probs are computed at: the one that produced each row (a lag window can hold
    versions sampled at different temperatures), one number when the micro-batch shares it."""
    temperatures = [r["temperature"] for r in batch_rows]
    return temperatures[0] if len(set(temperatures)) == 1 else temperatures


@dataclass
class Update:
    """What every optimiser step of the update v → v+1 reads."""

    wrapped: object  # the model as it runs forward: itself, or its DDP/FSDP wrapper
    model: object  # the module whose parameters the optimiser steps
    optimizer: object
    rows: Window
    advantages: object  # (rows,) tensor: each row's target advantage
    config: TrainConfig
    objective: Objective  # looked up once, here
    version: int  # v, the policy the update starts from
    global_step: int  # optimiser steps taken before this update (the learning-rate schedule's clock)
    stale_base: dict[int, int]  # behaviour version → optimiser steps between it and v
    dist: object  # roll.distributed's process group (one process: world 1)
    dtype: str  # the training autocast dtype
    parent: ParentAnchor | None  # π_prox on the rows, where the objective reads it


@dataclass
class StepTotals:
    """One optimiser step's diagnostics, summed over its micro-batches (and, reduced, over ranks)."""

    loss: float = 0.0  # the loss, each micro-batch weighted by its share of the mini-batch
    entropy: float = 0.0  # Σ over tokens of π_θ's entropy
    kl: float = 0.0  # Σ k3 = ρ − 1 − log ρ, the estimator of KL(π_b‖π_θ)
    clipped: float = 0.0  # tokens the objective clipped or masked
    ratio: float = 0.0  # Σ ρ
    tokens: float = 0.0
    log_ratio_sq: float = 0.0  # Σ (log ρ)²
    ratio_max: float = -math.inf
    ratio_min: float = math.inf
    deltas: list = field(default_factory=list)  # (row, signed sequence log-ratio Δ)

    SUMS = ("loss", "entropy", "kl", "clipped", "ratio", "tokens", "log_ratio_sq")

    def add(self, other: "StepTotals") -> None:
        for name in self.SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.ratio_max, self.ratio_min = max(self.ratio_max, other.ratio_max), min(self.ratio_min, other.ratio_min)
        self.deltas += other.deltas

    def reduced(self, dist) -> "StepTotals":
        """Summed over ranks (extremes: the max and min over ranks; Δs: every rank's)."""
        import torch

        sums = torch.tensor([getattr(self, name) for name in self.SUMS], dtype=torch.float64)
        extremes = torch.tensor([-self.ratio_max, self.ratio_min], dtype=torch.float64)  # a min-reduction of both
        sums, extremes, deltas = dist.reduce_metrics(sums, extremes, self.deltas)
        return StepTotals(**dict(zip(self.SUMS, sums.tolist())), ratio_max=-float(extremes[0]),
                          ratio_min=float(extremes[1]), deltas=deltas)


def optimise(update: Update) -> tuple[list[dict], dict]:
    """epochs × mini-batches of optimiser steps. Returns one metrics record per step (reduced over ranks) and,
    per row, (the step that first used it, its signed sequence log-ratio Δ then).

    Under torchrun each rank takes every world-th row of each mini-batch; gradients are summed across
    ranks by DDP (whose mean is undone by scaling the loss by world size), so P ranks take exactly the
    step one process would take on the same global mini-batch.
    """
    import torch

    from roll.progress import progress_bar

    config, dist, rows = update.config, update.dist, update.rows
    update.model.train()
    torch.manual_seed(config.seed)
    groups = list(rows.groups().values())
    schedule = [mini_batches(groups, config.mini_batch, random.Random(f"{config.seed}/{update.version}/{epoch}"))
                for epoch in range(config.epochs)]
    smallest = min(len(batch) for epoch in schedule for batch in epoch)
    if smallest < dist.world:  # every rank must take part in every step's collectives
        raise RollError(f"a mini-batch of {smallest} rows cannot feed {dist.world} ranks; raise --mini-batch or "
                        f"use fewer processes")
    records, first_use = [], {}
    title = f"train v{update.version}->v{update.version + 1} {config.objective}"
    with progress_bar(title, sum(map(len, schedule)), "steps") as advance:
        for mini in (batch for epoch in schedule for batch in epoch):
            step_started = time.perf_counter()
            lr = learning_rate(config, update.global_step + len(records))
            for group in update.optimizer.param_groups:
                group["lr"] = lr
            mini_tokens = sum(rows.length("token_ids", i) for i in mini)  # global: every rank knows all rows
            micro_batches = micro_batches_of(mini[dist.rank::dist.world], rows, config.micro_batch)
            update.optimizer.zero_grad(set_to_none=True)
            totals = StepTotals()
            for index, micro in enumerate(micro_batches):
                with dist.sync_if(index == len(micro_batches) - 1, update.wrapped):
                    totals.add(accumulate(update, micro, mini, mini_tokens))
            grad_norm = torch.nn.utils.clip_grad_norm_(update.model.parameters(),
                                                       config.grad_clip if config.grad_clip > 0 else math.inf)
            update.optimizer.step()
            totals = totals.reduced(dist)
            for row, delta in totals.deltas:
                first_use.setdefault(row, (len(records), delta))
            records.append(step_record(update, mini, mini_tokens, totals, len(records), float(grad_norm), lr,
                                       step_started))
            advance()
    update.optimizer.zero_grad(set_to_none=True)  # the gradients' memory, before the commit
    # the updated policy on the last step's first micro-batch: finite weights can still give NaN log-probs
    # (weights of 1e30 after --lr 1e30). Not under FSDP: a forward after the last step left FSDP2's gathered
    # parameters unfinished at exit ("terminate called without an active exception", seen twice in 2-rank
    # CPU runs under load); there the finite weights and AdamW state are what is checked.
    records[-1]["probe_finite"] = True if dist.fsdp else probe_finite(update.wrapped, rows, micro_batches[0],
                                                                      update.dtype)
    return records, first_use


def accumulate(update: Update, micro: list[int], mini: list[int], mini_tokens: int) -> StepTotals:
    """Forward and backward of one micro-batch, its loss weighted by its share of the mini-batch `mini` (of its
    `mini_tokens` tokens or of its sequences, as the objective reduces) and by the world size. Returns its
    diagnostics."""
    import torch

    from roll.objectives import Batch

    parent = update.parent
    batch_rows = [update.rows[i] for i in micro]
    logprobs, mask, entropy = policy_logprobs(update.wrapped, batch_rows, update.dtype, with_entropy=True)
    batch = Batch(logprobs=logprobs, behaviour_logprobs=padded([r["trainer_logprobs"] for r in batch_rows], mask),
                  ref_logprobs=padded([r["ref_logprobs"] for r in batch_rows], mask), mask=mask,
                  advantages=update.advantages[micro].to(device=mask.device, dtype=logprobs.dtype))
    if parent is not None:
        batch.parent_logprobs = padded([parent.logprobs[i] for i in micro], mask)
        batch.sequence_weights = torch.as_tensor(parent.weights[micro], device=mask.device, dtype=logprobs.dtype)
    loss, metrics = update.objective.loss(batch, update.config)
    tokens = int(mask.sum())
    share = tokens / mini_tokens if update.objective.reduction == "token" else len(micro) / len(mini)
    (loss * share * update.dist.world).backward()
    with torch.no_grad():  # diagnostics of this micro-batch, token-weighted
        log_ratio = (logprobs - batch.behaviour_logprobs)[mask]
        ratio = log_ratio.exp()
        return StepTotals(loss=loss.item() * share, entropy=float(entropy[mask].sum()),
                          kl=float((ratio - 1 - log_ratio).sum()), clipped=metrics["clip_fraction"] * tokens,
                          ratio=float(ratio.sum()), tokens=tokens, log_ratio_sq=float((log_ratio ** 2).sum()),
                          ratio_max=float(ratio.max()), ratio_min=float(ratio.min()),
                          deltas=list(zip(micro, ((logprobs - batch.behaviour_logprobs) * mask).sum(-1).tolist())))


def step_record(update: Update, mini: list[int], mini_tokens: int, totals: StepTotals, step: int, grad_norm: float,
                lr: float, started: float) -> dict:
    """One `steps` row from a step's reduced diagnostics (token means over the whole mini-batch: rows `mini`,
    `mini_tokens` tokens)."""
    import numpy as np

    version = update.version
    behaviour_versions = update.rows.scalars["policy_version"]
    log_weights = np.array([delta for _, delta in totals.deltas])
    w = np.exp(log_weights - log_weights.max())
    return {
        "policy_version": version + 1, "step": step, "objective": update.config.objective,
        "loss": totals.loss, "entropy": totals.entropy / mini_tokens,
        "kl_behaviour": totals.kl / mini_tokens, "clip_fraction": totals.clipped / mini_tokens,
        "ess": float(w.sum() ** 2 / (w ** 2).sum() / len(w)), "grad_norm": grad_norm,
        "lr": lr, "tokens": mini_tokens, "seconds": time.perf_counter() - started,
        "ratio_min": totals.ratio_min, "ratio_mean": totals.ratio / mini_tokens,
        "ratio_max": totals.ratio_max, "global_step": update.global_step + step,
        "log_ratio_mean": float(log_weights.mean()),
        "log_ratio_sq_mean": totals.log_ratio_sq / mini_tokens,
        "lag_mean": float(np.mean([version - behaviour_versions[i] for i in mini])),
        "stale_steps_mean": float(np.mean([update.stale_base[behaviour_versions[i]] for i in mini])) + step,
    }


def probe_finite(wrapped, rows: Window, micro: list[int], dtype: str) -> bool:
    """Whether the updated policy's log-probs on one micro-batch are all finite."""
    import torch

    with torch.no_grad():
        logprobs, mask = policy_logprobs(wrapped, [rows[i] for i in micro], dtype)
    return bool(torch.isfinite(logprobs[mask]).all())


def policy_logprobs(wrapped, batch_rows: list[dict], dtype: str, with_entropy: bool = False):
    """The policy's log-probs of the rows' completions (at each row's sampling temperature) under the run's
    autocast: (log-probs, mask) or, with entropy, (log-probs, mask, entropy)."""
    from roll.sampling import completion_logprobs

    with autocast(next(wrapped.parameters()).device, dtype):
        return completion_logprobs(wrapped, [r["prompt_token_ids"] for r in batch_rows],
                                   [r["token_ids"] for r in batch_rows], row_temperatures(batch_rows), 1.0,
                                   with_entropy=with_entropy)


def commit(run_dir: Run, new_version: int, step_records: list[dict], group_records: list[dict], model, tokenizer,
           meta: dict, optimizer_state: dict | None, dtype: str = "float32") -> None:
    """train/version=v+1/{steps,groups}, then the checkpoint with its optimiser state (policy.json last, the
    commit point: readers see the tables only once the policy is committed).

    Over a committed version (--force) the tables are written to hidden temporaries and renamed into place only
    after the checkpoint commits: a failed update leaves the version's weights and metrics as they were, never
    the old weights with the failed attempt's steps."""
    import os

    import pyarrow as pa

    from roll.policy import save_policy
    from roll.store import SCHEMAS, os_error, write_table

    tables = {"steps": step_records, "groups": group_records}
    replacing = new_version in run_dir.policy_versions()
    staged = {}
    try:
        for name, records in tables.items():
            staged[name] = write_table(run_dir.train_path(name, new_version), name,
                                       pa.Table.from_pylist(records, schema=SCHEMAS[name]), staged=replacing)
        save_policy(model, tokenizer, run_dir.policy_dir(new_version), meta, optimizer_state, dtype)
    except BaseException:
        # readers ignore tables of an uncommitted version (Run.committed_files); remove them all the same
        if replacing or new_version not in run_dir.policy_versions():
            for path in staged.values():
                path.unlink(missing_ok=True)
        raise
    for name in tables if replacing else ():
        try:
            os.replace(staged[name], run_dir.train_path(name, new_version))
        except OSError as exc:
            raise os_error(exc, run_dir.train_path(name, new_version), "the checkpoint was committed") from None


def padded(lists: list[list[float]], mask):
    """(B, T) tensor of per-token values aligned with `mask`'s completion tokens."""
    import torch

    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    for row, values in enumerate(lists):
        if values is None:  # π_ref log-probs of a version scored --no-ref: read by no objective that got here
            continue
        out[row, : len(values)] = torch.tensor(values, dtype=torch.float32)  # a copy: Arrow buffers are read-only
    return out


def version0_rewards(run: Run, rows: Window) -> tuple[list[dict], list[str]]:
    """The version-0 (prompt_id, reward) records of the prompts in `rows`, and the prompt ids that have none."""
    from roll.store import named_query

    prompt_ids = sorted(set(rows.scalars["prompt_id"]))
    found = named_query(run, "version0_rewards", prompt_ids=prompt_ids)
    return found, sorted(set(prompt_ids) - {record["prompt_id"] for record in found})


def reference_values(run: Run, rows: Window, config: TrainConfig) -> dict[str, float]:
    """V* per prompt for an objective whose value comes from version 0 (the registry's `value`, apo's):
    β₁·log mean e^{r/β₁} over the prompt's version-0 samples.

    Prompts of later versions have no version-0 samples of their own: `roll train` and `roll iterate` generate
    them first (pipeline/prepare.py: from v0, with the same sampler settings and group size, stored as
    version-0 rollouts in file extra-apo-vNNNN, verified and scored like any other, reused by later updates).
    """
    import torch

    from roll.objectives import soft_value

    found, missing = version0_rewards(run, rows)
    if missing:
        raise RollError(f"{run.root}: {config.objective} needs version-0 samples of {len(missing)} prompt(s) of the "
                        f"window ({missing[0]}, ...); the `roll train` command samples them before the update")
    rewards: dict[str, list[float]] = {}
    for record in found:
        rewards.setdefault(record["prompt_id"], []).append(record["reward"])
    return {pid: float(soft_value(torch.tensor(r, dtype=torch.float64), config.beta1)) for pid, r in rewards.items()}
