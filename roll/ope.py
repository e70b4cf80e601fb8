"""Pessimistic off-policy evaluation by logarithmic smoothing (DESIGN §7; Sakhi, Aouali, Alquier, Chopin,
"Logarithmic Smoothing for Pessimistic Off-Policy Evaluation, Selection and Learning", NeurIPS 2024,
arXiv 2405.14335). Pure functions of NumPy arrays, in log space.

Data: n prompts x_i, each with G_i completions y_ij sampled from π_b, rewards r_ij ∈ [0, 1] and sequence
log-weights ℓ_ij = log π(y_ij | x_i) − log π_b(y_ij | x_i). The value of π is V = E_x E_{y∼π}[r].

The paper's unit is one (context, action) pair drawn i.i.d.; a group of G completions of one prompt is not
G independent units (they share the prompt, whose difficulty moves them together). So the unit here is the
prompt: z_i = (1/G_i) Σ_j w_ij r_ij, which is ≥ 0 and has E[z_i] = V, and the paper's estimator and bound
are applied to z_1 … z_n. With G = 1 this is exactly the paper's reward form (its costs c = −r):

    LS estimate   V̂_λ = (1/n) Σ_i (1/λ) log(1 + λ z_i)                  (never above IPS; finite)
    lower bound   V ≥ (1/λ) (exp((1/n) Σ_i log(1 + λ z_i) − log(1/δ)/n) − 1)   with probability ≥ 1 − δ

(the paper's Psi bound, Prop. 3 / its `PsiBoundEstimator` with L = 1/λ). The proof needs only the z_i to be
independent, nonnegative, with mean V: E[Π_i (1 + λ z_i)] = (1 + λV)^n ≤ exp(nλV), then Markov's
inequality. λ: `sqrt` is the paper's evaluation code, λ = 1/√n; `auto` maximises the bound over the fixed
grid LAMBDA_GRID, paying log |grid| in δ by the union bound; a number is used as it is. The bound is clipped
to [0, 1].

Rewards outside [0, 1] break the bound; they are refused by the caller. When π_b's support misses part of
π's (top-p < 1 sampling: tokens outside π_b's nucleus were never drawn), E[z] is the value of π restricted
to π_b's support, which is ≤ V for nonnegative rewards: estimates are biased low and the bound stays a
lower bound.
"""
from __future__ import annotations

import math

import numpy as np

# λ candidates of `auto`: fixed before seeing data (the union bound needs that), 2⁴ … 2⁻²⁰. λ > 1 is allowed
# (the bound holds for every λ > 0) and competitive when n is small: over the 76 (checkpoint, stale version)
# cases of EXPERIMENTS.md's two 64-prompt runs, the mean bound at δ = 0.05 was 0.270 at λ = 1/2, 0.294 at
# λ = 1, 0.290 at λ = 2 and 0.269 at λ = 4
LAMBDA_GRID = tuple(2.0 ** j for j in range(4, -21, -1))
HEAVY_LOG_WEIGHT = 50.0  # a row whose log-weight exceeds this carries e⁵⁰ ≈ 5e21 times its share


def log_prompt_values(log_weights: np.ndarray, rewards: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """log z_i per prompt (−inf where z_i = 0): log of the mean over the prompt's rows of w·r, by logsumexp."""
    with np.errstate(divide="ignore"):
        terms = np.where(rewards > 0, log_weights + np.log(np.where(rewards > 0, rewards, 1.0)), -np.inf)
    _, index, counts = np.unique(prompts, return_inverse=True, return_counts=True)
    peak = np.full(len(counts), -np.inf)
    np.maximum.at(peak, index, terms)
    safe_peak = np.where(np.isfinite(peak), peak, 0.0)
    sums = np.zeros(len(counts))
    np.add.at(sums, index, np.exp(terms - safe_peak[index]))
    with np.errstate(divide="ignore"):
        return np.where(np.isfinite(peak), safe_peak + np.log(sums) - np.log(counts), -np.inf)


def _mean_log1p(log_z: np.ndarray, lam: float) -> float:
    """(1/n) Σ log(1 + λ z_i), from log z_i: log(1 + e^(log λ + log z)) = logaddexp(0, ·), finite for any z."""
    return float(np.mean(np.logaddexp(0.0, math.log(lam) + log_z)))


def ls_estimate(log_z: np.ndarray, lam: float) -> float:
    """V̂_λ = (1/n) Σ (1/λ) log(1 + λ z_i)."""
    return _mean_log1p(log_z, lam) / lam


def ls_bound(log_z: np.ndarray, lam: float, delta: float) -> float:
    """(1/λ)(exp((1/n) Σ log(1 + λ z_i) − log(1/δ)/n) − 1), clipped to [0, 1]."""
    exponent = _mean_log1p(log_z, lam) - math.log(1.0 / delta) / len(log_z)
    if exponent >= math.log1p(lam):  # the bound would be ≥ 1 (and exp could overflow)
        return 1.0
    return min(1.0, max(0.0, math.expm1(exponent) / lam))


def choose_lambda(log_z: np.ndarray, rule: str | float, delta: float) -> tuple[float, float]:
    """(λ, the bound at λ) for a rule: 'sqrt' (1/√n), 'auto' (the grid's best at δ/|grid|), or a number."""
    if rule == "sqrt":
        lam = 1.0 / math.sqrt(len(log_z))
        return lam, ls_bound(log_z, lam, delta)
    if rule == "auto":
        share = delta / len(LAMBDA_GRID)
        return max(((lam, ls_bound(log_z, lam, share)) for lam in LAMBDA_GRID), key=lambda pair: pair[1])
    lam = float(rule)
    return lam, ls_bound(log_z, lam, delta)


def evaluate(log_weights, rewards, prompts, delta: float = 0.05, rule: str | float = "auto") -> dict:
    """Every number `roll ope` reports for one target policy on one set of stale rows.

    ls_estimate and ls_bound (per prompt, see the module docstring), IPS (mean of w·r over rows; `log_ips`
    its log, finite where IPS itself overflows), self-normalised IPS (Σ w r / Σ w), the effective sample size
    (Σw)²/Σw² and its share of the rows, and the share of rows whose log-weight exceeds 50.
    """
    log_weights = np.asarray(log_weights, dtype=np.float64)
    rewards = np.asarray(rewards, dtype=np.float64)
    prompts = np.asarray(prompts)
    log_z = log_prompt_values(log_weights, rewards, prompts)
    lam, bound = choose_lambda(log_z, rule, delta)
    peak = log_weights.max()
    # w / max w: ratios of weights are all that SNIPS and ESS need (every weight 0: both undefined, NaN)
    shifted = np.exp(log_weights - peak) if np.isfinite(peak) else np.full(len(log_weights), np.nan)
    with np.errstate(divide="ignore"):
        positive = rewards > 0
        log_ips = (float(np.logaddexp.reduce(log_weights[positive] + np.log(rewards[positive]))) - math.log(len(rewards))
                   if positive.any() else -math.inf)
    ess = float(shifted.sum() ** 2 / (shifted ** 2).sum())
    return {
        "prompts": int(len(log_z)), "rows": int(len(rewards)), "delta": float(delta), "lambda_rule": str(rule),
        "lambda": lam, "ls_estimate": ls_estimate(log_z, lam), "ls_bound": bound,
        "ips": math.exp(log_ips) if log_ips < 700 else math.inf, "log_ips": log_ips,
        "snips": float((shifted * rewards).sum() / shifted.sum()),
        "ess": ess, "ess_share": ess / len(rewards),
        "heavy_share": float(np.mean(log_weights > HEAVY_LOG_WEIGHT)),
    }
