"""Objectives: losses against hand-computed values, gradients against finite differences, advantages by hand."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from roll import lambert
from roll.objectives import OBJECTIVES, Batch, ObjectiveConfig, m2_mask, soft_value


def small_batch(dtype=torch.float64, requires_grad=False) -> Batch:
    """Two completions: the first of 2 tokens, the second of 1 (its second slot is padding)."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=dtype, requires_grad=requires_grad)
    return Batch(
        logprobs=logprobs,
        behaviour_logprobs=torch.tensor([[-1.2, -1.8], [-0.7, 0.0]], dtype=dtype),
        ref_logprobs=torch.tensor([[-1.1, -2.1], [-0.4, 0.0]], dtype=dtype),
        mask=torch.tensor([[True, True], [True, False]]),
        advantages=torch.tensor([1.0, -0.5], dtype=dtype),
        parent_logprobs=torch.tensor([[-1.1, -1.9], [-0.6, 0.0]], dtype=dtype),
        sequence_weights=torch.tensor([1.5, 0.5], dtype=dtype),
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
#   m2po, τ = 0.05: (log ρ)² = 0.04 each, mean 0.04 ≤ τ, nothing masked: loss = −(e^.2 − ... ) = −(e^.2 + e^-.2 − 0.5·e^.2)/3
#   decoupled-ppo: π_prox log-probs −1.1, −1.9 | −0.6: r = π_θ/π_prox = e^.1, e^-.1 | e^.1 (inside [0.8, 1.2]: no
#        clip), w = π_prox/π_b = e^.1, e^-.1 | e^.1 (≤ 5): loss = −(e^.1·e^.1 + e^-.1·e^-.1 − 0.5·e^.1·e^.1)/3
CONFIG = ObjectiveConfig(beta=0.1, m2_budget=0.05)  # τ above the batch's 0.04: the boundary case is tested apart
EXPECTED_LOSS = {
    "ppo": -(1.2 + E(-0.2) - 0.5 * E(0.2)) / 3,
    "m2po": -(E(0.2) + E(-0.2) - 0.5 * E(0.2)) / 3,
    "decoupled-ppo": -(E(0.1) * E(0.1) + E(-0.1) * E(-0.1) - 0.5 * E(0.1) * E(0.1)) / 3,
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
    loss, _ = OBJECTIVES[name].loss(small_batch(), CONFIG)
    assert loss.item() == pytest.approx(EXPECTED_LOSS[name], abs=1e-12)


def test_ppo_literals_and_clip_fraction():
    loss, metrics = OBJECTIVES["ppo"].loss(small_batch(), ObjectiveConfig())
    assert loss.item() == pytest.approx(-0.4693432, abs=1e-7)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)  # only the first token's clip is active


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - {"cispo"}))
@pytest.mark.parametrize("kl_ref", [0.0, 0.05])
def test_gradient_matches_finite_differences(name, kl_ref):
    config = ObjectiveConfig(beta=0.1, kl_ref=kl_ref, m2_budget=0.05)
    batch = small_batch(requires_grad=True)

    def loss_of(logprobs):
        return OBJECTIVES[name].loss(dataclasses.replace(batch, logprobs=logprobs), config)[0]

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
    cfg = ObjectiveConfig(beta=0.1, beta1=0.2)  # each objective's own shift: 1 for stable-pess, 0 for the others
    # std (unbiased, as TRL): sqrt(4·0.25/3) = 0.57735; (±0.5)/(0.57735 + 1e-6)
    assert OBJECTIVES["ppo"].advantage(r, cfg).tolist() == pytest.approx([0.5 / (math.sqrt(1 / 3) + 1e-6) * s for s in (1, -1, -1, 1)])
    assert OBJECTIVES["pmd-mean"].advantage(r, cfg).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert OBJECTIVES["stable-pess"].advantage(r, cfg).tolist() == pytest.approx([0.6, -0.4, -0.4, 0.6])
    v_hat = 0.2 * math.log((E(5) + 1) / 2)  # β₁·log mean e^{r/β₁} = 0.2·log((2e^5 + 2)/4)
    assert OBJECTIVES["oapl"].advantage(r, cfg).tolist() == pytest.approx([1 - v_hat, -v_hat, -v_hat, 1 - v_hat])
    assert OBJECTIVES["apo"].advantage(r, cfg, torch.tensor(0.3)).tolist() == pytest.approx([0.7, -0.3, -0.3, 0.7])
    assert soft_value(torch.tensor([2.0] * 3, dtype=torch.float64), 1e-3).item() == pytest.approx(2.0)
    assert OBJECTIVES["ppo"].advantage(torch.zeros(4, dtype=torch.float64), cfg).tolist() == [0.0] * 4


# ------------------------------------------------------------------ the frontier's objectives (issue 20)


def test_m2_mask_drops_the_largest_squares_until_the_rest_is_within_budget():
    """log ρ = 0.5, −0.1, 0.3, 0.05 (and a padded slot of 9, outside the mask). Squares 0.25, 0.01, 0.09, 0.0025;
    dropping none leaves mean 0.3525/4 = 0.088 > 0.04, dropping the 0.25 leaves 0.1025/3 = 0.0342 ≤ 0.04: only the
    first token goes. With τ = 0.001 no suffix qualifies and only the smallest (0.05) is kept."""
    log_ratio = torch.tensor([[0.5, -0.1, 9.0], [0.3, 0.05, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, False]])
    assert m2_mask(log_ratio, mask, 0.04).tolist() == [[False, True, False], [True, True, False]]
    assert m2_mask(log_ratio, mask, 0.001).tolist() == [[False, False, False], [False, True, False]]
    assert m2_mask(log_ratio, mask, 1.0).tolist() == mask.tolist()


def test_m2po_loss_and_masked_share_by_hand():
    """The same four tokens as one batch of two sequences, A = (1, −0.5): kept tokens −0.1 | 0.3, 0.05, so
    loss = −(e^-0.1·1 + e^0.3·(−0.5) + e^0.05·(−0.5))/4, and a quarter of the tokens is masked."""
    logprobs = torch.tensor([[0.5, -0.1], [0.3, 0.05]], dtype=torch.float64)
    batch = Batch(logprobs=logprobs, behaviour_logprobs=torch.zeros(2, 2, dtype=torch.float64),
                  ref_logprobs=torch.zeros(2, 2, dtype=torch.float64), mask=torch.ones(2, 2, dtype=torch.bool),
                  advantages=torch.tensor([1.0, -0.5], dtype=torch.float64))
    loss, metrics = OBJECTIVES["m2po"].loss(batch, ObjectiveConfig())
    assert loss.item() == pytest.approx(-(E(-0.1) - 0.5 * E(0.3) - 0.5 * E(0.05)) / 4, abs=1e-12)
    assert metrics["clip_fraction"] == 0.25


def test_decoupled_ppo_clips_around_the_parent_and_drops_tokens_above_the_weight_cap():
    """π_θ − π_prox = +0.5, 0 | 0 (r = e^.5 clipped to 1.2 for A = +1), π_prox − π_b = 0, log 6 | 0.1: the second
    token's w = 6 > C = 5 leaves the sum (not the denominator). loss = −(1.2·1 + 0 + e^.1·1·(−0.5))/3; two of
    three tokens are clipped or dropped."""
    parent = torch.tensor([[-1.0, -1.0], [-1.0, 0.0]], dtype=torch.float64)
    batch = Batch(logprobs=parent + torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=torch.float64),
                  behaviour_logprobs=parent - torch.tensor([[0.0, math.log(6)], [0.1, 0.0]], dtype=torch.float64),
                  ref_logprobs=parent, mask=torch.tensor([[True, True], [True, False]]),
                  advantages=torch.tensor([1.0, -0.5], dtype=torch.float64), parent_logprobs=parent)
    loss, metrics = OBJECTIVES["decoupled-ppo"].loss(batch, ObjectiveConfig())
    assert loss.item() == pytest.approx(-(1.2 - 0.5 * E(0.1)) / 3, abs=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("other", ["decoupled-ppo", "m2po"])
def test_at_the_behaviour_policy_decoupled_ppo_and_m2po_are_ppo_exactly(other):
    """One step from π_b (lag 0): π_θ = π_prox = π_b on the first step, so w = 1, r = ρ, and (log ρ)² = 0 ≤ τ.
    The losses and gradients are equal bit for bit, at ratios of exactly 1 and at any other π_θ for decoupled-ppo."""
    base = small_batch()
    for logprobs in (base.behaviour_logprobs.clone(), base.logprobs.clone()):
        if other == "m2po" and not torch.equal(logprobs, base.behaviour_logprobs):
            continue  # m2po drops the clip; they coincide only at ρ = 1
        grads = {}
        for name in ("ppo", other):
            x = logprobs.clone().requires_grad_(True)
            batch = dataclasses.replace(base, logprobs=x, parent_logprobs=base.behaviour_logprobs)
            loss, _ = OBJECTIVES[name].loss(batch, ObjectiveConfig())
            loss.backward()
            grads[name] = (loss.item(), x.grad)
        assert grads["ppo"][0] == grads[other][0] and torch.equal(grads["ppo"][1], grads[other][1])


def test_the_parent_anchor_regresses_against_the_parent_with_sequence_weights():
    """Δ against π_prox: (0.1 − 0.1, 0.1) = (0, 0.1); weights (1.5, 0.5):
    loss = (1.5·(0 − 1)² + 0.5·(0.01 + 0.5)²)/2. Where π_prox = π_b and the weights are 1, it is the behaviour
    anchor's loss exactly."""
    config = ObjectiveConfig(beta=0.1, anchor="parent")
    for name in ("oapl", "pmd-mean", "stable-pess"):
        loss, _ = OBJECTIVES[name].loss(small_batch(), config)
        assert loss.item() == pytest.approx((1.5 + 0.5 * 0.51 ** 2) / 2, abs=1e-12)
        same = dataclasses.replace(small_batch(), parent_logprobs=small_batch().behaviour_logprobs,
                                   sequence_weights=torch.ones(2, dtype=torch.float64))
        assert OBJECTIVES[name].loss(same, config)[0].item() == OBJECTIVES[name].loss(same, CONFIG)[0].item()


def test_every_regression_objective_takes_a_shift_and_keeps_its_default():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    v_hat = 0.2 * math.log((E(5) + 1) / 2)
    shifted = ObjectiveConfig(beta=0.1, shift=5.0)
    assert OBJECTIVES["oapl"].advantage(r, shifted).tolist() == pytest.approx([1.5 - v_hat, 0.5 - v_hat, 0.5 - v_hat, 1.5 - v_hat])
    assert OBJECTIVES["pmd-mean"].advantage(r, shifted).tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0])
    assert OBJECTIVES["apo"].advantage(r, shifted, torch.tensor(0.3)).tolist() == pytest.approx([1.2, 0.2, 0.2, 1.2])
    default = ObjectiveConfig(beta=0.1)  # shift None: stable-pess 1, the others 0
    assert OBJECTIVES["stable-pess"].advantage(r, default).tolist() == pytest.approx([0.6, -0.4, -0.4, 0.6])
    assert OBJECTIVES["oapl"].advantage(r, default).tolist() == pytest.approx([1 - v_hat, -v_hat, -v_hat, 1 - v_hat])


def test_under_the_parent_measure_the_baselines_are_weighted_and_stable_pess_keeps_k_at_least_s():
    """Weights (3, 1, 1, 3)/2 on rewards (1, 0, 0, 1): the weighted mean is 6/8 = 0.75 and the weighted soft value
    β₁·log((3e^5 + 1 + 1 + 3e^5)/8). Under those weights stable-pess's k ≥ s holds (Jensen with weights); with the
    unweighted mean it need not."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    w = torch.tensor([1.5, 0.5, 0.5, 1.5], dtype=torch.float64)
    config = ObjectiveConfig(beta=0.1)
    assert OBJECTIVES["pmd-mean"].advantage(r, config, None, w).tolist() == pytest.approx([0.25, -0.75, -0.75, 0.25])
    v_w = 0.2 * math.log((6 * E(5) + 2) / 8)
    assert OBJECTIVES["oapl"].advantage(r, config, None, w).tolist() == pytest.approx([1 - v_w, -v_w, -v_w, 1 - v_w])
    for weights in ([1.5, 0.5, 0.5, 1.5], [0.1, 1.9, 1.9, 0.1], [3.7, 0.1, 0.1, 0.1]):
        adv = OBJECTIVES["stable-pess"].advantage(r, config, None, torch.tensor(weights, dtype=torch.float64))
        assert lambert.solve(adv.numpy(), 0.1, weights).k >= 1.0 - 1e-9
    unweighted = OBJECTIVES["stable-pess"].advantage(r, config)  # u = (6, −4, −4, 6): m < 0 with these weights
    target = lambert.solve(unweighted.numpy(), 0.1, [0.001, 1.999, 1.999, 0.001])
    assert target.m < 0 and target.regime.startswith("optimistic")  # not even pessimistic, let alone k ≥ 1
