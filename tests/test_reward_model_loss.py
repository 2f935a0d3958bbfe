"""Hand-computed checks of `reward_model.reward_loss` (Bradley-Terry, arXiv:2203.02155 Eq. 1; margin, Llama 2 Eq. 2;
centring, arXiv:2312.09244).

Notation: d = r_w - r_l - m, s = r_w + r_l, s(.) the logistic sigmoid,
    loss = softplus(-d) + c s^2                        (= -log s(d) + c (r_w + r_l)^2),
    d loss / d r_w = -s(-d) + 2 c s,    d loss / d r_l = s(-d) + 2 c s,    d loss / d m = s(-d).
Expected numbers are computed here with the `math` module only (never torch.nn.functional / reward_loss).
"""
import math

import pytest
import torch

from helpers import sigmoid, softplus
from reward_model import reward_loss

# (r_w, r_l, m): dyadic numbers, exact in float32 and float64, so d and s are exact in both dtypes.
CASES = [
    (1.5, 0.25, 0.0),  # d = 1.25
    (-2.0, 0.5, 0.5),  # d = -3
    (0.75, 0.75, 0.0),  # d = 0: a tie
    (3.0, -1.0, 1.0),  # d = 3
    (0.5, -0.125, 2.0),  # d = -1.375: right order, but short of the margin
]
COEFS = [0.0, 0.01, 0.5]
# float64: a handful of correctly rounded ops, ~1e-15. float32: relative condition number of softplus(-d) is
# <= max(1, |d|) <= 3 here, c s^2 <= 2 is a product of exact-ish numbers, plus a few ulp: 1e-6 relative at worst.
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def hand_loss(rw, rl, m, c):
    return softplus(-(rw - rl - m)) + c * (rw + rl) ** 2


def columns(rows, dtype, requires_grad=False):
    """rows of (r_w, r_l, m) -> three (B,) tensors."""
    return [torch.tensor(col, dtype=dtype, requires_grad=requires_grad) for col in zip(*rows)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("coef", COEFS)
@pytest.mark.parametrize("with_margin", [False, True])
def test_loss_matches_hand_values(dtype, coef, with_margin):
    """loss = softplus(-(r_w - r_l - m)) + c (r_w + r_l)^2 per pair; r_w, r_l come back unchanged;
    shape and dtype kept."""
    chosen, rejected, margin = columns(CASES, dtype)
    losses, chosen_out, rejected_out = reward_loss(chosen, rejected, margin if with_margin else None, coef)
    for out in (losses, chosen_out, rejected_out):
        assert out.shape == (len(CASES),) and out.dtype == dtype
    want = [hand_loss(rw, rl, m if with_margin else 0.0, coef) for rw, rl, m in CASES]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=dtype), **TOL[dtype])
    assert torch.equal(chosen_out, chosen) and torch.equal(rejected_out, rejected)


def test_values_by_hand():
    """Three numbers worked out on paper: log 2 at a tie, log(1 + e^-1) = 0.31326..., and with a margin and centring
    softplus(-(1 - 0 - 2)) + 0.5 * 1^2 = log(1 + e) + 0.5 = 1.81326..."""
    losses, _, _ = reward_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(losses, torch.tensor([math.log(2), math.log1p(math.exp(-1))]))
    losses, _, _ = reward_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0]), 0.5)
    torch.testing.assert_close(losses, torch.tensor([math.log1p(math.e) + 0.5]))


def test_zero_margin_and_zero_coef_are_the_plain_loss():
    chosen, rejected, _ = columns(CASES, torch.float64)
    plain, _, _ = reward_loss(chosen, rejected)
    zero, _, _ = reward_loss(chosen, rejected, torch.zeros(len(CASES), dtype=torch.float64), 0.0)
    assert torch.equal(plain, zero)


def test_rewards_are_detached_and_loss_is_not():
    chosen, rejected, margin = columns(CASES, torch.float64, requires_grad=True)
    losses, chosen_out, rejected_out = reward_loss(chosen, rejected, margin, 0.01)
    assert losses.requires_grad
    assert chosen_out.grad_fn is None and rejected_out.grad_fn is None and not chosen_out.requires_grad


@pytest.mark.parametrize("coef", COEFS)
def test_gradient_matches_hand_formula_and_direction(coef):
    """d/d r_w = -s(-d) + 2 c (r_w + r_l), d/d r_l = s(-d) + 2 c (r_w + r_l), d/d m = s(-d).

    Direction: without centring, descent always raises r_w and lowers r_l, and does so the more the pair falls short
    of its margin (s(-d) grows as d falls); the margin's gradient is positive, so a larger m asks for a larger gap."""
    chosen, rejected, margin = columns(CASES, torch.float64, requires_grad=True)
    losses, _, _ = reward_loss(chosen, rejected, margin, coef)
    losses.sum().backward()  # pairs are independent, so each input's grad is its own pair's derivative
    pull = [sigmoid(-(rw - rl - m)) for rw, rl, m in CASES]
    centre = [2 * coef * (rw + rl) for rw, rl, _ in CASES]
    want = {
        "chosen": [-p + q for p, q in zip(pull, centre)],
        "rejected": [p + q for p, q in zip(pull, centre)],
        "margin": pull,
    }
    for name, x in (("chosen", chosen), ("rejected", rejected), ("margin", margin)):
        torch.testing.assert_close(x.grad, torch.tensor(want[name], dtype=torch.float64), rtol=1e-12, atol=1e-15)
    if coef == 0.0:
        assert (chosen.grad < 0).all() and (rejected.grad > 0).all() and (margin.grad > 0).all()
        order = sorted(range(len(CASES)), key=lambda i: CASES[i][0] - CASES[i][1] - CASES[i][2])  # by d, rising
        assert [abs(chosen.grad[i].item()) for i in order] == sorted((abs(g) for g in chosen.grad.tolist()),
                                                                     reverse=True)


def test_bradley_terry_part_ignores_a_shared_shift_and_centring_does_not():
    """Adding a constant to both scores leaves -log s(r_w - r_l) unchanged: the reward is identified only up to a
    per-prompt constant. The centring term breaks that tie: its gradient along the shift, 2 c (r_w + r_l) * 2 per
    pair, vanishes only where r_w + r_l = 0."""
    chosen, rejected, margin = columns(CASES, torch.float64)
    base, _, _ = reward_loss(chosen, rejected, margin)
    shifted, _, _ = reward_loss(chosen + 7.0, rejected + 7.0, margin)
    torch.testing.assert_close(base, shifted, rtol=1e-12, atol=1e-12)
    shift = torch.zeros((), dtype=torch.float64, requires_grad=True)
    losses, _, _ = reward_loss(chosen + shift, rejected + shift, margin, 0.5)
    losses.sum().backward()
    want = sum(2 * 0.5 * (rw + rl) * 2 for rw, rl, _ in CASES)
    assert math.isclose(shift.grad.item(), want, rel_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sign", [1, -1])
def test_huge_gaps_are_finite_and_asymptotically_linear(dtype, sign):
    """|r_w - r_l| = 1e4: no overflow or NaN; loss -> max(-d, 0) and d loss/d r_w -> -1 (d < 0) or 0 (d > 0)."""
    chosen, rejected, _ = columns([(sign * 5000.0, -sign * 5000.0, 0.0)], dtype, requires_grad=True)
    losses, _, _ = reward_loss(chosen, rejected)
    losses.sum().backward()
    d = sign * 1e4
    assert softplus(-d) == max(-d, 0.0)  # the e^-|d| correction is below double precision
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
    torch.testing.assert_close(losses, torch.tensor([max(-d, 0.0)], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(chosen.grad, torch.tensor([-1.0 if d < 0 else 0.0], dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("batch", [1, 3, 257])
def test_random_batches_elementwise(batch):
    """(B,) in -> (B,) out for any B, each element equal to the scalar hand formula."""
    gen = torch.Generator().manual_seed(batch)
    chosen, rejected, margin = 8 * torch.rand(3, batch, generator=gen, dtype=torch.float64) - 4
    losses, _, _ = reward_loss(chosen, rejected, margin, 0.01)
    assert losses.shape == (batch,)
    want = [hand_loss(*row, 0.01) for row in zip(chosen.tolist(), rejected.tolist(), margin.tolist())]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
