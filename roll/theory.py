"""Theory check: a tabular softmax policy trained on a regression objective reaches the Lambert target.

K outputs with rewards r, a fixed behaviour policy π_b, and N samples drawn from it (empirical measure w).
The policy π_θ = softmax(θ) minimises, by full-batch gradient descent (L-BFGS), the regression loss over the
samples, anchored at π_b's true log-probs:

    L(θ) = Σ_k w_k (β·log(π_θ,k/π_b,k) − A_k)²

Its stationarity condition is that of roll.lambert with measure w and advantages A'_k = A_k − β·log(w_k/π_b,k)
(the same derivation, with π_b replaced by w where the expectation is taken), so the predicted optimum is
π_k = w_k·r'_k with r' from `lambert.solve(A', β, weights=w)`. Note m' = log Σ_k π_b,k e^{A_k/β}: the
regime is the population's. The nominal (Boltzmann) target is π_b·e^{A/β}, normalised.
"""
from __future__ import annotations

import numpy as np


def group_baseline_advantages(rewards: np.ndarray, objective: str, beta: float, beta1: float,
                              shift: float | None = None):
    """Per-sample advantages with the objective's baseline taken over the samples (as a group would).

    `objective` is a registered objective, or "lme": the log-mean-exp baseline at the regression's own β.
    """
    from roll.lambert import group_advantages

    if objective == "lme":
        return rewards - beta * (np.logaddexp.reduce(rewards / beta) - np.log(len(rewards)))
    return group_advantages(rewards, objective, beta, beta1, shift)


def tabular_check(objective: str, beta: float = 0.5, beta1: float = 1.0, shift: float | None = None, outputs: int = 5,
                  samples: int = 4000, seed: int = 0) -> dict:
    """Train the tabular policy and compare it with the Lambert and Boltzmann targets (total variation)."""
    import torch

    from roll import lambert

    rng = np.random.default_rng(seed)
    rewards = rng.uniform(0, 1, outputs)
    behaviour = rng.dirichlet(np.full(outputs, 3.0))
    drawn = rng.choice(outputs, size=samples, p=behaviour)
    counts = np.bincount(drawn, minlength=outputs)
    keep = counts > 0  # outputs never sampled carry no loss; the predicted optimum gives them no mass
    w = counts / samples
    sample_adv = group_baseline_advantages(rewards[drawn], objective, beta, beta1, shift)
    adv = np.zeros(outputs)
    adv[keep] = [sample_adv[drawn == k][0] for k in np.flatnonzero(keep)]  # the baseline is shared: A is per output

    theta = torch.zeros(outputs, dtype=torch.float64, requires_grad=True)
    w_t, b_t, a_t = (torch.tensor(x, dtype=torch.float64) for x in (w, behaviour, adv))
    optimizer = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        log_pi = torch.log_softmax(theta, 0)
        loss = (w_t * (beta * (log_pi - b_t.log()) - a_t) ** 2).sum()
        loss.backward()
        return loss

    for _ in range(20):
        optimizer.step(closure)
    fitted = torch.softmax(theta, 0).detach().numpy()

    target = lambert.solve(adv[keep] - beta * np.log(w[keep] / behaviour[keep]), beta, weights=w[keep])
    induced = np.zeros(outputs)
    induced[keep] = target.induced
    boltzmann = behaviour * np.exp((adv - adv.max()) / beta)
    boltzmann /= boltzmann.sum()
    group = lambert.solve(sample_adv, beta)  # the group diagnostic roll records: weights 1/N over the samples
    return {
        "objective": objective, "beta": beta, "beta1": beta1, "m": target.m, "k": target.k, "regime": target.regime,
        "group_k": group.k, "group_regime": group.regime,
        "tv_to_lambert": 0.5 * float(np.abs(fitted - induced).sum()),
        "tv_to_boltzmann": 0.5 * float(np.abs(fitted - boltzmann).sum()),
    }
