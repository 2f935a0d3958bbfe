"""Hand-computed checks of `slic_hf.slic_loss` (SLiC-HF, arXiv:2305.10425):

    loss = max(0, delta - log pi(y_w) + log pi(y_l)) - lambda * log pi(y_ref),

with margin m = log pi(y_w) - log pi(y_l). Inside the margin (m < delta) the hinge is delta - m and its gradient is
-1 on log pi(y_w) and +1 on log pi(y_l); outside (m >= delta) both are 0. The regulariser's gradient on
log pi(y_ref) is -lambda everywhere. Expected numbers are written out by hand here, never computed with slic_loss.
"""
import pytest
import torch

from slic_hf import slic_loss

# (chosen, rejected, target, delta, lambda, margin, hinge, loss): dyadic numbers, exact in float32
CASES = [
    (-4.0, -6.5, -4.0, 1.0, 0.5, 2.5, 0.0, 2.0),  # outside the margin: only the regulariser, 0.5 * 4
    (-4.0, -4.5, -4.0, 1.0, 0.5, 0.5, 0.5, 2.5),  # inside: 1 - 0.5 = 0.5, plus 2
    (-7.25, -3.0, -2.0, 1.0, 0.25, -4.25, 5.25, 5.75),  # wrong order: 1 + 4.25, plus 0.25 * 2 (a separate target)
    (-3.0, -5.0, -9.0, 2.0, 0.0, 2.0, 0.0, 0.0),  # exactly at the margin: the hinge is 0; lambda = 0
    (-10.0, -10.0, -1.5, 0.5, 2.0, 0.0, 0.5, 3.5),  # a tie: the hinge is delta; 2 * 1.5
]


def test_table_is_consistent():
    for chosen, rejected, target, delta, lam, margin, hinge, loss in CASES:
        assert chosen - rejected == margin and max(0.0, delta - margin) == hinge and hinge - lam * target == loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_inside_and_outside_the_margin(dtype):
    for chosen, rejected, target, delta, lam, margin, hinge, loss in CASES:
        got = slic_loss(*(torch.tensor([v], dtype=dtype) for v in (chosen, rejected, target)), delta=delta,
                        lambda_reg=lam)
        assert [x.dtype for x in got] == [dtype] * 3 and all(x.shape == (1,) for x in got)
        assert [x.item() for x in got] == [loss, hinge, margin]  # dyadic: exact in both dtypes


def test_gradients_by_hand():
    """(d/d chosen, d/d rejected, d/d target): inside the margin (-1, +1, -lambda); outside (0, 0, -lambda).
    The kink m = delta (case 3) is left out: any subgradient between the two is correct there."""
    want = {0: (0.0, 0.0, -0.5), 1: (-1.0, 1.0, -0.5), 2: (-1.0, 1.0, -0.25), 4: (-1.0, 1.0, -2.0)}
    for i, (chosen, rejected, target, delta, lam, *_) in enumerate(CASES):
        if i not in want:
            continue
        inputs = [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in (chosen, rejected, target)]
        slic_loss(*inputs, delta=delta, lambda_reg=lam)[0].sum().backward()
        assert tuple(x.grad.item() for x in inputs) == want[i]


def test_target_that_is_the_chosen_tensor_gets_both_gradients():
    """With no target column the script passes the chosen log-probs as the target: d loss/d chosen = -1 - lambda."""
    chosen = torch.tensor([-4.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-4.5], dtype=torch.float64)
    slic_loss(chosen, rejected, chosen, delta=1.0, lambda_reg=0.5)[0].sum().backward()
    assert chosen.grad.item() == -1.5


def test_diagnostics_are_detached():
    inputs = [torch.tensor([v], dtype=torch.float64, requires_grad=True) for v in CASES[1][:3]]
    losses, hinge, margins = slic_loss(*inputs, delta=1.0, lambda_reg=0.5)
    assert losses.requires_grad and hinge.grad_fn is None and margins.grad_fn is None
