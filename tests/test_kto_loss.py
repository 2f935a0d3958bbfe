"""Hand-computed checks of `kto.kto_loss` and the reference point (KTO, arXiv:2402.01306 Eq. 8).

With r = log pi - log pi_ref, z0 = max(kl, 0) and s the sigmoid:
    desirable:    loss = lambda_D (1 - s(beta (r - z0))),   d loss / d r = -lambda_D beta s'(beta (r - z0))
    undesirable:  loss = lambda_U (1 - s(beta (z0 - r))),   d loss / d r = +lambda_U beta s'(beta (z0 - r))
with s'(u) = s(u)(1 - s(u)). Every expected number is written out (sigmoids from plain Python's math.exp, never from
kto_loss), and z0 carries no gradient.
"""

import math

import pytest
import torch

from kto import advise_weights, by_label, kl_estimate, kto_loss, kto_metrics

# beta = 0.5; r = policy - ref = [0.5, -1.0, 0.0, 0.5]; labels D, D, U, U
POLICY, REF, DESIRABLE, BETA = [-1.0, -2.0, -3.0, -0.5], [-1.5, -1.0, -3.0, -1.0], [True, True, False, False], 0.5
SIGMOID = {0.15: 0.5374298453437496, -0.6: 0.35434369377420455, 0.1: 0.52497918747894, -0.15: 0.46257015465625045,
           0.25: 0.5621765008857981, -0.5: 0.3775406687981454, 0.0: 0.5, -0.25: 0.43782349911420193}


def test_sigmoid_table():
    """The table above, rechecked with plain arithmetic, so a typo cannot pass silently."""
    for u, value in SIGMOID.items():
        assert 1 / (1 + math.exp(-u)) == pytest.approx(value, rel=1e-15)


def run(kl, desirable_weight=1.0, undesirable_weight=1.0, dtype=torch.float64):
    policy = torch.tensor(POLICY, dtype=dtype, requires_grad=True)
    kl = torch.tensor(kl, dtype=dtype, requires_grad=True)
    losses, rewards = kto_loss(policy, torch.tensor(REF, dtype=dtype), torch.tensor(DESIRABLE), kl, BETA,
                               desirable_weight, undesirable_weight)
    losses.sum().backward()
    return losses, rewards, policy.grad, kl


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_both_labels_at_a_positive_reference_point(dtype):
    """z0 = 0.2: u = beta (r - z0) = 0.15 and -0.6 for the desirable rows, beta (z0 - r) = 0.1 and -0.15 for the
    undesirable ones."""
    losses, rewards, grad, _ = run(0.2, dtype=dtype)
    s = SIGMOID
    expected = [1 - s[0.15], 1 - s[-0.6], 1 - s[0.1], 1 - s[-0.15]]
    slope = [-BETA * s[0.15] * (1 - s[0.15]), -BETA * s[-0.6] * (1 - s[-0.6]),
             BETA * s[0.1] * (1 - s[0.1]), BETA * s[-0.15] * (1 - s[-0.15])]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=dtype), **tol)
    torch.testing.assert_close(rewards, torch.tensor([0.25, -0.5, 0.0, 0.25], dtype=dtype), **tol)  # beta * r
    torch.testing.assert_close(grad, torch.tensor(slope, dtype=dtype), **tol)
    assert not rewards.requires_grad


def test_the_reference_point_is_clamped_at_zero():
    """kl = -0.7 gives z0 = 0: u = beta r = 0.25, -0.5 (desirable) and -beta r = 0, -0.25 (undesirable)."""
    losses, _, _, _ = run(-0.7)
    s = SIGMOID
    torch.testing.assert_close(losses, torch.tensor([1 - s[0.25], 1 - s[-0.5], 1 - s[0.0], 1 - s[-0.25]],
                                                    dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_weights_scale_each_label():
    """lambda_D = 2, lambda_U = 0.5: the loss is lambda_y - v, so each row's loss and gradient scale by its weight."""
    losses, _, grad, _ = run(0.2, desirable_weight=2.0, undesirable_weight=0.5)
    s = SIGMOID
    torch.testing.assert_close(losses, torch.tensor([2 * (1 - s[0.15]), 2 * (1 - s[-0.6]), 0.5 * (1 - s[0.1]),
                                                     0.5 * (1 - s[-0.15])], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[0], torch.tensor(-2 * BETA * s[0.15] * (1 - s[0.15]), dtype=torch.float64))
    torch.testing.assert_close(grad[2], torch.tensor(0.5 * BETA * s[0.1] * (1 - s[0.1]), dtype=torch.float64))


@pytest.mark.parametrize("kl", [0.2, -0.7])
def test_the_reference_point_carries_no_gradient(kl):
    """z0 is detached (the paper; TRL and the authors' code): the estimate gets no gradient from the loss."""
    _, _, _, kl_tensor = run(kl)
    assert kl_tensor.grad is None


def test_kl_estimate_is_the_mean_over_real_mismatched_rows():
    """Rows 1-2 are real, row 3 a stand-in: the mean of (-2 - -1) and (-3 - -3.5) is (-1 + 0.5) / 2 = -0.25; it is
    returned before the clamp."""
    estimate = kl_estimate(torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([-1.0, -3.5, 5.0]), 2)
    assert float(estimate) == -0.25


def test_metrics_are_means_over_each_label():
    """Two batches pooled by row count: desirable rows' rewards 1, 3 (batch 1) and 5 (batch 2), undesirable -1."""
    first = kto_metrics("train", torch.tensor([0.1, 0.2, 0.3]), torch.tensor([-1.0, -2.0, -3.0]),
                        torch.tensor([1.0, 3.0, -1.0]), torch.tensor([True, True, False]), torch.tensor(-0.3))
    second = kto_metrics("train", torch.tensor([0.5]), torch.tensor([-4.0]), torch.tensor([5.0]),
                         torch.tensor([True]), torch.tensor(0.4))
    pooled = {k: (3 * first[k] + second[k]) / 4 for k in first}  # MetricSums weights each batch by its rows
    metrics = by_label(pooled)
    assert metrics["train/rewards/chosen"] == pytest.approx(3.0)  # (1 + 3 + 5) / 3
    assert metrics["train/rewards/rejected"] == pytest.approx(-1.0)
    assert metrics["train/rewards/margin"] == pytest.approx(4.0)
    assert metrics["train/logps/chosen"] == pytest.approx(-7 / 3)
    assert metrics["train/desirable"] == pytest.approx(0.75)
    assert metrics["train/kl"] == pytest.approx(0.1)  # (3 * 0 + 0.4) / 4: each batch's z0, clamped


def test_a_label_with_no_rows_reports_nan():
    metrics = by_label(kto_metrics("eval", torch.tensor([0.1]), torch.tensor([-1.0]), torch.tensor([2.0]),
                                   torch.tensor([True]), torch.tensor(0.0)))
    assert math.isnan(metrics["eval/rewards/rejected"]) and metrics["eval/rewards/chosen"] == 2.0


@pytest.mark.parametrize("n_good, weights, advice", [
    (50, (1.0, 1.0), None),  # balanced: ratio 1
    (20, (1.0, 1.0), "--desirable_weight in [4, 5.33], or --undesirable_weight in [0.188, 0.25]"),  # 20:80
    (20, (4.5, 1.0), None),  # 4.5 * 20 / 80 = 1.125, inside [1, 4/3]
])
def test_the_papers_advice_on_weights(capsys, n_good, weights, advice):
    advise_weights([{"label": i < n_good} for i in range(100)], *weights)
    out = capsys.readouterr().out
    assert (advice in out) if advice else out == ""
