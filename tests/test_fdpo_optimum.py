"""Minimising the f-DPO population loss over a tabular policy reaches pi_ref (f')^{-1}((r - lambda)/beta) (Wang et al.).

Setup as in test_dpo_optimum.py: prompts x, K responses, pi_ref = softmax(random logits), r ~ U[-1, 1],
Bradley-Terry preferences P_ij = sigmoid(r_i - r_j), pairs drawn from mu = pi_ref. The population loss
sum_{i != j} mu_i mu_j P_ij l(z_ij) with z_ij = beta (f'(u_i) - f'(u_j)) is a sum of cross-entropies, each minimised at
z_ij = r_i - r_j; beta f'(u_i) = r_i - lambda realises all of them at once, and lambda is fixed by sum_i pi_i = 1:

    pi*(i) = pi_ref(i) g((r_i - lambda)/beta),   g = (f')^{-1}:
    reverse KL  g(v) = e^{v-1}         forward KL  g(v) = -1/v (v < 0)
    JS          g(v) = e^v/(2 - e^v) (v < log 2)          alpha  g(v) = (1 - alpha v)^{-1/alpha} (v < 1/alpha)

lambda is found by bisection (tests/fdpo_toy.py, which the toy-world targets use too; the reverse KL in closed form).
"""
import functools

import pytest
import torch

import fdpo_toy
from fdpo import f_prime, fdpo_loss

N_PROMPTS, N_RESPONSES, SEED = 3, 6, 0
DIVERGENCES = [("reverse_kl", None), ("forward_kl", None), ("js", None), ("alpha", 0.3), ("alpha", 0.5), ("alpha", 0.7)]
# L-BFGS in float64 stops at rounding level: measured max |pi - pi*| <= 1.5e-8 over every case below. The issue asks
# for 1e-3; we hold it to 1e-7. A wrong f', a wrong (f')^{-1}, or another divergence's optimum is >= 0.048 away
# (test_divergences_give_different_optima); TRL's alpha convention (1 - alpha: 0.3 for 0.7) is 0.099 away.
PI_TOL = 1e-7
Z_TOL = 1e-6  # on beta (f'(u_1) - f'(u_2)) at cDPO's optimum: measured at most 3.6e-9; eps = 0's is >= 0.07 away


def analytic_optimum(ref_logp, reward, beta, divergence, alpha) -> torch.Tensor:
    """pi* per prompt, (X, K), from fdpo_toy.optimum_on_answers: the same code that gives the toy-world targets, so
    this test checks it too."""
    return torch.stack([torch.from_numpy(fdpo_toy.optimum_on_answers(ref_logp[x].numpy(), reward[x].numpy(), beta,
                                                                     divergence, alpha)).exp()
                        for x in range(len(ref_logp))])


@functools.lru_cache(maxsize=None)
def problem(n_responses=N_RESPONSES):
    gen = torch.Generator().manual_seed(SEED)
    ref_logp = torch.log_softmax(torch.randn(N_PROMPTS, n_responses, generator=gen, dtype=torch.float64), -1)
    reward = 2 * torch.rand(N_PROMPTS, n_responses, generator=gen, dtype=torch.float64) - 1
    return ref_logp, reward


def fit(beta, divergence, alpha, eps=0.0, n_responses=N_RESPONSES) -> torch.Tensor:
    ref_logp, reward = problem(n_responses)
    i, j = torch.tensor([(a, b) for a in range(n_responses) for b in range(n_responses) if a != b]).T
    mu = ref_logp.exp()
    weights = (mu[:, i] * mu[:, j] * torch.sigmoid(reward[:, i] - reward[:, j])).reshape(-1)
    weights = weights / weights.sum()
    phi = torch.zeros_like(ref_logp, requires_grad=True)
    opt = torch.optim.LBFGS([phi], lr=1.0, max_iter=1000, history_size=20, tolerance_grad=1e-13, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(ref_logp + phi, -1)
        losses = fdpo_loss(logp[:, i].reshape(-1), logp[:, j].reshape(-1), ref_logp[:, i].reshape(-1),
                           ref_logp[:, j].reshape(-1), beta=beta, divergence=divergence, alpha=alpha or 0.5,
                           label_smoothing=eps)[0]
        loss = (weights * losses).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(ref_logp + phi.detach(), -1).exp()


@pytest.mark.parametrize("beta", [0.5, 2.0])
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES)
def test_minimiser_is_the_analytic_optimum(divergence, alpha, beta):
    ref_logp, reward = problem()
    pi_star = analytic_optimum(ref_logp, reward, beta, divergence, alpha)
    assert torch.allclose(pi_star.sum(-1), torch.ones(N_PROMPTS, dtype=torch.float64), atol=1e-12)
    assert (fit(beta, divergence, alpha) - pi_star).abs().max() < PI_TOL


def test_divergences_give_different_optima():
    """So the test above can tell them apart (and tell alpha from TRL's 1 - alpha)."""
    ref_logp, reward = problem()
    optima = {(d, a): analytic_optimum(ref_logp, reward, 0.5, d, a) for d, a in DIVERGENCES}
    keys = list(optima)
    gaps = [(optima[a] - optima[b]).abs().max().item() for n, a in enumerate(keys) for b in keys[n + 1:]]
    assert min(gaps) > 1e-2  # measured 0.048


@pytest.mark.parametrize("eps", [0.1, 0.3])
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES)
def test_cdpo_two_responses_closed_form(divergence, alpha, eps):
    """cDPO on f-DPO. With two responses the ordered pairs (1, 2) and (2, 1) make one cross-entropy in z = beta
    (f'(u_1) - f'(u_2)), with label q = (1 - eps) P_12 + eps P_21: minimised exactly at z = logit(q), not at eps = 0's
    z = r_1 - r_2. (With K >= 3 the targets logit(q_ij) are not differences of per-response values, as for cDPO.)"""
    beta = 0.5
    ref_logp, reward = problem(2)
    pi = fit(beta, divergence, alpha, eps, n_responses=2)
    f_chosen, f_rejected = (f_prime(torch.log(pi[:, k]) - ref_logp[:, k], divergence, alpha or 0.5) for k in (0, 1))
    p12 = torch.sigmoid(reward[:, 0] - reward[:, 1])
    q = (1 - eps) * p12 + eps * (1 - p12)
    target = torch.log(q) - torch.log1p(-q)
    assert (beta * (f_chosen - f_rejected) - target).abs().max() < Z_TOL
    assert (target - (reward[:, 0] - reward[:, 1])).abs().min() > 100 * Z_TOL  # eps = 0's optimum fails the check
