"""Online DPO's fixed point on a bandit, with online_dpo.py's own label and loss functions: Bradley-Terry labels reach
pi_ref exp(r_hat / beta) / Z; argmax labels (TRL's) move the mass onto the judge's best answer instead.

Setup: one prompt, K answers, pi_ref = softmax(random logits), judge scores s ~ U[0, 2]. A round samples the ordered
pair (y1, y2) = (i, j) from the current policy mu = pi_theta (held fixed within the round) and labels y1 chosen with
probability p_ij = online_dpo.label_probability(s_i, s_j, label), so the round's population loss over the logits is

    L(theta) = sum_{i != j} mu_i mu_j [ p_ij l(h_ij) + (1 - p_ij) l(h_ji) ],

with l the per-pair loss of online_dpo.dpo_loss against the round's reference. Online DPO takes one gradient step of
L per round; iterative DPO minimises it (here exactly, by Newton's method in float64) before sampling again.
"""

import pytest
import torch

import online_dpo
from helpers import newton_minimise

K, SEED, BETA = 5, 0, 0.5


def problem():
    g = torch.Generator().manual_seed(SEED)
    ref_logits = torch.randn(K, generator=g, dtype=torch.float64)
    return ref_logits, 2 * torch.rand(K, generator=g, dtype=torch.float64)


def round_loss(theta: torch.Tensor, mu: torch.Tensor, ref_logits: torch.Tensor, scores: torch.Tensor,
               label: str) -> torch.Tensor:
    i, j = [t.flatten() for t in torch.meshgrid(torch.arange(K), torch.arange(K), indexing="ij")]
    i, j = i[i != j], j[i != j]  # every ordered pair of distinct answers
    logp, ref = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
    first_chosen, _, _ = online_dpo.dpo_loss(logp[i], logp[j], ref[i], ref[j], BETA)
    second_chosen, _, _ = online_dpo.dpo_loss(logp[j], logp[i], ref[j], ref[i], BETA)
    p = online_dpo.label_probability(scores[i], scores[j], label)
    return (mu[i] * mu[j] * (p * first_chosen + (1 - p) * second_chosen)).sum()


def online(label: str, rounds: int) -> torch.Tensor:
    """Log-probs after `rounds` rounds of one gradient step (step size 2) each, sampling from the current policy."""
    ref_logits, scores = problem()
    theta = ref_logits.clone().requires_grad_(True)
    for _ in range(rounds):
        mu = torch.softmax(theta, -1).detach()
        (grad,) = torch.autograd.grad(round_loss(theta, mu, ref_logits, scores, label), theta)
        with torch.no_grad():
            theta -= 2.0 * grad
    return torch.log_softmax(theta.detach(), -1)


def target(times: float = 1.0) -> torch.Tensor:
    """log pi_ref exp(times * s / beta) / Z."""
    ref_logits, scores = problem()
    return torch.log_softmax(ref_logits + times * scores / BETA, -1)


def test_bradley_terry_labels_reach_the_kl_regularised_optimum():
    """Measured: max |log pi - log pi*| is 1.29 at pi_ref, 0.47 after 100 rounds, 2.1e-6 after 1,000, 1.8e-9 after
    1,500 and 1.6e-12 after 2,000 (the tolerance, 1e-9, leaves 600x)."""
    assert float((online("bradley_terry", 2000) - target()).abs().max()) < 1e-9


def test_argmax_labels_collapse_onto_the_judges_best_answer():
    """pi* puts 5.4% on the best-scored answer; argmax labels put 90% there after 100 rounds, 97% after 300, and the
    mass keeps rising: the labels are deterministic, so no finite policy fits them."""
    best = int(problem()[1].argmax())
    assert float(target().exp()[best]) < 0.06
    mass = [float(online("argmax", rounds).exp()[best]) for rounds in (100, 300)]
    assert 0.85 < mass[0] < mass[1]  # measured: 0.902, 0.968


def minimise(mu: torch.Tensor, ref_logits: torch.Tensor, label: str) -> torch.Tensor:
    """Iterative DPO's round: the exact minimiser of the round's loss, by Newton's method from the reference."""
    scores = problem()[1]
    return newton_minimise(lambda t: round_loss(t, mu, ref_logits, scores, label), ref_logits.clone())


@pytest.mark.parametrize("update_reference", [False, True])
def test_iterative_rounds_with_a_fixed_or_a_moving_reference(update_reference):
    """With pi_ref fixed, the first round lands on pi* and the next stays there, whatever it samples from; with the
    reference moved to each round's starting policy (--update_reference), round t lands on pi_ref exp(t s / beta)."""
    ref_logits = problem()[0]
    theta = ref_logits.clone()
    for t in (1, 2, 3):
        reference = theta if update_reference else ref_logits
        theta = minimise(torch.softmax(theta, -1), reference, "bradley_terry")
        expected = target(t if update_reference else 1.0)
        assert float((torch.log_softmax(theta, -1) - expected).abs().max()) < 1e-9
