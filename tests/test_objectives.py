"""Objectives: losses against hand-computed values, gradients against finite differences, advantages by hand."""
from __future__ import annotations

import math

import pytest
import torch

from roll.objectives import OBJECTIVES, Batch, ObjectiveConfig, soft_value


def small_batch(dtype=torch.float64, requires_grad=False) -> Batch:
    """Two completions: the first of 2 tokens, the second of 1 (its second slot is padding)."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=dtype, requires_grad=requires_grad)
    return Batch(
        logprobs=logprobs,
        behaviour_logprobs=torch.tensor([[-1.2, -1.8], [-0.7, 0.0]], dtype=dtype),
        ref_logprobs=torch.tensor([[-1.1, -2.1], [-0.4, 0.0]], dtype=dtype),
        mask=torch.tensor([[True, True], [True, False]]),
        advantages=torch.tensor([1.0, -0.5], dtype=dtype),
    )


E = math.exp
# Hand derivations on small_batch, β = 0.1, ε = 0.2. Token log-ratios vs π_b: +0.2, −0.2 | +0.2.
#   ppo: ratios e^.2 = 1.2214, e^-.2 = 0.8187 | 1.2214; clipped 1.2, 0.8187 | 1.2.
#        A=+1: min(1.2214, 1.2) = 1.2, min(0.8187, 0.8187) = 0.8187; A=−0.5: min(−0.6107, −0.6) = −0.6107.
#        loss = −(1.2 + e^-.2 − 0.5·e^.2)/3
#   cispo: weights sg(min(ρ, 1.2)) = 1.2, e^-.2 | 1.2; loss = −(1.2·1·(−1) + e^-.2·1·(−2) + 1.2·(−0.5)·(−0.5))/3
#   pg:  loss = −(1·(−1) + 1·(−2) + (−0.5)·(−0.5))/3 = 2.75/3
#   regression vs π_b: Δ = (0.2 − 0.2, 0.2) = (0, 0.2): loss = ((0 − 1)² + (0.02 + 0.5)²)/2 = (1 + 0.2704)/2
#   apo vs π_ref: Δ_ref = (0.1 + 0.1, −0.1) = (0.2, −0.1): loss = ((0.02 − 1)² + (−0.01 + 0.5)²)/2 = (0.9604 + 0.2401)/2
EXPECTED_LOSS = {
    "ppo": -(1.2 + E(-0.2) - 0.5 * E(0.2)) / 3,
    "cispo": -(1.2 * -1.0 + E(-0.2) * -2.0 + 1.2 * -0.5 * -0.5) / 3,
    "pg": 2.75 / 3,
    "oapl": (1 + 0.2704) / 2,
    "pmd-mean": (1 + 0.2704) / 2,
    "stable-pess": (1 + 0.2704) / 2,
    "apo": (0.9604 + 0.2401) / 2,
}


def test_every_registered_objective_has_a_hand_computed_loss():
    assert set(EXPECTED_LOSS) == set(OBJECTIVES)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_matches_hand_computed_value(name):
    loss, _ = OBJECTIVES[name].loss(small_batch(), ObjectiveConfig(beta=0.1))
    assert loss.item() == pytest.approx(EXPECTED_LOSS[name], abs=1e-12)


def test_ppo_literals_and_clip_fraction():
    loss, metrics = OBJECTIVES["ppo"].loss(small_batch(), ObjectiveConfig())
    assert loss.item() == pytest.approx(-0.4693432, abs=1e-7)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)  # only the first token's clip is active


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"cispo"}))
@pytest.mark.parametrize("kl_ref", [0.0, 0.05])
def test_gradient_matches_finite_differences(name, kl_ref):
    config = ObjectiveConfig(beta=0.1, kl_ref=kl_ref)
    batch = small_batch(requires_grad=True)

    def loss_of(logprobs):
        return OBJECTIVES[name].loss(Batch(logprobs, batch.behaviour_logprobs, batch.ref_logprobs, batch.mask,
                                           batch.advantages), config)[0]

    assert torch.autograd.gradcheck(loss_of, (batch.logprobs,), eps=1e-6, atol=1e-7)


def test_cispo_gradient_treats_the_capped_weight_as_a_constant():
    """CISPO's weight is stop-gradient, so finite differences of its value would differ by design; its
    gradient is −sg(min(ρ, 1+ε))·Â/N per token: (−1.2·1, −e^-.2·1 | −1.2·(−0.5))/3."""
    batch = small_batch(requires_grad=True)
    loss, _ = OBJECTIVES["cispo"].loss(batch, ObjectiveConfig())
    loss.backward()
    expected = torch.tensor([[-1.2, -E(-0.2)], [0.6, 0.0]], dtype=torch.float64) / 3
    assert torch.allclose(batch.logprobs.grad, expected, atol=1e-12)


def test_kl_ref_term_is_k3_token_mean():
    config = ObjectiveConfig(kl_ref=0.5)
    base, _ = OBJECTIVES["pg"].loss(small_batch(), ObjectiveConfig())
    with_kl, _ = OBJECTIVES["pg"].loss(small_batch(), config)
    # log π_ref − log π_θ per token: −0.1, −0.1 | +0.1; k3(x) = e^x − 1 − x
    expected = 0.5 * (2 * (E(-0.1) - 1 + 0.1) + (E(0.1) - 1 - 0.1)) / 3
    assert (with_kl - base).item() == pytest.approx(expected, abs=1e-12)


def test_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    cfg = ObjectiveConfig(beta=0.1, beta1=0.2, shift=1.0)
    # std (unbiased, as TRL): sqrt(4·0.25/3) = 0.57735; (±0.5)/(0.57735 + 1e-6)
    assert OBJECTIVES["ppo"].advantage(r, cfg).tolist() == pytest.approx([0.5 / (math.sqrt(1 / 3) + 1e-6) * s for s in (1, -1, -1, 1)])
    assert OBJECTIVES["pmd-mean"].advantage(r, cfg).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert OBJECTIVES["stable-pess"].advantage(r, cfg).tolist() == pytest.approx([0.6, -0.4, -0.4, 0.6])
    v_hat = 0.2 * math.log((E(5) + 1) / 2)  # β₁·log mean e^{r/β₁} = 0.2·log((2e^5 + 2)/4)
    assert OBJECTIVES["oapl"].advantage(r, cfg).tolist() == pytest.approx([1 - v_hat, -v_hat, -v_hat, 1 - v_hat])
    assert OBJECTIVES["apo"].advantage(r, cfg, torch.tensor(0.3)).tolist() == pytest.approx([0.7, -0.3, -0.3, 0.7])
    assert soft_value(torch.tensor([2.0] * 3, dtype=torch.float64), 1e-3).item() == pytest.approx(2.0)
    assert OBJECTIVES["ppo"].advantage(torch.zeros(4, dtype=torch.float64), cfg).tolist() == [0.0] * 4
