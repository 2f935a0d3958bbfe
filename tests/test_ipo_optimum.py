"""Minimising the IPO population loss over a tabular policy reaches IPO's analytic optimum (arXiv:2310.12036, Sec. 5).

Setup: prompts x, K responses each, reference pi_ref(.|x) = softmax(random logits), and a preference matrix P with
P_ij = P(i > j | x), P_ij + P_ji = 1, P_ii = 1/2: either Bradley-Terry from a random reward, or a general
(intransitive) one. Pairs (i, j) are drawn i.i.d. from mu(.|x) and labelled i > j with probability P_ij, so

    L(phi) = sum_x sum_{i != j} mu_i mu_j P_ij l(h_ij),   h_ij = phi_i - phi_j,   phi = log pi - log pi_ref,

with l the per-pair loss of `ipo.ipo_loss`. Grouping (i, j) with (j, i), a pair contributes
mu_i mu_j [P_ij (d - c)^2 + P_ji (d + c)^2] with d = h_ij, c = 1/(2 beta); setting the derivative in phi_i to zero gives
phi_i - E_mu[phi] = c (2 p_i - 1) with p_i = p(i > mu) = sum_j mu_j P_ij, hence on the support of mu

    pi*(i|x) = pi_ref(i|x) exp(p(i > mu | x) / beta) / Z(x).

L is a convex quadratic in phi, so this is the unique minimiser up to the softmax's shift.
"""
import functools

import numpy as np
import pytest
import torch

from dpo import dpo_loss
from ipo import ipo_loss

N_PROMPTS, N_RESPONSES, SEED = 3, 6, 0
BETAS = [0.1, 0.5, 2.0]
# LBFGS in float64 stops where the line search can no longer lower the loss (rounding level), which leaves
# max |pi - pi*| at 4e-16 for mu uniform and up to 2.9e-9 for mu = pi_ref (small mu_i mu_j flatten the loss), with the
# gradient of the normalised loss at most 3.5e-9 (measured). The issue asks for 1e-3; we hold pi to 2e-8, >= 6x the
# worst measured and far below the >= 1e-3 that a wrong beta, a wrong target or summing P over the wrong index moves it.
PI_TOL = GRAD_TOL = 2e-8


def lbfgs(loss_fn, phi0, max_iter=500):
    """argmin of loss_fn(phi) from phi0, in float64; returns (phi, its gradient)."""
    phi = phi0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([phi], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-12,
                            tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(phi)
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    return phi.detach(), phi.grad.clone()


@functools.lru_cache(maxsize=None)
def problem(kind):
    """Fixed-seed (ref_logp, P), shapes (X, K) and (X, K, K), float64."""
    gen = torch.Generator().manual_seed(SEED)
    ref_logp = torch.log_softmax(torch.randn(N_PROMPTS, N_RESPONSES, generator=gen, dtype=torch.float64), -1)
    if kind == "bradley-terry":
        reward = 2 * torch.rand(N_PROMPTS, N_RESPONSES, generator=gen, dtype=torch.float64) - 1
        P = torch.sigmoid(reward[:, :, None] - reward[:, None, :])
    else:  # intransitive: each unordered pair gets its own random probability
        upper = torch.rand(N_PROMPTS, N_RESPONSES, N_RESPONSES, generator=gen, dtype=torch.float64).triu(1)
        P = upper + (1 - upper.transpose(1, 2)).tril(-1) + 0.5 * torch.eye(N_RESPONSES, dtype=torch.float64)
    assert torch.allclose(P + P.transpose(1, 2), torch.ones_like(P))
    return ref_logp, P


def sampling_dist(name, ref_logp):
    return ref_logp.exp() if name == "ref" else torch.full_like(ref_logp, 1 / ref_logp.shape[-1])


def population_loss(loss_fn, phi, ref_logp, P, mu, beta):
    """sum_x sum_{i != j} mu_i mu_j P_ij l(h_ij) for the per-pair loss l = loss_fn (ipo_loss or dpo_loss)."""
    k = ref_logp.shape[-1]
    i, j = torch.tensor([(a, b) for a in range(k) for b in range(k) if a != b]).T
    policy_logp = torch.log_softmax(ref_logp + phi, -1)
    losses = loss_fn(policy_logp[:, i].reshape(-1), policy_logp[:, j].reshape(-1),
                     ref_logp[:, i].reshape(-1), ref_logp[:, j].reshape(-1), beta=beta)[0]
    weights = (mu[:, i] * mu[:, j] * P[:, i, j]).reshape(-1)
    return (weights * losses).sum() / weights.sum()  # normalised, so gradient tolerances mean the same for every mu


def ipo_optimum(ref_logp, P, mu, beta):
    """log pi*(i) = log pi_ref(i) + p(i > mu)/beta - log Z, with p(i > mu) = sum_j mu_j P_ij."""
    return torch.log_softmax(ref_logp + torch.einsum("xij,xj->xi", P, mu) / beta, -1)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("mu_name", ["ref", "uniform"])
@pytest.mark.parametrize("kind", ["bradley-terry", "intransitive"])
def test_ipo_minimiser_is_analytic_optimum(beta, mu_name, kind):
    ref_logp, P = problem(kind)
    mu = sampling_dist(mu_name, ref_logp)
    phi, grad = lbfgs(lambda phi: population_loss(ipo_loss, phi, ref_logp, P, mu, beta), torch.zeros_like(ref_logp))
    assert grad.abs().max() < GRAD_TOL
    policy_logp = torch.log_softmax(ref_logp + phi, -1)
    assert (policy_logp.exp() - ipo_optimum(ref_logp, P, mu, beta).exp()).abs().max() < PI_TOL


def test_ipo_optimum_depends_on_mu():
    """Unlike DPO's (which is mu-free under Bradley-Terry), IPO's optimum weighs each win by how often mu offers the
    opponent: the same preferences give different optima under mu = pi_ref and mu = uniform. First a theorem check
    on the closed form ipo_optimum; then the same on ipo.ipo_loss itself: the minimisers of its population loss under
    the two mu differ by as much, and DPO's (dpo.dpo_loss) do not."""
    ref_logp, P = problem("bradley-terry")
    a, b = (ipo_optimum(ref_logp, P, sampling_dist(m, ref_logp), 0.5).exp() for m in ("ref", "uniform"))
    assert (a - b).abs().max() > 1e-3  # measured 4.6e-3, 230x PI_TOL
    fitted = {}
    for fn in (ipo_loss, dpo_loss):
        for m in ("ref", "uniform"):
            phi, _ = lbfgs(lambda phi: population_loss(fn, phi, ref_logp, P, sampling_dist(m, ref_logp), 0.5),
                           torch.zeros_like(ref_logp))
            fitted[fn, m] = torch.log_softmax(ref_logp + phi, -1).exp()
    ipo_gap = (fitted[ipo_loss, "ref"] - fitted[ipo_loss, "uniform"]).abs().max()
    assert ipo_gap == pytest.approx((a - b).abs().max().item(), abs=2 * PI_TOL)  # measured 4.0e-10 apart
    assert (fitted[dpo_loss, "ref"] - fitted[dpo_loss, "uniform"]).abs().max() < 1e-6  # measured 1.7e-8


# --------------------------------------------------------------------------- the answer that never wins
# Three answers; y2 loses every comparison (P(2 > 1) = P(2 > 3) = 0), y1 beats y3 with probability 0.6.
NEVER = torch.tensor([[[0.5, 1.0, 0.6], [0.0, 0.5, 0.0], [0.4, 1.0, 0.5]]], dtype=torch.float64)
NEVER_REF = torch.log(torch.tensor([[0.25, 0.5, 0.25]], dtype=torch.float64))
NEVER_MU = torch.full((1, 3), 1 / 3, dtype=torch.float64)


def test_a_never_winning_answer_keeps_a_finite_probability_under_ipo():
    """p(i > mu) with mu uniform: y1 (0.5 + 1 + 0.6)/3 = 0.7, y2 (0 + 0.5 + 0)/3 = 1/6, y3 (0.4 + 1 + 0.5)/3 = 19/30.
    At beta = 0.5: pi*(y2) = 0.5 e^{1/3} / (0.25 e^{1.4} + 0.5 e^{1/3} + 0.25 e^{19/15}) = 0.69781 / 2.59885 = 0.26851,
    far from 0, and the minimiser of the population loss is exactly there."""
    beta = 0.5
    weights = [0.25 * np.exp(0.7 / beta), 0.5 * np.exp((1 / 6) / beta), 0.25 * np.exp((19 / 30) / beta)]
    by_hand = weights[1] / sum(weights)
    assert by_hand == pytest.approx(0.26851, abs=1e-5)
    phi, grad = lbfgs(lambda phi: population_loss(ipo_loss, phi, NEVER_REF, NEVER, NEVER_MU, beta),
                      torch.zeros(1, 3, dtype=torch.float64))
    assert grad.abs().max() < GRAD_TOL
    assert torch.log_softmax(NEVER_REF + phi, -1).exp()[0, 1].item() == pytest.approx(by_hand, abs=PI_TOL)


def test_dpo_drives_the_never_winning_answer_to_zero_where_ipo_stays_put():
    """DPO's loss has no minimiser here: every term with y2 is softplus(-beta (phi_j - phi_2)) weighted by
    P(j > 2) = 1, which falls without bound as phi_2 -> -inf, so d L / d phi_2 > 0 everywhere and the infimum sits at
    pi(y2) = 0, whatever beta (the IPO paper's argument: DPO over-fits deterministic preferences). Longer
    optimisation keeps lowering pi(y2); IPO's fit is the same however long it runs."""
    beta = 0.5
    dpo_pi2, ipo_pi2 = [], []
    for budget in (5, 20, 50):
        for fn, out in ((dpo_loss, dpo_pi2), (ipo_loss, ipo_pi2)):
            phi, grad = lbfgs(lambda phi: population_loss(fn, phi, NEVER_REF, NEVER, NEVER_MU, beta),
                              torch.zeros(1, 3, dtype=torch.float64), max_iter=budget)
            out.append(torch.log_softmax(NEVER_REF + phi, -1).exp()[0, 1].item())
            if fn is dpo_loss:
                assert grad[0, 1] > 0  # still descending in phi_2: not a stationary point
    assert dpo_pi2[0] > dpo_pi2[1] > dpo_pi2[2] and dpo_pi2[2] < 1e-20  # measured: 8.5e-4, 5.8e-13, 5.6e-23
    assert max(ipo_pi2) - min(ipo_pi2) < PI_TOL and ipo_pi2[0] == pytest.approx(0.26851, abs=1e-5)
