"""SLiC-HF's population loss on a tabular policy with deterministic preferences (arXiv:2305.10425).

Setup: prompts x, K responses each, reference pi_ref(.|x) = softmax(random logits), distinct random rewards, and
deterministic preferences: i beats j whenever r_i > r_j. Pairs are drawn from mu(.|x), so the hinge part is

    L_hinge(pi) = sum_x sum_{r_i > r_j} mu_i mu_j max(0, delta - (log pi_i - log pi_j)),

zero exactly on the policies that meet every margin, log pi_i - log pi_j >= delta whenever i beats j. That set is
a cone, not a point: unlike DPO and IPO, SLiC-HF has no unique optimum, and where descent stops depends on where it
starts. What is guaranteed, and tested, is that minimising reaches the set: every margin met, hinge exactly 0.
With a target y_ref (here the best answer) the regulariser -lambda log pi(y_ref) has no minimum on that set: its
infimum puts all the mass on y_ref, and descent keeps every margin while moving toward it.
"""
import pytest
import torch

from slic_hf import slic_loss

N_PROMPTS, N_RESPONSES, SEED = 3, 6, 0


def problem(mu_name):
    gen = torch.Generator().manual_seed(SEED)
    ref_logits = torch.randn(N_PROMPTS, N_RESPONSES, generator=gen, dtype=torch.float64)
    reward = torch.rand(N_PROMPTS, N_RESPONSES, generator=gen, dtype=torch.float64)
    mu = torch.softmax(ref_logits, -1) if mu_name == "ref" else torch.full_like(ref_logits, 1 / N_RESPONSES)
    i, j = torch.tensor([(a, b) for a in range(N_RESPONSES) for b in range(N_RESPONSES) if a != b]).T
    wins = reward[:, i] > reward[:, j]  # (X, K(K-1)): the ordered pairs (i, j) with i preferred
    weights = mu[:, i] * mu[:, j] * wins
    return ref_logits, reward, i, j, weights / weights.sum()


def population_loss(logits, i, j, weights, delta, lam, target):
    """sum over ordered pairs of weight * slic_loss, with y_ref = `target` (an index per prompt)."""
    logp = torch.log_softmax(logits, -1)
    target_logp = logp.gather(-1, target[:, None]).expand(-1, len(i))
    losses, hinge, margins = slic_loss(logp[:, i].reshape(-1), logp[:, j].reshape(-1), target_logp.reshape(-1),
                                       delta=delta, lambda_reg=lam)
    return (weights.reshape(-1) * losses).sum(), (weights.reshape(-1) * hinge).sum(), margins.view(N_PROMPTS, -1)


def descend(logits, i, j, weights, delta, lam, target, steps=4000):
    """Adam on the population loss for `steps` steps; with no regulariser (lam = 0), it stops where the hinge is
    exactly 0, since every margin is then met and the loss is flat (measured: after 215 to 2,032 steps)."""
    logits = logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        loss, hinge, _ = population_loss(logits, i, j, weights, delta, lam, target)
        if lam == 0 and hinge.item() == 0.0:
            break
        loss.backward()
        opt.step()
    return logits.detach()


@pytest.mark.parametrize("delta", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("mu_name", ["ref", "uniform"])
def test_minimising_the_hinge_meets_every_margin(mu_name, delta):
    ref_logits, reward, i, j, weights = problem(mu_name)
    best = reward.argmax(-1)
    _, hinge0, margins0 = population_loss(ref_logits, i, j, weights, delta, 0.0, best)
    assert hinge0 > 0.1  # the reference breaks many margins
    logits = descend(ref_logits, i, j, weights, delta, 0.0, best)
    _, hinge, margins = population_loss(logits, i, j, weights, delta, 0.0, best)
    assert hinge.item() == 0.0  # exactly: every term of the hinge is max(0, negative)
    assert (margins[weights > 0] >= delta).all()


def test_the_hinge_has_no_unique_minimiser():
    """Logits spaced 1.5 delta apart in reward order, and 3 delta apart: two different policies, both with zero
    hinge loss. SLiC-HF's hinge alone does not pin the policy down (DPO's and IPO's losses do, on mu's support)."""
    ref_logits, reward, i, j, weights = problem("uniform")
    rank = reward.argsort(-1).argsort(-1).double()  # 0 for the worst answer, K-1 for the best
    best = reward.argmax(-1)
    policies = [torch.softmax(spacing * rank, -1) for spacing in (1.5, 3.0)]
    for spacing in (1.5, 3.0):
        _, hinge, margins = population_loss(spacing * rank, i, j, weights, 1.0, 0.0, best)
        assert hinge.item() == 0.0 and (margins[weights > 0] >= 1.0).all()
    assert (policies[0] - policies[1]).abs().max() > 0.1


def test_with_a_target_the_margins_hold_and_mass_moves_to_it():
    """lambda = 0.1 with y_ref the best answer: the infimum is pi(y_ref) = 1, which meets every margin (the others'
    ratios can stay >= e^delta apart while they vanish). Descent keeps the hinge at 0 and raises pi(y_ref) steadily."""
    ref_logits, reward, i, j, weights = problem("uniform")
    best = reward.argmax(-1)
    masses = []
    logits = ref_logits
    for _ in range(3):
        logits = descend(logits, i, j, weights, 1.0, 0.1, best, steps=1000)
        _, hinge, margins = population_loss(logits, i, j, weights, 1.0, 0.1, best)
        assert hinge.item() < 1e-3 and (margins[weights > 0] >= 1.0 - 0.05).all()  # Adam's step size at the kink
        masses.append(torch.softmax(logits, -1).gather(-1, best[:, None]).min().item())
    assert masses[0] < masses[1] < masses[2] and masses[2] > 0.9
