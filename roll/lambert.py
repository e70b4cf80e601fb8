"""The Lambert-tempered target that a ratio-free regression objective actually pursues (DESIGN §2.1).

The regression loss  E_{π_b}[(β·log(π/π_b) − A)²]  minimised over normalised π has the stationarity
condition (β·log r − A)/r = const with r = π/π_b, whose solution is

    r(y) = W₀(k·e^{A(y)/β}) / k = exp(u − W₀(k·e^{u})),      u = A/β,

with k fixed by Σ π_b·r = 1. The nominal target is the Boltzmann tilt r ∝ e^{u} (k → 0). With
m = log E_{π_b}[e^{u}], the normaliser g(k) = E_{π_b}[exp(u − W₀(k e^u))] falls monotonically from e^m at
k = 0, so

    m > 0 ⇔ k > 0   pessimistic: ratios between outputs shrink towards π_b (weight ~linear in A)
    m = 0 ⇔ k = 0   boundary: exactly the Boltzmann target
    m < 0 ⇔ k < 0   optimistic: ratios amplified; no W₀ solution once k would pass −e^{−1−max u}

Everything is computed in log space: W₀(k e^u) for k > 0 is the Wright omega function ω(log k + u), so
β = 1e-3 with |A/β| ≈ 1e3 neither overflows nor underflows. Here π_b is a group's empirical measure
(weights 1/G over its samples) unless weights are given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from roll.objectives import ObjectiveConfig

BOUNDARY_TOLERANCE = 1e-9  # |m| below this is the boundary regime (exactly Boltzmann up to rounding)


def wright_omega(z: np.ndarray) -> np.ndarray:
    """ω(z): the solution w of w + log w = z (so ω(z) = W₀(e^z)), for real z, in float64.

    Solved for v = log w, i.e. e^v + v = z, which is smooth for every real z (w itself would underflow
    for z ≪ 0). Start from the asymptotes (v ≈ z − log(1 + e^z) for z ≤ 1, v ≈ log(z − log z) above) and
    refine by Halley's method, which converges cubically: a few rounds reach machine precision.
    """
    z = np.asarray(z, dtype=np.float64)
    v = np.where(z > 1.0, np.log(np.maximum(z - np.log(np.maximum(z, 1.0)), 1e-300)), z - np.logaddexp(0.0, z))
    for _ in range(6):
        ev = np.exp(v)
        f = ev + v - z
        fp = ev + 1.0
        v = v - f / (fp - 0.5 * f * ev / fp)
    return np.exp(v)


def lambert_w0_negative(x: np.ndarray) -> np.ndarray:
    """W₀(x) for x in [−1/e, 0], float64.

    Near the branch point x = −1/e the series in p = √(2(e·x + 1)) is used as is (Halley's method stalls
    where W′ is infinite); elsewhere Halley on w·e^w = x from that series (x < −0.25) or from x − x².
    """
    x = np.asarray(x, dtype=np.float64)
    p = np.sqrt(np.maximum(2.0 * (math.e * x + 1.0), 0.0))
    series = -1.0 + p - p * p / 3.0 + 11.0 / 72.0 * p ** 3
    w = np.where(x < -0.25, series, x - x * x)
    for _ in range(10):
        ew = np.exp(w)
        f = w * ew - x
        wp1 = np.maximum(w + 1.0, 1e-12)
        w = np.maximum(w - f / (ew * wp1 - (w + 2.0) * f / (2.0 * wp1)), -1.0)
    return np.where(p < 1e-4, series, w)


def _log_ratio(u: np.ndarray, k: float, log_k: float | None = None) -> np.ndarray:
    """log r = u − W₀(k e^u), evaluated without forming e^u (nor k itself, when `log_k` is given: k may
    exceed float64 when A/β does, e.g. rewards of 1e39)."""
    if log_k is not None:
        return u - wright_omega(log_k + u)
    if k > 0:
        return u - wright_omega(math.log(k) + u)
    if k == 0:
        return u
    return u - lambert_w0_negative(-np.exp(math.log(-k) + u))


def _log_normaliser(u: np.ndarray, log_w: np.ndarray, k: float, log_k: float | None = None) -> float:
    """log g(k) = log Σ w·r."""
    a = log_w + _log_ratio(u, k, log_k)
    top = a.max()
    return float(top + math.log(np.exp(a - top).sum()))


@dataclass(frozen=True)
class LambertTarget:
    m: float  # log E_{π_b}[e^{A/β}]
    k: float  # the Lambert constant (NaN where no W₀ solution exists)
    regime: str  # "pessimistic", "boundary", "optimistic" or "optimistic-no-solution"
    induced: np.ndarray  # target weights π*(y_i)/Σ over the group's samples (NaN if no solution)
    boltzmann: np.ndarray  # nominal target weights ∝ π_b·e^{A/β}
    induced_entropy: float
    boltzmann_entropy: float


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def solve(advantages, beta: float, weights=None, iterations: int = 200) -> LambertTarget:
    """m, k, regime and both targets for one group's advantages at temperature β.

    k solves log g(k) = 0 by bisection (g is monotone): on log k when k > 0, on k itself in
    [−e^{−1−max u}, 0) when k < 0.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    u = np.asarray(advantages, dtype=np.float64) / beta
    n = u.shape[0]
    weights = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    log_w = np.log(weights)
    a = log_w + u
    m = float(a.max() + math.log(np.exp(a - a.max()).sum()))
    boltzmann = np.exp(a - m)

    if abs(m) <= BOUNDARY_TOLERANCE:
        k, regime = 0.0, "boundary"
    elif np.all(u == u[0]) and u[0] >= -1.0:
        # one advantage for the whole group: W₀(k·e^u) = u solves it exactly, k = u (bisection would land
        # a rounding error away, and k ≥ s must hold exactly for stable-pess's equal-reward groups)
        k = float(u[0])
        regime = "pessimistic" if k > 0 else "optimistic"
    elif m > 0:
        regime = "pessimistic"
        lo, hi = -1.0, 1.0  # bracket log k: log g > 0 at lo, < 0 at hi
        while _log_normaliser(u, log_w, 0.0, lo) <= 0:
            lo -= 2.0 * abs(lo) + 1.0
        while _log_normaliser(u, log_w, 0.0, hi) >= 0:
            hi += 2.0 * abs(hi) + 1.0
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):  # the bracket is down to adjacent doubles: further halvings change nothing
                break
            if _log_normaliser(u, log_w, 0.0, mid) > 0:
                lo = mid
            else:
                hi = mid
        log_k = 0.5 * (lo + hi)
        k = math.exp(log_k) if log_k < 709.0 else math.inf  # past float64's range k is reported as inf
        induced = np.exp(log_w + _log_ratio(u, k, log_k))
        induced = induced / induced.sum()
        return LambertTarget(m, k, regime, induced, boltzmann, _entropy(induced), _entropy(boltzmann))
    else:
        # k < 0: W₀(k e^u) needs k e^{u_max} ≥ −1/e, so k ≥ k_min = −e^{−1−u_max}
        k_min = -math.exp(-1.0 - float(u.max()))
        if _log_normaliser(u, log_w, k_min) < 0:
            nan = np.full(n, np.nan)
            return LambertTarget(m, math.nan, "optimistic-no-solution", nan, boltzmann, math.nan, _entropy(boltzmann))
        lo, hi = k_min, 0.0  # log g ≥ 0 at k_min, < 0 at 0
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if _log_normaliser(u, log_w, mid) >= 0:
                lo = mid
            else:
                hi = mid
        k, regime = 0.5 * (lo + hi), "optimistic"
    induced = np.exp(log_w + _log_ratio(u, k))
    induced = induced / induced.sum()  # removes the bisection's last ~1e-15 of normalisation error
    return LambertTarget(m, k, regime, induced, boltzmann, _entropy(induced), _entropy(boltzmann))


# ------------------------------------------------------------------------------------------ roll lambert


def group_advantages(rewards, objective: str, beta: float, beta1: float = ObjectiveConfig.beta1,
                     shift: float = ObjectiveConfig.shift) -> np.ndarray:
    """Advantages of one group's rewards under an objective of the registry (apo: V* from these rewards)."""
    import torch

    from roll.objectives import get_objective, soft_value

    entry = get_objective(objective)
    config = ObjectiveConfig(beta=beta, beta1=beta1, shift=shift)
    r = torch.tensor(rewards, dtype=torch.float64)
    ref_value = soft_value(r, beta1) if entry.value == "version0" else None  # the group stands in for v0's samples
    return entry.advantage(r, config, ref_value).numpy()


def _numbers(text: str, what: str) -> list[float]:
    from roll.errors import RollError

    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RollError(f"--{what} '{text}': expected comma-separated numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise RollError(f"--{what} '{text}': expected finite comma-separated numbers")
    return values


def show(*, advantages=None, rewards=None, objective="stable-pess", beta=ObjectiveConfig.beta,
         beta1=ObjectiveConfig.beta1, shift=ObjectiveConfig.shift, run_path=None, data_version=None,
         prompt_id=None) -> LambertTarget:
    """`roll lambert`: print the nominal and induced targets of one group side by side."""
    from rich.console import Console
    from rich.table import Table

    from roll.errors import RollError

    if not beta > 0:
        raise RollError(f"--beta {beta}: must be > 0")
    if advantages:
        adv, rewards_shown = np.array(_numbers(advantages, "advantages")), None
    else:
        if rewards:
            rewards_shown = _numbers(rewards, "rewards")
        elif data_version is not None and prompt_id:
            from roll.runs import default_run_path
            from roll.store import Run, named_query

            run = Run(run_path or default_run_path())
            found = named_query(run, "group_rewards", version=data_version, prompt_id=prompt_id)
            if not found:
                raise RollError(f"{run.root}: no verdicts for version {data_version}, prompt '{prompt_id}'")
            rewards_shown = [row["reward"] for row in found]
        else:
            raise RollError("give --advantages, --rewards, or --version with --prompt-id")
        adv = group_advantages(rewards_shown, objective, beta, beta1, shift)
    target = solve(adv, beta)
    table = Table("sample", *(["reward"] if rewards_shown else []), "advantage", "π_b", "Boltzmann (nominal)",
                  "Lambert (induced)", title=f"m = {target.m:.6g}   k = {target.k:.6g}   regime: {target.regime}   β = {beta:g}")
    for i, a in enumerate(adv):
        table.add_row(str(i), *([f"{rewards_shown[i]:g}"] if rewards_shown else []), f"{a:.4g}", f"{1 / len(adv):.4f}",
                      f"{target.boltzmann[i]:.4f}", f"{target.induced[i]:.4f}")
    table.caption = f"entropy: Boltzmann {target.boltzmann_entropy:.4f}, induced {target.induced_entropy:.4f} nats"
    Console().print(table)
    return target
