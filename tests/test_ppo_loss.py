"""Hand-computed checks of ppo_rlhf.py's pure functions: the per-token KL (k1, k3), the per-token reward with the
score at the last response token and the missing-EOS penalty, GAE with masks, whitening, the RLOO baseline, and the
clipped policy and value losses (values and gradients, both advantage signs, inside and outside the clip).

Expected numbers are computed here with `math` and plain Python only, never with the code under test. Inputs are
float64, so the only rounding is a few ulp inside each function: tolerances are 1e-12.
"""

import math

import pytest
import torch

from ppo_rlhf import (
    gae_advantages,
    kl_per_token,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    token_rewards,
    whiten,
)

TOL = dict(rtol=1e-12, atol=1e-12)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(got: torch.Tensor, want) -> None:
    torch.testing.assert_close(got, t(want), **TOL)


# --------------------------------------------------------------------------- per-token KL and rewards
LOGPS = [[-1.0, -0.5, -2.25], [-0.125, -3.0, 0.0]]
REF_LOGPS = [[-1.5, -0.5, -1.0], [-0.25, -2.0, 0.0]]  # the last entry of row 1 is padding in the reward tests


def test_kl_estimators_match_hand_values():
    """k1 = log pi - log pi_ref; k3 = (rho - 1) - log rho with rho = pi_ref / pi."""
    for estimator in ("k1", "k3"):
        want = []
        for lp_row, ref_row in zip(LOGPS, REF_LOGPS):
            row = []
            for lp, ref in zip(lp_row, ref_row):
                rho = math.exp(ref - lp)
                row.append(lp - ref if estimator == "k1" else (rho - 1) - math.log(rho))
            want.append(row)
        close(kl_per_token(t(LOGPS), t(REF_LOGPS), estimator), want)
    k3 = kl_per_token(t(LOGPS), t(REF_LOGPS), "k3")
    assert (k3 >= 0).all() and k3[0, 1] == 0  # k3 is non-negative, 0 where the log-probs agree
    with pytest.raises(ValueError, match="unknown kl estimator"):
        kl_per_token(t(LOGPS), t(REF_LOGPS), "k2")


@pytest.mark.parametrize("penalty", [0.0, 1.5])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_token_rewards_place_the_score_at_the_last_response_token(estimator, penalty):
    """Row 0: three tokens, the last an EOS. Row 1: two tokens and padding, no EOS (the budget ran out)."""
    beta, scores = 0.25, [2.0, -1.0]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    has_eos = torch.tensor([True, False])
    kl = kl_per_token(t(LOGPS), t(REF_LOGPS), estimator)
    rewards, penalised = token_rewards(t(scores), kl, mask, has_eos, beta, penalty)
    k = kl.tolist()
    row1_score = -1.0 - penalty  # no EOS: the penalty is subtracted
    want = [[-beta * k[0][0], -beta * k[0][1], -beta * k[0][2] + 2.0],
            [-beta * k[1][0], -beta * k[1][1] + row1_score, 0.0]]
    close(rewards, want)
    close(penalised, [2.0, row1_score])
    # a response's summed reward is its RLHF reward, score - beta * sum_t kl_t
    close(rewards.sum(-1), [2.0 - beta * sum(k[0]), row1_score - beta * (k[1][0] + k[1][1])])


def test_token_rewards_of_a_single_token_response():
    """A response that is only its EOS gets the score and its one KL term on that token."""
    rewards, _ = token_rewards(t([0.5]), t([[0.75, 9.0]]), torch.tensor([[True, False]]), torch.tensor([True]), 0.1)
    close(rewards, [[0.5 - 0.1 * 0.75, 0.0]])


# --------------------------------------------------------------------------- GAE and whitening
def test_gae_on_a_masked_trajectory():
    """Row 0 has three response tokens, row 1 two (then padding with junk values that must be ignored)."""
    gamma, lam = 0.9, 0.8
    r = [[0.5, -0.25, 2.0], [1.0, 3.0, 7.0]]
    v = [[1.0, 1.5, 0.5], [0.25, 2.0, 5.0]]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae_advantages(t(r), t(v), mask, gamma, lam)
    # row 0: the state after the last token is terminal, V = 0
    d2 = r[0][2] + gamma * 0.0 - v[0][2]
    d1 = r[0][1] + gamma * v[0][2] - v[0][1]
    d0 = r[0][0] + gamma * v[0][1] - v[0][0]
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # row 1: two tokens; the padded third position's reward and value do not leak in
    e1 = r[1][1] + gamma * 0.0 - v[1][1]
    e0 = r[1][0] + gamma * v[1][1] - v[1][0]
    b1 = e1
    b0 = e0 + gamma * lam * b1
    close(advantages, [[a0, a1, a2], [b0, b1, 0.0]])
    close(returns, [[a0 + v[0][0], a1 + v[0][1], a2 + v[0][2]], [b0 + v[1][0], b1 + v[1][1], 0.0]])


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    """lambda = gamma = 1: A_t = sum_{s >= t} r_s - V_t, and the returns are the rewards-to-go."""
    r, v = [[0.5, -0.25, 2.0]], [[1.0, 1.5, 0.5]]
    advantages, returns = gae_advantages(t(r), t(v), torch.ones(1, 3, dtype=torch.bool), 1.0, 1.0)
    to_go = [0.5 - 0.25 + 2.0, -0.25 + 2.0, 2.0]
    close(advantages, [[to_go[i] - v[0][i] for i in range(3)]])
    close(returns, [to_go])


def test_whiten_uses_masked_entries_only():
    x = [[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]]
    mask = torch.tensor([[True, True, True], [True, True, False]])
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    mean = sum(values) / 5
    std = math.sqrt(sum((u - mean) ** 2 for u in values) / 4 + 1e-8)  # Bessel's correction
    close(whiten(t(x), mask), [[(u - mean) / std for u in x[0]], [(x[1][0] - mean) / std, (x[1][1] - mean) / std, 0.0]])
    close(masked_mean(t(x), mask), mean)


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    returns = [1.0, 2.0, 3.0, 6.0, -1.0, 0.5, 0.5, 4.0]  # two prompts, k = 4 each
    want = []
    for g in (returns[:4], returns[4:]):
        want += [g[i] - sum(g[j] for j in range(4) if j != i) / 3 for i in range(4)]
    close(rloo_advantages(t(returns), 4), want)
    close(rloo_advantages(t([2.0, 5.0]), 2), [-3.0, 3.0])  # k = 2: the other sample is the baseline


def test_rloo_advantages_keep_their_signs():
    """Issue 17, defect 6: two prompts, k = 2, responses of 10, 1, 1 and 1 tokens, returns 1, -1, 0.1, -0.1. The
    leave-one-out advantages are 2, -2, 0.2, -0.2, and they already sum to 0 in each group. Whitening them over tokens
    weighed the first response 10 times (mean 1.34 over the 13 tokens) and gave [0.49, -2.68, -0.94, -1.25]: the
    better answer to the second prompt was pushed down. Normalised, they are divided by their std over the 4
    responses, each counted once (their mean is 0): signs and ratios stay."""
    raw = [2.0, -2.0, 0.2, -0.2]
    std = math.sqrt(sum(a * a for a in raw) / 3)  # Bessel's correction, about the mean 0
    returns = t([1.0, -1.0, 0.1, -0.1])
    close(rloo_advantages(returns, 2), raw)
    close(rloo_advantages(returns, 2, normalize=True), [a / (std + 1e-8) for a in raw])
    for normalize in (False, True):
        advantages = rloo_advantages(returns, 2, normalize=normalize)
        assert advantages[0] > 0 > advantages[1] and advantages[2] > 0 > advantages[3]  # the better answer of each


# --------------------------------------------------------------------------- the clipped losses
# (ratio, advantage): inside the clip, above it, below it, each with both advantage signs
CASES = [(1.1, 2.0), (1.1, -2.0), (1.5, 2.0), (1.5, -2.0), (0.5, 2.0), (0.5, -2.0), (1.0, 0.75), (0.9, -0.5)]


@pytest.mark.parametrize("cliprange", [0.2, 0.3])
def test_clipped_policy_loss_values_and_gradients(cliprange):
    """loss = max(-A rho, -A clip(rho, 1-eps, 1+eps)); its gradient in log pi is -A rho where unclipped, 0 where
    clipped."""
    old = [-1.25 - 0.5 * i for i in range(len(CASES))]
    logps = torch.tensor([[o + math.log(rho) for o, (rho, _) in zip(old, CASES)]], dtype=torch.float64,
                         requires_grad=True)
    advantages = t([[a for _, a in CASES]])
    losses, clipped, approxkl = ppo_policy_loss(logps, t([old]), advantages, cliprange)
    want_loss, want_clipped, want_grad = [], [], []
    for rho, a in CASES:
        unclipped_term = -a * rho
        clipped_term = -a * min(max(rho, 1 - cliprange), 1 + cliprange)
        want_loss.append(max(unclipped_term, clipped_term))
        want_clipped.append(clipped_term > unclipped_term)
        want_grad.append(0.0 if clipped_term > unclipped_term else -a * rho)
    close(losses, [want_loss])
    assert clipped.tolist() == [want_clipped]
    close(approxkl, [[0.5 * math.log(rho) ** 2 for rho, _ in CASES]])
    losses.sum().backward()
    close(logps.grad, [want_grad])
    assert any(want_clipped) and not all(want_clipped)  # both branches are exercised


def test_policy_loss_gradient_at_ratio_one_is_reinforce():
    """On the first minibatch (new = old) the clipped loss's gradient is -A * d log pi: REINFORCE with advantage A."""
    logps = torch.tensor([[-0.5, -2.0], [-1.0, -3.0]], dtype=torch.float64, requires_grad=True)
    advantages = t([[1.5, -0.25], [0.0, 4.0]])
    losses, clipped, _ = ppo_policy_loss(logps, logps.detach(), advantages, 0.2)
    losses.sum().backward()
    close(logps.grad, [[-1.5, 0.25], [0.0, -4.0]])
    assert not clipped.any()


@pytest.mark.parametrize("cliprange_value", [0.2, 0.5])
def test_clipped_value_loss_values_and_gradients(cliprange_value):
    """loss = max((v - G)^2, (v_old + clip(v - v_old, -c, c) - G)^2) / 2; no gradient through the clipped branch."""
    old = [1.0, 1.0, 1.0, 1.0, -2.0, 0.0]
    new = [1.1, 1.6, 1.6, 0.3, -2.0, -0.7]  # inside; above the clip, return beyond / between; below; equal; below
    returns = [2.0, 3.0, 1.2, 0.0, 1.0, 0.5]
    values = torch.tensor([new], dtype=torch.float64, requires_grad=True)
    losses, clipped = ppo_value_loss(values, t([old]), t([returns]), cliprange_value)
    want_loss, want_clipped, want_grad = [], [], []
    for v, o, g in zip(new, old, returns):
        vc = o + min(max(v - o, -cliprange_value), cliprange_value)
        unclipped_term, clipped_term = (v - g) ** 2, (vc - g) ** 2
        want_loss.append(0.5 * max(unclipped_term, clipped_term))
        want_clipped.append(clipped_term > unclipped_term)
        want_grad.append(0.0 if clipped_term > unclipped_term else v - g)
    close(losses, [want_loss])
    assert clipped.tolist() == [want_clipped]
    assert any(want_clipped) and not all(want_clipped)  # both branches are exercised
    losses.sum().backward()
    close(values.grad, [want_grad])
