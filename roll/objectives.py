"""Training objectives (DESIGN §2.2): pure functions of tensors, in one registry, dispatched in one place.

Each objective is an advantage (per sequence, computed per group of G samples of one prompt) and a loss
over a batch of completions. Notation: ρ_t = π_θ(y_t|·)/π_b(y_t|·) per token, Δ_i = Σ_t log ρ_t per sequence
(against π_ref for apo), Â/A the advantage, "token-mean" the mean over every completion token of the batch.

    ppo          −token-mean min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â)  [+ c·token-mean k3 of KL(π_θ‖π_ref)]
    cispo        −token-mean sg(min(ρ, 1+ε_high))·Â·log π_θ           [+ c·token-mean k3]
    pg           −token-mean Â·log π_θ                                 [+ c·token-mean k3]
    oapl         mean (β·Δ − (r − β₁·log mean e^{r/β₁}))²
    apo          mean (β·Δ_ref − (r − V*))²,  V* = β₁·log mean e^{r₀/β₁} over version-0 samples
    pmd-mean     mean (β·Δ − (r − mean r))²
    stable-pess  mean (β·Δ − (r − mean r + s·β))²

The four regression objectives share `regression_loss` and differ only in their advantage (and apo in its
anchor). Why the baseline matters: the regression optimum is the Lambert-tempered target of roll.lambert,
pessimistic iff the baseline lies below V_β = β·log E[e^{r/β}]; stable-pess's +s·β shift guarantees k ≥ s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from roll.options import option

if TYPE_CHECKING:  # torch is imported inside the functions: the CLI reads ObjectiveConfig without loading it
    import torch


@dataclass(frozen=True)
class ObjectiveConfig:
    beta: float = option(0.1, "β: KL temperature of the regression objectives and the Lambert diagnostics.", group="training")
    beta1: float = option(0.2, "β₁: temperature of the soft value in oapl and V* in apo.", group="training")
    shift: float = option(1.0, "s: stable-pess baseline shift, in units of β.", group="training")
    clip_low: float = option(0.2, "PPO ε_low.", group="training")
    clip_high: float = option(0.2, "PPO ε_high (and the CISPO weight cap 1 + ε_high).", group="training")
    kl_ref: float = option(0.0, "Weight of the k3 KL-to-π_ref term (ppo, cispo, pg).", group="training")
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


# ------------------------------------------------------------------------------------------- advantages
# Each takes a group's rewards (G,) and returns its advantages (G,). `ref_value` is apo's V*.


def group_std_advantage(rewards: torch.Tensor, config: ObjectiveConfig, ref_value=None) -> torch.Tensor:
    """(r − mean)/(std + 1e-6), std unbiased as in TRL's GRPO; r − mean with adv_norm "none"."""
    centred = rewards - rewards.mean()
    if config.adv_norm == "none" or rewards.numel() < 2:
        return centred
    return centred / (rewards.std() + 1e-6)


def mean_advantage(rewards, config, ref_value=None):
    """r − mean(r)."""
    return rewards - rewards.mean()


def soft_value(rewards: torch.Tensor, beta1: float) -> torch.Tensor:
    """β₁·log mean e^{r/β₁}, computed stably."""
    import torch

    return beta1 * (torch.logsumexp(rewards / beta1, 0) - torch.log(torch.tensor(float(rewards.numel()), dtype=rewards.dtype)))


def oapl_advantage(rewards, config, ref_value=None):
    """r − V̂, V̂ = β₁·log mean e^{r/β₁} over the group (OAPL's decoupled temperature)."""
    return rewards - soft_value(rewards, config.beta1)


def apo_advantage(rewards, config, ref_value=None):
    """r − V*, V* = β₁·log mean e^{r₀/β₁} over version-0 samples of the same prompt (A*-PO)."""
    if ref_value is None:
        raise ValueError("apo needs V* from version-0 samples of each prompt")
    return rewards - ref_value


def stable_pess_advantage(rewards, config, ref_value=None):
    """r − mean(r) + s·β: the β-shifted mean baseline; k ≥ s for every group (Jensen on W₀(e^u))."""
    return rewards - rewards.mean() + config.shift * config.beta


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


def regression_loss(batch: Batch, config: ObjectiveConfig, anchor: str = "behaviour"):
    """mean over sequences of (β·Δ_i − A_i)², Δ_i = Σ_t (log π_θ − log π_anchor), no ratio, no clip.

    Shared by oapl, pmd-mean and stable-pess (anchor π_b) and apo (anchor π_ref); only A differs.
    """
    anchor_logprobs = batch.behaviour_logprobs if anchor == "behaviour" else batch.ref_logprobs
    delta = ((batch.logprobs - anchor_logprobs) * batch.mask).sum(-1)  # (B,)
    loss = ((config.beta * delta - batch.advantages) ** 2).mean()
    return loss, {"clip_fraction": 0.0}


@dataclass(frozen=True)
class Objective:
    name: str
    advantage: Callable  # (group rewards (G,), config, ref_value) -> (G,)
    loss: Callable  # (Batch, config) -> (loss, metrics)
    reduction: str  # "token" (loss is a token-mean) or "sequence" (a mean over completions)
    regression: bool  # a ratio-free regression objective (its Lambert target is meaningful)
    anchor: str  # "behaviour" or "ref": the policy Δ is measured against
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


def _regression(anchor: str) -> Callable:
    return lambda batch, config: regression_loss(batch, config, anchor)


NO_GRADIENT, PULL_ONLY = "no gradient (advantage 0)", "only the pull (β·Δ)² towards π_b (advantage 0)"
OBJECTIVES: dict[str, Objective] = {
    "ppo": Objective("ppo", group_std_advantage, ppo_loss, "token", False, "behaviour", flat_group=NO_GRADIENT),
    "cispo": Objective("cispo", group_std_advantage, cispo_loss, "token", False, "behaviour", flat_group=NO_GRADIENT),
    "pg": Objective("pg", mean_advantage, pg_loss, "token", False, "behaviour", flat_group=NO_GRADIENT),
    "oapl": Objective("oapl", oapl_advantage, _regression("behaviour"), "sequence", True, "behaviour", flat_group=PULL_ONLY),
    "apo": Objective("apo", apo_advantage, _regression("ref"), "sequence", True, "ref", value="version0",
                     flat_group="an advantage r − V* from version 0"),
    "pmd-mean": Objective("pmd-mean", mean_advantage, _regression("behaviour"), "sequence", True, "behaviour",
                          flat_group=PULL_ONLY),
    "stable-pess": Objective("stable-pess", stable_pess_advantage, _regression("behaviour"), "sequence", True,
                             "behaviour", flat_group="raises every sampled completion (advantage s·β)"),
}
