"""Hand-computed checks of `dpo.dpo_loss` (DPO, arXiv:2305.18290 Eq. 7, with cDPO label smoothing).

Notation: h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], z = beta * h,
    loss(z) = (1 - eps) * softplus(-z) + eps * softplus(z)      (= -(1-eps) log s(z) - eps log s(-z)),
    d loss / d z = -(1 - eps) * s(-z) + eps * s(z),               s = logistic sigmoid.
Expected numbers are computed here with the `math` module only (never torch.nn.functional / dpo_loss).
"""
import math

import pytest
import torch

from dpo import dpo_loss
from helpers import sigmoid, softplus

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected): dyadic numbers, exact in float32 and float64,
# so h is exact in both dtypes and the only rounding is inside the loss itself.
CASES = [
    (-12.5, -15.25, -13.0, -14.75),  # h = 1.0
    (-3.0, -2.0, -2.5, -3.5),  # h = -2.0
    (-40.0, -40.0, -40.0, -40.0),  # h = 0
    (-7.75, -20.5, -9.0, -18.0),  # h = 3.75
    (-1.0, -0.5, -6.0, -0.125),  # h = 5.375
]
BETAS = [0.1, 0.5, 2.0]
EPSILONS = [0.0, 0.1, 0.25, 0.5]
# float64: the loss is a handful of correctly-rounded ops, error is O(10) ulp ~ 1e-15, so 1e-12 has wide margin.
# float32: beta is rounded to float32 (rel. 6e-8) and the relative condition number of softplus(-z) is <= max(1, |z|)
# (|z| <= 9.25 here), plus a few ulp of op rounding: ~1e-6 worst case, so rtol 1e-5.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def hand_h(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def hand_loss(z, eps):
    return (1 - eps) * softplus(-z) + eps * softplus(z)


def hand_dloss_dz(z, eps):
    return -(1 - eps) * sigmoid(-z) + eps * sigmoid(z)


def as_tensors(rows, dtype, requires_grad=False):
    """rows of (pc, pr, rc, rr) -> four (B,) tensors."""
    return [torch.tensor(col, dtype=dtype, requires_grad=requires_grad) for col in zip(*rows)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", EPSILONS)
def test_loss_and_rewards_match_hand_values(dtype, beta, eps):
    """loss = (1-eps) softplus(-beta h) + eps softplus(beta h); rewards = beta (log pi - log ref); shape/dtype kept."""
    inputs = as_tensors(CASES, dtype)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    for out in (losses, chosen_rewards, rejected_rewards):
        assert out.shape == (len(CASES),) and out.dtype == dtype
    expected_loss = [hand_loss(beta * hand_h(*c), eps) for c in CASES]
    expected_chosen = [beta * (pc - rc) for pc, _, rc, _ in CASES]
    expected_rejected = [beta * (pr - rr) for _, pr, _, rr in CASES]
    pairs = [(losses, expected_loss), (chosen_rewards, expected_chosen), (rejected_rewards, expected_rejected)]
    for got, want in pairs:
        torch.testing.assert_close(got, torch.tensor(want, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("h", [0.0, 0.75, -3.0, 40.0])
def test_eps_half_is_log_2cosh_not_constant(beta, h):
    """eps = 1/2: loss = [softplus(-z) + softplus(z)]/2 = log(2 cosh(z/2)), z = beta h.

    It equals log 2 only at h = 0 and is even in h; its gradient (1/2) tanh(z/2) pulls h to 0, so a fully random
    label makes DPO keep pi = pi_ref rather than be indifferent (it is not a constant log 2)."""
    z = beta * h
    want = math.log(2 * math.cosh(z / 2))
    pc = torch.tensor([h, -h], dtype=torch.float64, requires_grad=True)  # h and -h in one batch
    zeros = torch.zeros(2, dtype=torch.float64)
    losses, _, _ = dpo_loss(pc, zeros, zeros, zeros, beta=beta, label_smoothing=0.5)
    torch.testing.assert_close(losses, torch.tensor([want, want], dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (h == 0.0) == math.isclose(want, math.log(2), rel_tol=1e-12)
    losses.sum().backward()
    g = beta * 0.5 * math.tanh(z / 2)
    torch.testing.assert_close(pc.grad, torch.tensor([g, -g], dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_rewards_are_detached_and_loss_is_not():
    inputs = as_tensors(CASES, torch.float64, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs, beta=0.5, label_smoothing=0.1)
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    assert chosen_rewards.grad_fn is None and rejected_rewards.grad_fn is None


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", EPSILONS)
def test_gradient_matches_hand_formula_and_direction(beta, eps):
    """d loss/d pi_chosen = beta [-(1-eps) s(-z) + eps s(z)] = -d/d pi_rejected = -d/d ref_chosen = d/d ref_rejected.

    Direction: with eps = 0 it is < 0 for chosen (raise y_w) and > 0 for rejected (lower y_l) for every h. With cDPO
    it is < 0 iff z < log((1-eps)/eps) = logit(1-eps): past that margin cDPO pushes back instead of growing h."""
    inputs = as_tensors(CASES, torch.float64, requires_grad=True)
    losses, _, _ = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    losses.sum().backward()  # pairs are independent, so each input's grad is its own pair's derivative
    zs = [beta * hand_h(*c) for c in CASES]
    g = torch.tensor([beta * hand_dloss_dz(z, eps) for z in zs], dtype=torch.float64)
    for x, sign in zip(inputs, (1, -1, -1, 1)):
        torch.testing.assert_close(x.grad, sign * g, rtol=1e-12, atol=1e-15)
    margin = math.inf if eps == 0 else math.log((1 - eps) / eps)
    pc_grad, pr_grad = inputs[0].grad, inputs[1].grad
    for z, gc, gr in zip(zs, pc_grad.tolist(), pr_grad.tolist()):
        if z != margin:
            assert (gc < 0) == (z < margin) and (gr > 0) == (z < margin)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("h_sign", [1, -1])
def test_huge_margins_are_finite_and_asymptotically_linear(dtype, beta, eps, h_sign):
    """|h| = 1e4: no overflow/NaN. loss -> (1-eps) max(-z, 0) + eps max(z, 0), i.e. ~0 (eps = 0, h > 0) or ~beta|h|,
    and d loss/d pi_chosen -> -beta(1-eps) (h < 0) or +beta eps (h > 0); the remainder e^{-|z|} underflows."""
    pc, pr, rc, rr = [h_sign * v for v in (0.0, -5000.0, -5000.0, 0.0)]  # h = h_sign * 1e4, exact in both dtypes
    inputs = as_tensors([(pc, pr, rc, rr)], dtype, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    losses.sum().backward()
    z = beta * h_sign * 1e4
    asymptote = (1 - eps) * max(-z, 0.0) + eps * max(z, 0.0)
    assert hand_loss(z, eps) == asymptote  # the exp(-|z|) correction is below double precision
    assert torch.isfinite(losses).all() and all(torch.isfinite(x.grad).all() for x in inputs)
    if asymptote == 0.0:
        assert losses.item() == 0.0
    torch.testing.assert_close(losses, torch.tensor([asymptote], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(
        inputs[0].grad, torch.tensor([beta * (-(1 - eps) if z < 0 else eps)], dtype=dtype), **TOL[dtype]
    )
    torch.testing.assert_close(chosen_rewards, torch.tensor([beta * (pc - rc)], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(rejected_rewards, torch.tensor([beta * (pr - rr)], dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("batch", [1, 3, 257])
def test_random_batches_elementwise(batch):
    """(B,) in -> (B,) out for any B, each element equal to the scalar hand formula (random, realistic log-probs)."""
    gen = torch.Generator().manual_seed(batch)
    inputs = list(-60.0 * torch.rand(4, batch, generator=gen, dtype=torch.float64))
    losses, chosen_rewards, rejected_rewards = dpo_loss(*inputs, beta=0.3, label_smoothing=0.2)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (batch,)
    rows = list(zip(*(x.tolist() for x in inputs)))
    want = torch.tensor([hand_loss(0.3 * hand_h(*c), 0.2) for c in rows], dtype=torch.float64)
    torch.testing.assert_close(losses, want, rtol=1e-12, atol=1e-12)
