"""RRHF's minimiser on tabular problems, found by descending the script's rrhf_loss and compared with its exact form.

The policy is a softmax over a few answers. L_ft = -log pi(y_best)/|y_best| is a cross-entropy, so on its own it is
minimised by putting all the mass on what the data call best; the hinge only orders p = log pi / |y|.

- One group, always the same: inf L = 0, approached only as pi(y_best) -> 1 (every other answer -> 0), never attained.
- Groups of k answers drawn i.i.d. from mu (all-tied groups dropped, as the script drops them): the population SFT
  term is -sum_y c_y log pi(y) with c_y = P(y is the group's best) / |y|, minimised by pi*(y) = c_y / sum c. Where
  that pi* already orders p as the scores do, the hinge is 0 there too, so pi* is the minimiser of the whole loss:
  the mass goes to answers that can be best, divided by their length (the token mean favours short answers), and an
  answer that is never best (the worst, or one the data never show) gets none.
- Where pi* would rank a better answer y_b below a worse y_a (y_b rarely sampled), the hinge binds. With unit
  lengths, the stationarity conditions give: for w >= (c_a - c_b) / (2 q), q the expected count of the (a, b) pair per
  group, the minimiser pools them, pi(y_a) = pi(y_b) = (c_a + c_b) / (2 sum c); for smaller w it stays mis-ordered at
  pi(y_a) = (c_a - w q)/sum c, pi(y_b) = (c_b + w q)/sum c.
"""

import itertools

import numpy as np
import pytest
import torch

from rrhf import rrhf_loss


def descend(groups, weights, lengths, scores, n_answers, w, steps=4000, lr=0.05):
    """Adam on the logits of pi over n_answers, lr decaying linearly to 0, on the weighted mean of rrhf_loss over
    groups."""
    theta = torch.zeros(n_answers, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    g = torch.tensor(groups)
    valid = torch.ones(g.shape, dtype=torch.bool)
    for _ in range(steps):
        logp = torch.log_softmax(theta, 0)
        losses, rank, _, _ = rrhf_loss(logp[g], lengths[g], scores[g], valid, w)
        opt.zero_grad()
        (weights * losses).sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        logp = torch.log_softmax(theta, 0)
        losses, rank, _, p = rrhf_loss(logp[g], lengths[g], scores[g], valid, w)
    return logp.exp().numpy(), float((weights * losses).sum()), float((weights * rank).sum())


def test_one_group_concentrates_on_its_best_response():
    """Group (y0, y1, y2) scored (1, 3, 2), plus an answer y3 the group never shows. Descent meets every ordered pair
    exactly (hinge 0 at finite steps) and drives pi(y1) toward 1: four times the steps leave a smaller loss, still
    above its infimum 0, which no finite logits attain."""
    lengths, scores = torch.tensor([2, 3, 1, 2]), torch.tensor([1.0, 3.0, 2.0, 0.0], dtype=torch.float64)
    (pi_short, short, _), (pi, total, rank) = (
        descend([[0, 1, 2]], torch.ones(1, dtype=torch.float64), lengths, scores, 4, w=1.0, steps=n)
        for n in (1000, 4000))
    assert rank == 0.0
    # measured: 0.978 after 1000 steps, 0.997 after 4000
    assert pi_short[1] < pi[1] < 1 and pi[1] > 0.99 and 0 < total < short


def group_population(mu, k):
    """All k-tuples of answer indices under i.i.d. mu, all-tied ones dropped, with their renormalised probabilities."""
    groups = [t for t in itertools.product(range(len(mu)), repeat=k) if len(set(t)) > 1]
    prob = np.array([np.prod([mu[i] for i in t]) for t in groups])
    return groups, torch.tensor(prob / prob.sum())


def p_best(mu, k):
    """P(answer i is the group's best), for answers sorted by strictly increasing reward, all-tied groups excluded:
    P(max = r_i) = F_i^k - F_{i-1}^k, minus the all-i group mu_i^k, over 1 - sum_j mu_j^k."""
    F = np.cumsum(mu)
    below = np.concatenate([[0.0], F[:-1]])
    return (F**k - below**k - mu**k) / (1 - np.sum(mu**k))


def test_population_minimiser_is_p_best_over_length():
    """5 answers, rewards 0..4, uniform mu, k = 3, lengths (1, 2, 3, 2, 1), plus one answer the data never show.
    c = P(best)/|y| = (0, 0.05/2, 0.15/3, 0.30/2, 0.50/1) (P(best) = (0, 7, 19, 37, 61)/125 less 1/125, over 0.96):
    pi* = c / sum c orders p = log pi*/|y| as the rewards, so it is the minimiser. Descent reaches it to 1e-3 (TV)."""
    mu = np.full(5, 0.2)
    groups, weights = group_population(mu, 3)
    lengths = torch.tensor([1, 2, 3, 2, 1, 1])
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 0.0], dtype=torch.float64)
    pb = p_best(mu, 3)
    np.testing.assert_allclose(pb, (np.array([1, 7, 19, 37, 61]) / 125 - 1 / 125) / 0.96, rtol=1e-12)  # by hand
    c = np.append(pb / lengths[:5].numpy(), 0.0)
    target = c / c.sum()
    p_star = np.log(target[1:5]) / lengths[1:5].numpy()
    assert np.all(np.diff(p_star) > 0)  # the premise: pi* orders p as the rewards
    pi, _, rank = descend(groups, weights, lengths, scores, 6, w=1.0)
    assert 0.5 * np.abs(pi - target).sum() < 1e-3
    assert rank < 1e-3 and pi[0] < 1e-3 and pi[5] < 1e-3  # never best, never shown: no mass


@pytest.mark.parametrize("w", [0.5, 5.0])
def test_a_binding_hinge_pools_or_leaves_the_pair(w):
    """Rewards 0..4, mu = (0.2, 0.2, 0.2, 0.35, 0.05), k = 3, unit lengths: the top answer y4 is rarely sampled, so
    c_4 < c_3 and pi* alone would rank y4 below y3. q = E[count of (y3, y4) pairs per group]
    = k(k-1) mu_3 mu_4 / (1 - sum mu^k) (ordered positions, normalised like the groups). By hand: sum mu^3 = 0.067,
    c = P(best) = (0, 0.0514, 0.1543, 0.6415,
    0.1527), q = 0.1125, threshold (c_3 - c_4)/(2q) = 2.17: w = 5 pools y3 and y4, w = 0.5 leaves them mis-ordered at
    (c_3 - w q, c_4 + w q) / sum c."""
    mu = np.array([0.2, 0.2, 0.2, 0.35, 0.05])
    groups, weights = group_population(mu, 3)
    lengths = torch.ones(5, dtype=torch.long)
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    c = p_best(mu, 3)
    q = 3 * 2 * mu[3] * mu[4] / (1 - np.sum(mu**3))
    threshold = (c[3] - c[4]) / (2 * q)
    assert threshold == pytest.approx(2.17, abs=0.01) and c[4] < c[3]
    target = c.copy()
    if w >= threshold:
        target[3] = target[4] = (c[3] + c[4]) / 2
    else:
        target[3], target[4] = c[3] - w * q, c[4] + w * q
    target /= c.sum()
    pi, _, _ = descend(groups, weights, lengths, scores, 5, w=w)
    assert 0.5 * np.abs(pi - target).sum() < 1e-3
