"""The exact reward-KL plane of the toy world, shared by tests/test_frontier.py and benchmarks/frontier.py (issue 23).

A policy is a point: x = KL(pi || pi_ref) and y = E_pi[r], each the mean over the 8 toy prompts, with outcomes Y and
BOTTOM (everything the model can emit outside Y, reward 0) as toy.exact_logprobs gives them. BOTTOM lumps many
outcomes. r is 0 on all of them, so Z is the same on the lumped space and the bound below holds there; a policy's KL
and entropy there are lower bounds of its true ones (which matters only for policies with mass outside Y).

The frontier: pi_beta = pi_ref exp(r/beta) / Z_beta, one beta for every prompt, maximises the mean of
E_pi[r] - beta KL(pi || pi_ref) over all policies. So for any policy and any beta > 0,

    E_pi[r] <= beta * mean_x log Z_beta(x) + beta * KL(pi || pi_ref),

with equality at pi = pi_beta. The smallest right-hand side over beta is F(KL), the most reward any policy can have at
that KL: the frontier. F is evaluated at a KL by finding the beta whose pi_beta has that KL (bisection on log beta;
the KL falls as beta grows).

Curves below the frontier, each an optimum swept over beta, every one embedded with no mass on BOTTOM:
- forward KL and the alpha-divergences: f-DPO's optima on Y (tests/fdpo_toy.py);
- IPO's optimum on Y, pi_ref(.|Y) exp(p(y > mu)/beta) (toy.ipo_optimum_on_answers);
- a reward model's optimum, pi_ref(.|Y) exp(r_RM/beta) / Z, measured with the true r.
"""

from __future__ import annotations

import numpy as np

import fdpo_toy
import toy

world = toy.world
PROMPTS = world.PROMPTS
REWARDS = {p: world.reward_vector(p) for p in PROMPTS}  # over Y + BOTTOM


def embed(logp_y: np.ndarray) -> np.ndarray:
    """A distribution over Y as one over Y + BOTTOM with no mass on BOTTOM."""
    return np.append(logp_y, -np.inf)


def kl(logp: np.ndarray, logq: np.ndarray) -> float:
    """KL(p || q) over the same outcomes; outcomes where p is 0 add nothing."""
    p = np.exp(logp)
    live = p > 0
    return float(np.sum(p[live] * (logp[live] - logq[live])))


def point(policy: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """The exact figures of a policy (log-probs over Y + BOTTOM per prompt): its place in the plane, its entropy and
    the mass it puts outside Y, each the mean over prompts."""
    def mean(fn) -> float:
        return float(np.mean([fn(p) for p in PROMPTS]))

    return {"kl": mean(lambda p: kl(policy[p], reference[p])),
            "reward": mean(lambda p: float(np.exp(policy[p]) @ REWARDS[p])),
            "entropy": mean(lambda p: -kl(policy[p], np.zeros_like(policy[p]))),
            "mass_outside_y": mean(lambda p: float(np.exp(policy[p][-1])))}


def reverse_optimum(reference: dict[str, np.ndarray], beta: float) -> dict[str, np.ndarray]:
    """pi_beta = pi_ref exp(r/beta) / Z over Y + BOTTOM, per prompt."""
    return {p: world.optimum_logprobs(reference[p], REWARDS[p], beta) for p in PROMPTS}


def log_partition(reference: dict[str, np.ndarray], beta: float) -> float:
    """mean_x log Z_beta(x) = mean_x log sum_y pi_ref(y|x) exp(r(y)/beta)."""
    return float(np.mean([np.logaddexp.reduce(reference[p] + REWARDS[p] / beta) for p in PROMPTS]))


def upper_bound(kl_value: float, reference: dict[str, np.ndarray], beta: float) -> float:
    """beta mean log Z_beta + beta KL: no policy with that KL has more reward, for any beta > 0."""
    return beta * log_partition(reference, beta) + beta * kl_value


def best_answers_policy(reference: dict[str, np.ndarray], t: float) -> dict[str, np.ndarray]:
    """pi proportional to pi_ref^t on each prompt's best answers (r = max r), 0 elsewhere: every such policy has all
    the reward. t = 1 is the frontier's end (pi_ref on the best answers); t = 0 is uniform on them. Of all the
    policies with all the reward, these have the most entropy at their KL (the Lagrangian of entropy against KL gives
    log pi = t log pi_ref + c)."""
    out = {}
    for p in PROMPTS:
        best = REWARDS[p] == REWARDS[p].max()
        logits = np.where(best, t * reference[p], -np.inf)
        out[p] = logits - np.logaddexp.reduce(logits[best])
    return out


def past_the_end(kl_value: float, reference: dict[str, np.ndarray], iterations: int = 100) -> dict[str, float]:
    """Beyond the frontier's end every policy may have all the reward; point() of the one with the most entropy at
    that KL, best_answers_policy at the t whose KL it is (one t for every prompt, as the constraint is on the mean KL;
    the KL rises as t falls), or at t = 0 past uniform's KL."""
    if point(best_answers_policy(reference, 0.0), reference)["kl"] <= kl_value:
        return point(best_answers_policy(reference, 0.0), reference)
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        if point(best_answers_policy(reference, mid), reference)["kl"] > kl_value:
            low = mid
        else:
            high = mid
    return point(best_answers_policy(reference, (low + high) / 2), reference)


def frontier_at(kl_value: float, reference: dict[str, np.ndarray], iterations: int = 100) -> tuple[float, float]:
    """(F(kl_value), beta): the most E[r] at that KL(pi || pi_ref), and the beta of the pi_beta that has it. Past the
    largest KL any pi_beta reaches (all the mass on argmax r), F is max r."""
    if kl_value <= 0:
        return point(reference, reference)["reward"], np.inf
    low, high = np.log(1e-4), np.log(1e4)  # log beta; KL(pi_beta || pi_ref) falls as beta grows
    if point(reverse_optimum(reference, np.exp(low)), reference)["kl"] <= kl_value:
        return float(np.mean([REWARDS[p].max() for p in PROMPTS])), 0.0
    for _ in range(iterations):
        mid = (low + high) / 2
        if point(reverse_optimum(reference, np.exp(mid)), reference)["kl"] > kl_value:
            low = mid
        else:
            high = mid
    beta = float(np.exp((low + high) / 2))
    return point(reverse_optimum(reference, beta), reference)["reward"], beta


def curve(optimum, betas, reference: dict[str, np.ndarray]) -> list[dict[str, float]]:
    """point() of optimum(beta) for each beta, with beta in each."""
    return [{"beta": float(b), **point(optimum(b), reference)} for b in betas]


def divergence_optimum(reference: dict[str, np.ndarray], divergence: str, alpha: float | None = None):
    """beta -> f-DPO's optimum on Y (forward KL, JS or an alpha-divergence), embedded."""
    return lambda beta: {p: embed(lp) for p, lp in fdpo_toy.optima(reference, beta, divergence, alpha).items()}


def ipo_optimum(reference: dict[str, np.ndarray]):
    """beta -> IPO's population minimiser on Y, embedded."""
    return lambda beta: {p: embed(lp) for p, lp in toy.ipo_optimum_on_answers(reference, beta).items()}


def reward_model_optimum(reference: dict[str, np.ndarray], scores: dict[str, np.ndarray]):
    """beta -> pi_ref(.|Y) exp(r_RM/beta) / Z for reward-model scores over Y, embedded."""
    return lambda beta: {p: embed(world.optimum_logprobs(toy.on_answers(reference[p]), scores[p], beta))
                         for p in PROMPTS}


def distinct_n(policy: dict[str, np.ndarray], samples: int = 64, seed: int = 0) -> dict[str, float]:
    """Per-prompt distinct-1 and distinct-2 (distinct n-grams / all n-grams, Li et al. 2016) over `samples` answers
    drawn exactly from the policy, and the fraction of distinct answers among them, averaged over prompts. A draw of
    BOTTOM counts as one word of its own, "<bottom>". An empty answer has no n-grams: a policy that mostly answers
    nothing is scored on its few other answers, which distinct_answers shows."""
    rng = np.random.default_rng(seed)
    answers = [*world.RESPONSES, ("<bottom>",)]
    out = {"distinct_1": [], "distinct_2": [], "distinct_answers": []}
    for p in PROMPTS:
        probs = np.exp(policy[p])
        drawn = rng.choice(len(answers), size=samples, p=probs / probs.sum())
        for n, key in ((1, "distinct_1"), (2, "distinct_2")):
            grams = [tuple(answers[i][k : k + n]) for i in drawn for k in range(len(answers[i]) - n + 1)]
            out[key].append(len(set(grams)) / len(grams) if grams else 0.0)
        out["distinct_answers"].append(len(set(drawn.tolist())) / samples)
    return {k: float(np.mean(v)) for k, v in out.items()}
