"""Hand-computed checks of `ipo.ipo_loss` (IPO, arXiv:2310.12036 Eq. 17).

Notation: h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)], and beta is the paper's tau:
    loss = (h - 1/(2 beta))^2,        d loss / d h = 2 (h - 1/(2 beta)).
Every expected number below is written out by hand (or computed with plain Python arithmetic), never with ipo_loss.
"""
import pytest
import torch

from ipo import ipo_loss

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, h, expected loss): dyadic inputs, exact in float32
CASES = [
    (-12.5, -15.25, -13.0, -14.75, 0.5, 1.0, 0.0),  # h = 1 = 1/(2*0.5): on target, no loss
    (-3.0, -2.0, -2.5, -3.5, 0.5, -2.0, 9.0),  # (-2 - 1)^2
    (-40.0, -40.0, -40.0, -40.0, 0.25, 0.0, 4.0),  # the reference itself: (0 - 2)^2
    (-7.75, -20.5, -9.0, -18.0, 0.25, 3.75, 3.0625),  # (3.75 - 2)^2 = 1.75^2: past the target, pulled back
    (-1.0, -0.5, -6.0, -0.125, 2.0, 5.375, 26.265625),  # (5.375 - 0.25)^2 = 5.125^2
]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-6, atol=1e-6)}


def test_hand_values_are_consistent():
    """The table's h and losses, rechecked with plain arithmetic, so a typo in CASES cannot pass silently."""
    for pc, pr, rc, rr, beta, h, loss in CASES:
        assert (pc - rc) - (pr - rr) == h
        assert (h - 1 / (2 * beta)) ** 2 == loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=[f"h={c[5]}" for c in CASES])
def test_loss_and_rewards_match_hand_values(dtype, case):
    pc, pr, rc, rr, beta, _, loss = case
    losses, chosen_rewards, rejected_rewards = ipo_loss(*(torch.tensor([v], dtype=dtype) for v in (pc, pr, rc, rr)),
                                                        beta=beta)
    for out in (losses, chosen_rewards, rejected_rewards):
        assert out.shape == (1,) and out.dtype == dtype
    torch.testing.assert_close(losses, torch.tensor([loss], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(chosen_rewards, torch.tensor([beta * (pc - rc)], dtype=dtype), **TOL[dtype])
    torch.testing.assert_close(rejected_rewards, torch.tensor([beta * (pr - rr)], dtype=dtype), **TOL[dtype])


def test_gradient_points_to_the_target_from_both_sides():
    """d loss/d pi_chosen = 2 (h - 1/(2 beta)) = -d/d pi_rejected: negative below the target (raise y_w, lower y_l),
    positive above it (IPO pulls an over-confident pair back, where DPO would keep pushing), zero on it."""
    for pc, pr, rc, rr, beta, h, _ in CASES:
        inputs = [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (pc, pr, rc, rr)]
        ipo_loss(*inputs, beta=beta)[0].sum().backward()
        want = 2 * (h - 1 / (2 * beta))
        assert [x.grad.item() for x in inputs] == pytest.approx([want, -want, -want, want], rel=1e-12, abs=1e-15)
    assert [2 * (h - 1 / (2 * beta)) for *_, beta, h, _ in CASES] == [0.0, -6.0, -4.0, 3.5, 10.25]


def test_rewards_are_detached_and_loss_is_not():
    inputs = [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in CASES[1][:4]]
    losses, chosen_rewards, rejected_rewards = ipo_loss(*inputs, beta=0.5)
    assert losses.requires_grad and chosen_rewards.grad_fn is None and rejected_rewards.grad_fn is None


def test_random_batch_elementwise():
    """(B,) in, (B,) out, each element the scalar formula (realistic summed log-probs)."""
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = -60.0 * torch.rand(4, 257, generator=gen, dtype=torch.float64)
    losses, _, _ = ipo_loss(pc, pr, rc, rr, beta=0.3)
    want = [((a - c) - (b - d) - 1 / 0.6) ** 2
            for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    torch.testing.assert_close(losses, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
