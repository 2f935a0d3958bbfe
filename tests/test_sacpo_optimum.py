"""SACPO's two stages, each the exact minimiser of a DPO population loss over a tabular policy, reach the constrained
optimum pi_ref exp((r + lambda g) / beta) / Z in either order (Wachi et al. 2024, Thm. 1 and Eq. 12); and P-SACPO's
weight interpolation of the two stages is exactly the optimum at q lambda when the logits are the weights.

Setup: one prompt, K responses, pi_ref = softmax(random logits), a reward r and a safety score g ~ U[0, 2]. A stage
learns the preferences of one score s (r or g): pairs (i, j) drawn from a full-support mu and labelled i > j with
Bradley-Terry probability sigmoid(s_i - s_j). Its population loss over the policy's logits theta is

    L(theta) = sum_{i != j} mu_i mu_j sigmoid(s_i - s_j) l(h_ij),
        h_ij = [log pi_i - log pi0_i] - [log pi_j - log pi0_j],

with l the per-pair loss of `sacpo.dpo_loss` at the stage's beta (sacpo.sacpo_stages: beta for r, beta / lambda for g)
and pi0 the stage's reference: pi_ref in stage 1, stage 1's minimiser in stage 2. Each stage is minimised by Newton's
method in float64 (L is convex in theta, flat only along theta + c), to a gradient below 1e-13.
"""

import pytest
import torch

import sacpo
from helpers import newton_minimise

K, SEED, BETA = 7, 0, 0.5
LAMBDAS = [0.3, 2.0]
TOL = 1e-8  # on max |log pi - log pi*|; Newton's fit is exact to ~1e-13, a wrong beta or reference moves it >= 1e-2


def problem():
    g = torch.Generator().manual_seed(SEED)
    ref_logits = torch.randn(K, generator=g, dtype=torch.float64)
    r = 2 * torch.rand(K, generator=g, dtype=torch.float64) - 1
    safety = 2 * torch.rand(K, generator=g, dtype=torch.float64)
    return ref_logits, {"reward": r, "safety": safety}


def population_loss(theta: torch.Tensor, ref_logits: torch.Tensor, score: torch.Tensor, mu: torch.Tensor,
                    beta: float) -> torch.Tensor:
    i, j = torch.triu_indices(K, K, 1).unbind(0)
    i, j = torch.cat([i, j]), torch.cat([j, i])  # every ordered pair: i chosen over j
    logp, ref_logp = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    losses, _, _ = sacpo.dpo_loss(logp[i], logp[j], ref_logp[i], ref_logp[j], beta)
    return (mu[i] * mu[j] * torch.sigmoid(score[i] - score[j]) * losses).sum()


def minimise(ref_logits: torch.Tensor, score: torch.Tensor, mu: torch.Tensor, beta: float) -> torch.Tensor:
    """The stage's population minimiser over logits, by Newton's method from the reference."""
    return newton_minimise(lambda t: population_loss(t, ref_logits, score, mu, beta), ref_logits.clone())


def run_stages(lambda_: float, order: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits after stage 1 and after stage 2, as sacpo.py plans them: stage 2's reference is stage 1's result.
    Stage 1's pairs come from pi_ref, stage 2's from the uniform distribution (any full-support mu has this
    minimiser)."""
    ref_logits, scores = problem()
    stages = sacpo.sacpo_stages(BETA, lambda_, order, "r", "g", "out")
    mus = [torch.softmax(ref_logits, -1), torch.full((K,), 1.0 / K, dtype=torch.float64)]
    theta, results = ref_logits, []
    for stage, mu in zip(stages, mus):
        theta = minimise(theta, scores[stage.preference], mu, stage.beta)
        results.append(theta)
    return results[0], results[1]


def optimum(reward_weight: float, safety_weight: float) -> torch.Tensor:
    """log pi_ref exp((a r + b g) / beta) / Z."""
    ref_logits, scores = problem()
    return torch.log_softmax(ref_logits + (reward_weight * scores["reward"] + safety_weight * scores["safety"]) / BETA,
                             -1)


def gap(logits: torch.Tensor, target: torch.Tensor) -> float:
    return float((torch.log_softmax(logits, -1) - target).abs().max())


@pytest.mark.parametrize("order", ["reward_first", "safety_first"])
@pytest.mark.parametrize("lambda_", LAMBDAS)
def test_two_stages_reach_the_constrained_optimum(order, lambda_):
    first, second = run_stages(lambda_, order)
    assert gap(second, optimum(1.0, lambda_)) < TOL
    # stage 1 alone is the optimum of its own score: pi_r* (beta), or pi_ref exp(lambda g / beta) (beta / lambda)
    assert gap(first, optimum(1.0, 0.0) if order == "reward_first" else optimum(0.0, lambda_)) < TOL
    assert gap(second, optimum(1.0, 0.0)) > 1e-2  # the safety stage moved it


@pytest.mark.parametrize("q", [0.25, 0.5, 0.75, 1.5])
def test_p_sacpo_interpolation_is_the_optimum_at_q_lambda(q):
    """Logits linear in the weights: (1 - q) theta_1 + q theta_2 = theta_ref + (r + q lambda g) / beta + const after
    reward_first, and theta_ref + (q r + lambda g) / beta + const after safety_first (q = 1.5 extrapolates)."""
    lambda_ = LAMBDAS[1]
    merged = sacpo.interpolate(*({"logits": t} for t in run_stages(lambda_, "reward_first")), q)["logits"]
    assert gap(merged, optimum(1.0, q * lambda_)) < TOL
    merged = sacpo.interpolate(*({"logits": t} for t in run_stages(lambda_, "safety_first")), q)["logits"]
    assert gap(merged, optimum(q, lambda_)) < TOL
