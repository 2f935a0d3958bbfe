"""spin_loss against values worked out by hand with `math` (helpers.softplus), not with the code under test."""

import math

import pytest
import torch

from helpers import softplus
from spin import spin_loss


def run(real, gen, opp_real, opp_gen, beta):
    t = [torch.tensor([x], dtype=torch.float64, requires_grad=(i < 2))
         for i, x in enumerate((real, gen, opp_real, opp_gen))]
    return t, spin_loss(*t, beta)


def test_at_the_opponent_the_loss_is_log_2():
    """pi = pi_t (the start of every iteration): h = 0, loss = log 2, both rewards 0."""
    _, (losses, rr, gr) = run(-3.0, -7.0, -3.0, -7.0, 0.1)
    assert losses.item() == pytest.approx(math.log(2), abs=1e-15) and rr.item() == 0.0 and gr.item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 1.0, 5.0])
def test_values_by_hand(beta):
    """real: log pi -2, log pi_t -3 -> log-ratio +1; generated: -6 vs -4 -> -2. h = 1 - (-2) = 3;
    loss = softplus(-3 beta)."""
    _, (losses, rr, gr) = run(-2.0, -6.0, -3.0, -4.0, beta)
    assert losses.item() == pytest.approx(softplus(-3 * beta), abs=1e-12)
    assert rr.item() == pytest.approx(beta * 1.0) and gr.item() == pytest.approx(beta * -2.0)


def test_gradient_by_hand():
    """d loss/d log pi(y) = -beta sigma(-beta h), and the opposite for y'. beta = 0.5, h = 3: sigma(-1.5) = 0.18243."""
    (real, gen, *_), (losses, _, _) = run(-2.0, -6.0, -3.0, -4.0, 0.5)
    losses.sum().backward()
    s = 1 / (1 + math.exp(1.5))
    assert (real.grad.item() == pytest.approx(-0.5 * s, abs=1e-12)
            and gen.grad.item() == pytest.approx(0.5 * s, abs=1e-12))


def test_extreme_log_ratios_stay_finite():
    """h = 2,000 nats at beta = 1: the loss underflows to 0, not NaN; h = -2,000: the loss is 2,000, not inf."""
    _, (low, _, _) = run(0.0, -2000.0, 0.0, 0.0, 1.0)
    _, (high, _, _) = run(-2000.0, 0.0, 0.0, 0.0, 1.0)
    assert low.item() == 0.0 and high.item() == pytest.approx(2000.0)


def test_rewards_are_detached():
    _, (losses, rr, gr) = run(-2.0, -6.0, -3.0, -4.0, 0.5)
    assert losses.requires_grad and not rr.requires_grad and not gr.requires_grad
