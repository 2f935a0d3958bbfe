"""The reward-KL plane of benchmarks/frontier.py (tests/frontier_toy.py), checked exactly on the toy world: the
frontier pi_ref exp(r/beta) / Z is found again from its own KL, no other policy lies above it, each curve's optimum
satisfies its own optimality condition, and distinct-n counts as written. No training: the policies are the
reference, exact optima, the SFT data's distribution and a mixture."""

import sys

import numpy as np
import pytest

import frontier_toy as ft
import toy
from helpers import ROOT

world = toy.world
BETAS = (0.1, 0.5, 2.0)


@pytest.fixture(scope="module")
def reference():
    return toy.reference_logprobs()


@pytest.mark.slow  # enumerates the toy reference (once per session, shared with the other tests)
def test_each_reverse_kl_optimum_is_found_again_from_its_kl(reference):
    """frontier_at(KL(pi_beta)) returns pi_beta's beta and reward to 1e-9: the frontier passes through its optima."""
    for beta in BETAS:
        optimum = ft.point(ft.reverse_optimum(reference, beta), reference)
        reward, found = ft.frontier_at(optimum["kl"], reference)
        assert abs(found - beta) < 1e-9 * beta and abs(reward - optimum["reward"]) < 1e-9
        # and the bound is tight there: E[r] = beta mean log Z + beta KL
        assert abs(ft.upper_bound(optimum["kl"], reference, beta) - optimum["reward"]) < 1e-9


def points_below(reference) -> dict[str, dict]:
    """Policies that are not pi_beta: the reference, the SFT answers' distribution, a mixture of pi_ref and pi_0.5, and
    the forward-KL, alpha = 0.5 and IPO optima."""
    sft = {p: np.full(len(world.RESPONSES) + 1, -np.inf) for p in world.PROMPTS}
    for p in world.PROMPTS:
        for answer, mass in world.sft_answer_distribution(p).items():
            sft[p][world.RESPONSE_INDEX[answer]] = np.log(mass)
    half = ft.reverse_optimum(reference, 0.5)
    mixture = {p: np.logaddexp(reference[p], half[p]) - np.log(2) for p in world.PROMPTS}
    policies = {"reference": reference, "sft": sft, "mixture": mixture,
                "forward_kl": ft.divergence_optimum(reference, "forward_kl")(0.5),
                "alpha_0.5": ft.divergence_optimum(reference, "alpha", 0.5)(0.5),
                "ipo": ft.ipo_optimum(reference)(0.5)}
    return {name: ft.point(policy, reference) for name, policy in policies.items()}


@pytest.mark.slow  # enumerates the toy reference (once per session, shared with the other tests)
def test_no_policy_lies_above_the_frontier(reference):
    """Every point is at or below F(KL), and below beta mean log Z + beta KL for every beta on a grid (the bound's
    certificate, which needs no bisection)."""
    for name, f in points_below(reference).items():
        frontier, _ = ft.frontier_at(f["kl"], reference)
        assert f["reward"] <= frontier + 1e-9, name
        for beta in np.geomspace(0.05, 20, 25):
            assert f["reward"] <= ft.upper_bound(f["kl"], reference, beta) + 1e-9, (name, beta)
        if name != "reference":  # strictly below: short of the frontier's end, only pi_beta reaches it
            assert f["reward"] < frontier - 1e-4, name


@pytest.mark.slow  # enumerates the toy reference (once per session, shared with the other tests)
def test_each_curve_optimum_meets_its_own_condition(reference):
    """On Y, with q = pi_ref(.|Y): the forward-KL optimum is beta q / (lambda - r), so (lambda - r) pi / q is the same
    beta for every answer; the alpha-divergence optimum is q (1 - alpha (r - lambda)/beta)^(-1/alpha), so
    r + beta ((pi/q)^(-alpha) - 1)/alpha is the same lambda for every answer; IPO's is q exp(p(y > mu)/beta) / Z, so
    log pi - log q - p/beta is the same for every answer. Each to 1e-9."""
    beta, alpha = 0.5, 0.5
    forward = ft.divergence_optimum(reference, "forward_kl")(beta)
    alpha_optimum = ft.divergence_optimum(reference, "alpha", alpha)(beta)
    ipo = ft.ipo_optimum(reference)(beta)
    for p in world.PROMPTS:
        lam = world.reward_vector(p)[:-1] + beta * (np.exp(-alpha * (alpha_optimum[p][:-1]
                                                                       - toy.on_answers(reference[p]))) - 1) / alpha
        assert lam.max() - lam.min() < 1e-9
        q, r = toy.on_answers(reference[p]), world.reward_vector(p)[:-1]
        pi = np.exp(forward[p][:-1])
        lam = r.max() + beta * pi[r.argmax()] ** -1 * np.exp(q[r.argmax()])  # from pi = beta q / (lam - r) at argmax
        assert np.abs((lam - r) * pi / np.exp(q) - beta).max() < 1e-9
        gap = ipo[p][:-1] - q - toy.win_rate_against_reference(p, reference) / beta
        assert gap.max() - gap.min() < 1e-9
        assert forward[p][-1] == ipo[p][-1] == -np.inf  # no mass outside Y


def test_distinct_n_by_hand():
    """All mass on "great food": 64 identical answers hold 128 words (2 distinct) and 64 bigrams (1 distinct).
    Half on "great food", half on "food great", 64 draws: 2 distinct words, and 2 distinct bigrams out of 64 (both
    answers are drawn at every prompt: the chance that one is missing from 64 draws is 2^-63)."""
    one = {p: np.full(len(world.RESPONSES) + 1, -np.inf) for p in world.PROMPTS}
    two = {p: np.full(len(world.RESPONSES) + 1, -np.inf) for p in world.PROMPTS}
    for p in world.PROMPTS:
        one[p][world.RESPONSE_INDEX[("great", "food")]] = 0.0
        two[p][world.RESPONSE_INDEX[("great", "food")]] = two[p][world.RESPONSE_INDEX[("food", "great")]] = np.log(0.5)
    assert ft.distinct_n(one) == {"distinct_1": 2 / 128, "distinct_2": 1 / 64, "distinct_answers": 1 / 64}
    assert ft.distinct_n(two) == {"distinct_1": 2 / 128, "distinct_2": 2 / 64, "distinct_answers": 2 / 64}


def test_distinct_n_of_bottom_and_of_the_empty_answer():
    """BOTTOM counts as one word with no bigrams: 64 draws of it give distinct-1 1/64 and distinct-2 0 (no bigrams at
    all). The empty answer has no words: distinct-1 and distinct-2 are 0. Each is one answer of 64."""
    bottom = {p: np.full(len(world.RESPONSES) + 1, -np.inf) for p in world.PROMPTS}
    empty = {p: np.full(len(world.RESPONSES) + 1, -np.inf) for p in world.PROMPTS}
    for p in world.PROMPTS:
        bottom[p][-1] = 0.0
        empty[p][world.RESPONSE_INDEX[()]] = 0.0
    assert ft.distinct_n(bottom) == {"distinct_1": 1 / 64, "distinct_2": 0.0, "distinct_answers": 1 / 64}
    assert ft.distinct_n(empty) == {"distinct_1": 0.0, "distinct_2": 0.0, "distinct_answers": 1 / 64}


@pytest.mark.slow  # enumerates the toy reference (once per session, shared with the other tests)
def test_past_the_frontiers_end(reference):
    """The frontier ends at pi_ref on the best answers (pi_beta as beta -> 0): their KLs agree to 1e-9. Past it, F is
    max r, and the policies with all the reward and the most entropy at a KL are pi_ref^t on the best answers: their
    KL rises and their entropy rises as t falls, up to the uniform's log |best| at t = 0. benchmarks/frontier.py's
    measure() reads a point mass on one best answer per prompt that way: F 4, and that policy's entropy 0 is below
    the most entropy at its KL."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import frontier

    end = ft.point(ft.best_answers_policy(reference, 1.0), reference)
    assert abs(end["kl"] - ft.point(ft.reverse_optimum(reference, 1e-4), reference)["kl"]) < 1e-9
    assert ft.frontier_at(end["kl"] + 0.1, reference) == (4.0, 0.0)
    ts = [ft.point(ft.best_answers_policy(reference, t), reference) for t in (1.0, 0.5, 0.0)]
    assert ts[0]["kl"] < ts[1]["kl"] < ts[2]["kl"] and ts[0]["entropy"] < ts[1]["entropy"] < ts[2]["entropy"]
    best = len([y for y in world.RESPONSES if world.reward(world.PROMPTS[0], y) == 4.0])
    assert abs(ts[2]["entropy"] - np.log(best)) < 1e-9  # every prompt has as many best answers as the first
    single = {p: np.full(len(world.RESPONSES) + 1, -np.inf) for p in world.PROMPTS}
    for p in world.PROMPTS:
        single[p][world.RESPONSE_INDEX[("great", world.prompt_topic(p))]] = 0.0
    measured = frontier.measure("PPO (β 0.1)", single)
    assert measured["reward"] == 4.0 and measured["frontier"] == 4.0 and measured["kl"] > end["kl"]
    assert measured["entropy"] == 0.0 and measured["frontier_entropy"] > end["entropy"]
