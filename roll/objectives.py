"""Training objectives (DESIGN §2.2): pure functions of tensors, in one registry, dispatched in one place.

Each objective is an advantage (per sequence, computed per group of G samples of one prompt) and a loss
over a batch of completions. Notation: ρ_t = π_θ(y_t|·)/π_b(y_t|·) per token, Δ_i = Σ_t log ρ_t per sequence
(against π_ref for apo), Â/A the advantage, "token-mean" the mean over every completion token of the batch.

    ppo          −token-mean min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â)  [+ c·token-mean k3 of KL(π_θ‖π_ref)]
    cispo        −token-mean sg(min(ρ, 1+ε_high))·Â·log π_θ           [+ c·token-mean k3]
    pg           −token-mean Â·log π_θ                                 [+ c·token-mean k3]
    m2po           −token-mean M·ρ·Â, M masks the tokens of largest (log ρ)² until the kept ones' mean ≤ τ
    decoupled-ppo  −token-mean w·min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â),  r = π_θ/π_prox, w = sg(π_prox/π_b) ≤ C
    oapl           mean (β·Δ − (r − β₁·log mean e^{r/β₁} + s·β))²                          (s = 0 by default)
    apo            mean (β·Δ_ref − (r − V* + s·β))²,  V* = β₁·log mean e^{r₀/β₁} over version-0 samples
    pmd-mean       mean (β·Δ − (r − mean r + s·β))²                                         (s = 0 by default)
    stable-pess    mean (β·Δ − (r − mean r + s·β))²                                         (s = 1 by default)

The four regression objectives share `regression_loss` and differ only in their advantage (and apo in its
anchor). Why the baseline matters: the regression optimum is the Lambert-tempered target of roll.lambert,
pessimistic iff the baseline lies below V_β = β·log E[e^{r/β}]; a +s·β shift guarantees k ≥ s (stable-pess's
default, any regression objective's with --shift). With `--anchor parent` (oapl, pmd-mean, stable-pess) Δ is
measured against π_prox, the policy the update starts from, and each sequence's square is weighted by the
self-normalised, truncated π_prox/π_b of its group, so the regression is an expectation under π_prox (DESIGN §2.2).
π_prox is the parent version: its log-probs come from one no-grad pass at the start of the update, or are π_b's
own where the parent sampled the row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from roll.options import FLOAT32_MAX, option

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI reads ObjectiveConfig without loading it
    import torch


@dataclass(frozen=True)
class ObjectiveConfig:
    beta: float = option(0.1, "β: KL temperature of the regression objectives and the Lambert diagnostics.", group="training",
                         min=0, min_open=True, max=FLOAT32_MAX)
    beta1: float = option(0.2, "β₁: temperature of the soft value in oapl and V* in apo.", group="training", min=0,
                          min_open=True, max=FLOAT32_MAX)
    shift: float | None = option(None, "s: baseline shift of the regression objectives, in units of β (A = r − b + s·β). "
                                       "[default: 1 for stable-pess, 0 for the others]", group="training",
                                 show_default=False, min=-FLOAT32_MAX, max=FLOAT32_MAX)
    anchor: str = option("behaviour", "What the regression objectives' Δ is measured against: behaviour (π_b, the "
                                      "checkpoint that sampled the row) or parent (π_prox, the version the update "
                                      "starts from, with self-normalised π_prox/π_b weights).",
                         choices=("behaviour", "parent"), group="training")
    m2_budget: float = option(0.04, "m2po: τ, the largest mean (log ρ)² of the kept tokens (M2PO's default).",
                              group="training", min=0, min_open=True, max=FLOAT32_MAX)
    weight_cap: float = option(5.0, "C for π_prox/π_b weights: decoupled-ppo drops tokens above it (AReaL's "
                                    "behav_imp_weight_cap); the parent anchor truncates sequence weights at it.",
                               group="training", min=1, max=FLOAT32_MAX)
    clip_low: float = option(0.2, "PPO ε_low: ratios below 1 − ε_low are clipped.", group="training", min=0, max=1)
    clip_high: float = option(0.2, "PPO ε_high (and the CISPO weight cap 1 + ε_high).", group="training", min=0,
                              max=FLOAT32_MAX)
    kl_ref: float = option(0.0, "Weight of the k3 KL-to-π_ref term (ppo, cispo, pg).", group="training", min=0,
                           max=FLOAT32_MAX)
    adv_norm: str = option("std", "ppo/cispo advantage normalisation: std, (r − mean)/(std + 1e-6), or none, r − mean.",
                           choices=("std", "none"), group="training")


@dataclass
class Batch:
    """Tensors of one micro-batch of B completions padded to T tokens."""

    logprobs: torch.Tensor  # (B, T) log π_θ of each completion token (carries the gradient)
    behaviour_logprobs: torch.Tensor  # (B, T) log π_b (the behaviour checkpoint, training numerics)
    ref_logprobs: torch.Tensor  # (B, T) log π_ref
    mask: torch.Tensor  # (B, T) bool, True on completion tokens
    advantages: torch.Tensor  # (B,) per-sequence advantage
    # (B, T) log π_prox, the parent version's log-probs (= behaviour_logprobs where the parent sampled the row)
    parent_logprobs: torch.Tensor | None = None
    # (B,) the parent anchor's sequence weights: min(π_prox/π_b, C) normalised to mean 1 over each group
    sequence_weights: torch.Tensor | None = None


# ------------------------------------------------------------------------------------------- advantages
# Each takes a group's rewards (G,) and returns its advantages (G,). `ref_value` is apo's V*. `weights` (G,), when
# given, is the measure the regression is an expectation under (the parent anchor's π_prox/π_b, mean 1): the
# baselines of the regression objectives are taken under it, so the Lambert analysis of §2.1 holds relative to
# that measure (stable-pess's k ≥ s included). The PPO family ignores it.


def group_std_advantage(rewards: torch.Tensor, config: ObjectiveConfig, ref_value=None, weights=None) -> torch.Tensor:
    """(r − mean)/(std + 1e-6), std unbiased as in TRL's GRPO; r − mean with adv_norm "none"."""
    centred = rewards - rewards.mean()
    if config.adv_norm == "none" or rewards.numel() < 2:
        return centred
    return centred / (rewards.std() + 1e-6)


def mean_advantage(rewards, config, ref_value=None, weights=None):
    """r − mean(r) (the weighted mean under `weights`)."""
    if weights is None:
        return rewards - rewards.mean()
    return rewards - (weights * rewards).sum() / weights.sum()


def soft_value(rewards: torch.Tensor, beta1: float, weights=None) -> torch.Tensor:
    """β₁·log mean e^{r/β₁} (the weighted mean under `weights`), computed stably."""
    import torch

    if weights is None:
        weights = torch.ones_like(rewards)
    return beta1 * (torch.logsumexp(rewards / beta1 + torch.log(weights), 0) - torch.log(weights.sum()))


def oapl_advantage(rewards, config, ref_value=None, weights=None):
    """r − V̂, V̂ = β₁·log mean e^{r/β₁} over the group (OAPL's decoupled temperature)."""
    return rewards - soft_value(rewards, config.beta1, weights)


def apo_advantage(rewards, config, ref_value=None, weights=None):
    """r − V*, V* = β₁·log mean e^{r₀/β₁} over version-0 samples of the same prompt (A*-PO)."""
    if ref_value is None:
        raise ValueError("apo needs V* from version-0 samples of each prompt")
    return rewards - ref_value


def shifted(advantage: Callable, default_shift: float) -> Callable:
    """A regression objective's advantage with its baseline moved down by s·β (s = --shift, else the objective's
    default): the mean of A/β rises by s, so m ≥ s and the Lambert k ≥ s > 0 for a mean baseline (DESIGN §2.1);
    for oapl it tests Asymmetric REINFORCE's claim that a baseline below the mean keeps the support."""

    def advantage_with_shift(rewards, config, ref_value=None, weights=None):
        shift = default_shift if config.shift is None else config.shift
        return advantage(rewards, config, ref_value, weights) + shift * config.beta

    advantage_with_shift.default_shift = default_shift
    return advantage_with_shift


# ------------------------------------------------------------------------------------------------ losses


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(q‖p) from samples of q, with log_ratio = log p − log q: e^x − 1 − x ≥ 0."""
    import torch

    return torch.exp(log_ratio) - 1 - log_ratio


def _kl_ref_term(batch: Batch, config: ObjectiveConfig) -> torch.Tensor:
    if config.kl_ref == 0:
        return batch.logprobs.new_zeros(())
    # as TRL: k3 of KL(π_θ‖π_ref) with the sampled tokens, log_ratio = log π_ref − log π_θ
    return config.kl_ref * token_mean(k3(batch.ref_logprobs - batch.logprobs), batch.mask)


def ppo_loss(batch: Batch, config: ObjectiveConfig):
    """−token-mean min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â) [+ c·k3 to π_ref].  ρ = e^{log π_θ − log π_b}."""
    import torch

    ratio = torch.exp(batch.logprobs - batch.behaviour_logprobs)
    adv = batch.advantages[:, None]
    clipped = torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high)
    surrogate = torch.min(ratio * adv, clipped * adv)
    loss = -token_mean(surrogate, batch.mask) + _kl_ref_term(batch, config)
    clip_active = ((ratio * adv) != (clipped * adv)) & (surrogate == clipped * adv)
    return loss, {"clip_fraction": token_mean(clip_active.float(), batch.mask).item()}


def cispo_loss(batch: Batch, config: ObjectiveConfig):
    """−token-mean sg(min(ρ, 1+ε_high))·Â·log π_θ [+ c·k3]: the IS weight is capped and detached."""
    import torch

    ratio = torch.exp(batch.logprobs - batch.behaviour_logprobs)
    weight = torch.clamp(ratio, max=1 + config.clip_high).detach()
    loss = -token_mean(weight * batch.advantages[:, None] * batch.logprobs, batch.mask) + _kl_ref_term(batch, config)
    return loss, {"clip_fraction": token_mean((ratio > 1 + config.clip_high).float(), batch.mask).item()}


def pg_loss(batch: Batch, config: ObjectiveConfig):
    """−token-mean Â·log π_θ [+ c·k3]: the plain policy gradient with the ratios removed."""
    loss = -token_mean(batch.advantages[:, None] * batch.logprobs, batch.mask) + _kl_ref_term(batch, config)
    return loss, {"clip_fraction": 0.0}


def m2_mask(log_ratio: torch.Tensor, mask: torch.Tensor, budget: float) -> torch.Tensor:
    """M2PO's second-moment trust region (arXiv 2510.01161, Alg. 1): drop the tokens of largest (log ρ)², one
    by one, until the mean (log ρ)² of the tokens kept is at most `budget`; at least one token is kept.
    Returns the kept tokens (B, T) bool, a subset of `mask`."""
    import torch

    squares = log_ratio.detach()[mask] ** 2
    if squares.numel() == 0:
        return mask
    ordered, order = torch.sort(squares, descending=True)
    # mean of the tokens kept when the first j (the largest) are dropped, for j = 0 … n−1
    kept_means = ordered.flip(0).cumsum(0).flip(0) / torch.arange(len(ordered), 0, -1, dtype=ordered.dtype,
                                                                    device=ordered.device)
    within = torch.nonzero(kept_means <= budget)
    dropped = int(within[0]) if len(within) else len(ordered) - 1
    keep_sorted = torch.arange(len(ordered), device=ordered.device) >= dropped
    keep = torch.zeros_like(squares, dtype=torch.bool)
    keep[order] = keep_sorted
    out = torch.zeros_like(mask)
    out[mask] = keep
    return out


def m2po_loss(batch: Batch, config: ObjectiveConfig):
    """−token-mean M·ρ·Â [+ c·k3]: the unclipped importance-weighted surrogate on the tokens M keeps, M = the
    second-moment trust region of `m2_mask` over this (micro-)batch's tokens with τ = --m2-budget. Dropped tokens
    count in the token-mean's denominator with weight 0 (as a clipped PPO token has no gradient)."""
    import torch

    log_ratio = batch.logprobs - batch.behaviour_logprobs
    keep = m2_mask(log_ratio, batch.mask, config.m2_budget)
    surrogate = torch.exp(log_ratio) * batch.advantages[:, None]
    loss = -token_mean(surrogate * keep, batch.mask) + _kl_ref_term(batch, config)
    return loss, {"clip_fraction": token_mean((batch.mask & ~keep).float(), batch.mask).item()}


def decoupled_ppo_loss(batch: Batch, config: ObjectiveConfig):
    """−token-mean w·min(r·Â, clip(r, 1−ε_low, 1+ε_high)·Â) [+ c·k3], AReaL's decoupled PPO (arXiv 2505.24298,
    eq. 5): the trust region r = π_θ/π_prox is centred on the parent version π_prox, and the stale sample is
    corrected by the constant w = π_prox/π_b; tokens with w > C (--weight-cap) are left out of the sum (AReaL's
    behav_imp_weight_cap), not out of the denominator. With π_prox = π_b, w = 1 and this is `ppo_loss`."""
    import torch

    ratio = torch.exp(batch.logprobs - batch.parent_logprobs)
    weight = torch.exp(batch.parent_logprobs - batch.behaviour_logprobs)
    kept = batch.mask & (weight <= config.weight_cap)
    adv = batch.advantages[:, None]
    clipped = torch.clamp(ratio, 1 - config.clip_low, 1 + config.clip_high)
    surrogate = torch.min(ratio * adv, clipped * adv)
    loss = -token_mean(surrogate * weight * kept, batch.mask) + _kl_ref_term(batch, config)
    clip_active = ((ratio * adv) != (clipped * adv)) & (surrogate == clipped * adv)
    return loss, {"clip_fraction": token_mean((clip_active | ~kept).float(), batch.mask).item()}


def regression_loss(batch: Batch, config: ObjectiveConfig, anchor: str = "behaviour"):
    """mean over sequences of ω_i·(β·Δ_i − A_i)², Δ_i = Σ_t (log π_θ − log π_anchor), no ratio, no clip.

    Shared by oapl, pmd-mean and stable-pess (anchor π_b, ω = 1; or, with --anchor parent, π_prox with
    ω = the self-normalised truncated π_prox/π_b of Batch.sequence_weights) and apo (anchor π_ref); only A differs.
    """
    if anchor == "ref":
        anchor_logprobs, weights = batch.ref_logprobs, None
    elif config.anchor == "parent":
        anchor_logprobs, weights = batch.parent_logprobs, batch.sequence_weights
    else:
        anchor_logprobs, weights = batch.behaviour_logprobs, None
    delta = ((batch.logprobs - anchor_logprobs) * batch.mask).sum(-1)  # (B,)
    squares = (config.beta * delta - batch.advantages) ** 2
    loss = (squares if weights is None else weights * squares).mean()
    return loss, {"clip_fraction": 0.0}


@dataclass(frozen=True)
class Objective:
    name: str
    advantage: Callable  # (group rewards (G,), config, ref_value, weights) -> (G,)
    loss: Callable  # (Batch, config) -> (loss, metrics)
    reduction: str  # "token" (loss is a token-mean) or "sequence" (a mean over completions)
    regression: bool  # a ratio-free regression objective (its Lambert target is meaningful)
    anchor: str  # "behaviour" or "ref": the policy Δ is measured against ("behaviour" may become the parent)
    # where the optimal value V* in the advantage comes from: None (the advantage needs none), or "version0":
    # β₁·log mean e^{r/β₁} over version-0 samples of the same prompt (apo), generated once when missing
    value: str | None = None
    flat_group: str = ""  # what it does with a group whose rewards are all equal (said once per update)


def get_objective(name: str) -> Objective:
    """The registry's entry for `name`; the one place an unknown objective is refused."""
    from roll.errors import RollError

    if name not in OBJECTIVES:
        raise RollError(f"unknown objective '{name}' (choose from: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


def uses_reference(name: str, config: ObjectiveConfig) -> bool:
    """Whether objective `name` reads π_ref's log-probs: apo's anchor, or a KL-to-π_ref term."""
    objective = get_objective(name)
    return objective.anchor == "ref" or (not objective.regression and config.kl_ref > 0)


def uses_parent(name: str, config: ObjectiveConfig) -> bool:
    """Whether objective `name` reads π_prox, the parent version's log-probs: decoupled-ppo's trust region, or a
    regression objective anchored at the parent (--anchor parent)."""
    objective = get_objective(name)
    return objective.anchor == "parent" or (objective.regression and config.anchor == "parent")


def check_anchor(name: str, config: ObjectiveConfig) -> None:
    """--anchor parent is for the regression objectives anchored at π_b; anything else is one line."""
    from roll.errors import RollError

    objective = get_objective(name)
    if config.anchor == "parent" and not (objective.regression and objective.anchor == "behaviour"):
        raise RollError(f"--anchor parent: {name} is not a regression objective anchored at π_b (use it with oapl, "
                        f"pmd-mean or stable-pess)")
    if config.shift is not None and not objective.regression:
        raise RollError(f"--shift {config.shift:g}: {name} has no regression baseline to shift (use it with oapl, "
                        f"apo, pmd-mean or stable-pess)")


def _regression(anchor: str) -> Callable:
    return lambda batch, config: regression_loss(batch, config, anchor)


NO_GRADIENT = "no gradient (advantage 0)"
PULL_ONLY = "only the pull (β·Δ)² towards the anchor (advantage s·β, 0 unless --shift)"
OBJECTIVES: dict[str, Objective] = {
    "ppo": Objective("ppo", group_std_advantage, ppo_loss, "token", False, "behaviour", flat_group=NO_GRADIENT),
    "m2po": Objective("m2po", group_std_advantage, m2po_loss, "token", False, "behaviour", flat_group=NO_GRADIENT),
    "decoupled-ppo": Objective("decoupled-ppo", group_std_advantage, decoupled_ppo_loss, "token", False, "parent",
                               flat_group=NO_GRADIENT),
    "cispo": Objective("cispo", group_std_advantage, cispo_loss, "token", False, "behaviour", flat_group=NO_GRADIENT),
    "pg": Objective("pg", mean_advantage, pg_loss, "token", False, "behaviour", flat_group=NO_GRADIENT),
    "oapl": Objective("oapl", shifted(oapl_advantage, 0.0), _regression("behaviour"), "sequence", True, "behaviour",
                      flat_group=PULL_ONLY),
    "apo": Objective("apo", shifted(apo_advantage, 0.0), _regression("ref"), "sequence", True, "ref", value="version0",
                     flat_group="an advantage r − V* (+ s·β) from version 0"),
    "pmd-mean": Objective("pmd-mean", shifted(mean_advantage, 0.0), _regression("behaviour"), "sequence", True,
                          "behaviour", flat_group=PULL_ONLY),
    # the β-shifted mean baseline: k ≥ s for every group (Jensen on W₀(e^u), DESIGN §2.1)
    "stable-pess": Objective("stable-pess", shifted(mean_advantage, 1.0), _regression("behaviour"), "sequence", True,
                             "behaviour", flat_group="raises every sampled completion (advantage s·β)"),
}
