"""rrhf_loss against values worked out by hand here: p_i = log pi(y_i|x) / |y_i|, the hinge summed over the pairs the
scores order, minus the best response's p, per group of a padded batch."""

import pytest
import torch

from rrhf import rrhf_loss


def loss(logps, lengths, scores, valid=None, w=1.0):
    logps = torch.tensor(logps, dtype=torch.float64, requires_grad=True)
    valid = torch.ones_like(logps, dtype=torch.bool) if valid is None else torch.tensor(valid)
    out = rrhf_loss(logps, torch.tensor(lengths), torch.tensor(scores, dtype=torch.float64), valid, w)
    return logps, out


def test_one_group_by_hand():
    """k = 3. p = (-6/3, -2/1, -9/2) = (-2, -2, -4.5); scores (1, 3, 2).
    Ordered pairs (worse i, better j): (0,1): max(0, -2 - -2) = 0; (0,2): max(0, -2 - -4.5) = 2.5;
    (2,1): max(0, -4.5 - -2) = 0.
    L_rank = 2.5; best = response 1, L_ft = -p_1 = 2; w = 0.5: L = 0.5 * 2.5 + 2 = 3.25."""
    _, (losses, rank, sft, p) = loss([[-6.0, -2.0, -9.0]], [[3, 1, 2]], [[1.0, 3.0, 2.0]], w=0.5)
    torch.testing.assert_close(p, torch.tensor([[-2.0, -2.0, -4.5]], dtype=torch.float64))
    assert rank.item() == 2.5 and sft.item() == 2.0 and losses.item() == 3.25


def test_gradient_by_hand():
    """Only the pair (0, 2) is violated: dL/dlogp_0 = w/|y_0| = 0.5/3, dL/dlogp_2 = -w/|y_2| = -0.25; the SFT term
    gives dL/dlogp_1 = -1/|y_1| = -1."""
    logps, (losses, *_) = loss([[-6.0, -2.0, -9.0]], [[3, 1, 2]], [[1.0, 3.0, 2.0]], w=0.5)
    losses.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.5 / 3, -1.0, -0.25]], dtype=torch.float64))


def test_ties_make_no_pair_and_the_first_top_score_is_the_target():
    """scores (2, 2, 1): the tied pair (0, 1) is ignored whatever its p; pairs (2, 0), (2, 1) are checked.
    p = (-1, -3, -2): (2,0): max(0, -2 - -1) = 0; (2,1): max(0, -2 - -3) = 1. Best = the first of the tied top,
    response 0: L_ft = 1. L = 1 + 1 = 2. Swapping the tied responses' log-probs makes the target (still response 0)
    p = -3: then (2,0): max(0, -2 - -3) = 1, (2,1): max(0, -2 - -1) = 0, L_ft = 3, L = 1 + 3 = 4."""
    _, (losses, rank, sft, _) = loss([[-1.0, -3.0, -2.0]], [[1, 1, 1]], [[2.0, 2.0, 1.0]])
    assert (rank.item(), sft.item(), losses.item()) == (1.0, 1.0, 2.0)
    _, (losses, rank, sft, _) = loss([[-3.0, -1.0, -2.0]], [[1, 1, 1]], [[2.0, 2.0, 1.0]])
    assert (rank.item(), sft.item(), losses.item()) == (1.0, 3.0, 4.0)


def test_unequal_k_in_one_batch_ignores_the_padding():
    """Group A has k = 2, group B k = 4; A's two padding slots hold junk (huge log-probs, better scores, length 0)
    that must change nothing and get no gradient.
    A: p = (-4/2, -1/1) = (-2, -1), scores (0, 1): (0,1): max(0, -2 - -1) = 0; L_ft = 1; L = 1.
    B: p = (-1, -2, -3, -4) (lengths 1), scores (4, 3, 2, 1): every pair worse-first has p_i < p_j reversed:
    (1,0): max(0, -2 - -1) = 0, ... all ordered correctly, L_rank = 0, L_ft = -p_0 = 1, L = 1.
    Then B with scores reversed (1, 2, 3, 4): pairs (i<j in index, r_i < r_j): p_i - p_j = j - i for the 6 pairs:
    1+2+3+1+2+1 = 10, L_ft = -p_3 = 4, L = 14."""
    valid = [[True, True, False, False], [True] * 4]
    logps, (losses, rank, sft, p) = loss([[-4.0, -1.0, 50.0, 80.0], [-1.0, -2.0, -3.0, -4.0]],
                                         [[2, 1, 0, 0], [1, 1, 1, 1]],
                                         [[0.0, 1.0, 9.0, 9.0], [4.0, 3.0, 2.0, 1.0]], valid)
    assert losses.tolist() == [1.0, 1.0] and rank.tolist() == [0.0, 0.0] and sft.tolist() == [1.0, 1.0]
    assert p[0, 2:].tolist() == [0.0, 0.0]
    losses.sum().backward()
    assert logps.grad[0, 2:].tolist() == [0.0, 0.0] and torch.isfinite(logps.grad).all()
    _, (losses, rank, sft, _) = loss([[-4.0, -1.0, 50.0, 80.0], [-1.0, -2.0, -3.0, -4.0]], [[2, 1, 0, 0], [1, 1, 1, 1]],
                                     [[0.0, 1.0, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]], valid)
    assert losses.tolist() == [1.0, 14.0] and rank.tolist() == [0.0, 10.0] and sft.tolist() == [1.0, 4.0]


@pytest.mark.parametrize("w", [0.0, 1.0, 100.0])
def test_rank_weight_scales_the_hinge_only(w):
    """Same group as test_one_group_by_hand: L = w * 2.5 + 2."""
    _, (losses, rank, sft, _) = loss([[-6.0, -2.0, -9.0]], [[3, 1, 2]], [[1.0, 3.0, 2.0]], w=w)
    assert (rank.item(), sft.item(), losses.item()) == (2.5, 2.0, w * 2.5 + 2)


def test_diagnostics_are_detached():
    _, (losses, rank, sft, p) = loss([[-6.0, -2.0, -9.0]], [[3, 1, 2]], [[1.0, 3.0, 2.0]])
    assert losses.requires_grad and not (rank.requires_grad or sft.requires_grad or p.requires_grad)


def test_metrics_are_means_over_groups_by_hand():
    """Group 0 (k = 3): scores (3, 2, 1), p (-1, -2, -0.5); of its 3 ordered pairs only (y_1 below y_0) has p in the
    same order: accuracy 1/3, tau (1 - 2)/3. Group 1 (k = 2, one padding slot with junk): scores (0, 1), p (-3, -1):
    accuracy 1, tau 1. Means over groups: accuracy 2/3 (pooling the pairs would give 2/4), tau 1/3, p/mean
    ((-3.5/3) + (-4/2))/2 = -19/12. Every metric being a mean over groups is what lets batches and ranks combine by
    group counts."""
    from rrhf import rrhf_metrics

    p = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    scores = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 7.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    m = rrhf_metrics("train", torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.0]), torch.tensor([1.0, 1.0]), p, scores,
                     valid)
    assert m["train/p/pair_accuracy"] == pytest.approx(2 / 3)
    assert m["train/p/kendall_tau"] == pytest.approx(1 / 3)
    assert m["train/p/mean"] == pytest.approx(-19 / 12)
    assert (m["train/loss"], m["train/rank"], m["train/sft"], m["train/p/best"]) == (2.0, 0.25, 1.0, -1.0)
