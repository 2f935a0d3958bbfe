"""The toy world's safety function g and its safety_pairs/ data (for sacpo.py, issue 20), and the exact constrained
optimum they define: max E[r] - beta KL(pi || pi_ref) subject to E[g] >= b, whose solution is
pi* = pi_ref exp((r + lambda* g) / beta) / Z with lambda* the constraint's multiplier (SACPO, Wachi et al. 2024).

g(x, y) = 2 minus the number of exaggerating words ("very", "great", "awful"), floored at 0 (toy_world/world.py).
"""

import functools
import json
import math

import numpy as np
import pytest

import toy
from conftest import MEASURED
from helpers import TOY

world = toy.world
P = "how was the food ?"
BETA, BOUND = 1.0, 1.7  # at beta = 1, pi_r* has E[g] 1.449 (the reference 1.529): b = 1.7 binds


@pytest.mark.parametrize("answer, r, g", [
    ("great food", 4.0, 1.0),  # r's best answers exaggerate
    ("very good food", 4.0, 1.0),
    ("very great food", 4.0, 0.0),
    ("good food", 3.5, 2.0),  # calm and nearly as good
    ("the food was good", 3.5, 2.0),
    ("awful party", 0.0, 1.0),  # unkind and unsafe
    ("very very awful", 1.0, 0.0),  # sentiment -2 -> -1; no topic: r = 1; three exaggerations floor g at 0
    ("", 2.0, 2.0),
])
def test_safety_by_hand(answer, r, g):
    words = tuple(answer.split())
    assert world.reward(P, words) == r and world.safety(P, words) == g


def test_safety_pairs_are_bradley_terry_in_g():
    """Among train pairs whose answers differ in g, the chosen one is the calmer in a fraction that matches the
    Bradley-Terry expectation E[sigmoid(|g1 - g2|)] over those pairs, within 4 binomial standard errors."""
    calmer, expected, n = 0, 0.0, 0
    for line in (TOY / "safety_pairs" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompt = row["prompt"][0]["content"]
        g_chosen, g_rejected = (world.safety(prompt, tuple(row[k][0]["content"].split())) for k in ("chosen",
                                                                                                    "rejected"))
        if g_chosen != g_rejected:
            n += 1
            calmer += g_chosen > g_rejected
            expected += 1 / (1 + math.exp(-abs(g_chosen - g_rejected)))
    rate, p = calmer / n, expected / n
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (rate, p, n)


@functools.lru_cache(maxsize=None)
def over_answers(name: str, prompt: str) -> np.ndarray:
    """r or g over Y (BOTTOM dropped), computed once."""
    return (world.reward_vector if name == "r" else world.safety_vector)(prompt)[:-1]


def optimum(reference: dict, lam: float, beta: float = BETA) -> dict:
    """pi_ref exp((r + lam g) / beta) / Z over Y, per prompt (log-probs)."""
    return {x: world.optimum_logprobs(toy.on_answers(reference[x]), over_answers("r", x) + lam * over_answers("g", x),
                                      beta)
            for x in world.PROMPTS}


def mean(policy: dict, name: str) -> float:
    return float(np.mean([np.exp(policy[x]) @ over_answers(name, x) for x in world.PROMPTS]))


def kl_from_reference(policy: dict, reference: dict) -> float:
    return float(np.mean([world.kl(policy[x], toy.on_answers(reference[x])) for x in world.PROMPTS]))


def lambda_star(reference: dict, bound: float = BOUND, beta: float = BETA) -> float:
    """The lambda at which pi_ref exp((r + lambda g) / beta) / Z has E[g] = bound, by bisection (E[g] rises with
    lambda: its derivative is Var(g) / beta)."""
    lo, hi = 0.0, 100.0
    for _ in range(60):  # 100 / 2^60: below float64's resolution of lambda
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(optimum(reference, mid, beta), "g") < bound else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.slow  # enumerates the toy reference (shared with the other end-to-end tests)
def test_the_exact_constrained_optimum():
    """lambda* by bisection, E_pi*[g] = b to 1e-9; the
    constraint binds (pi_r* breaks it); and the stepwise route, pi_r* then realigned toward g with beta / lambda*,
    reaches the same policy (SACPO's Theorem 1), here to 1e-10 in log-probability."""
    reference = toy.reference_logprobs()
    lam = lambda_star(reference)
    best, reward_only = optimum(reference, lam), optimum(reference, 0.0)
    assert mean(best, "g") == pytest.approx(BOUND, abs=1e-9)
    assert mean(reward_only, "g") < BOUND and lam > 0
    stepwise = {x: world.optimum_logprobs(reward_only[x], over_answers("g", x), BETA / lam)
                for x in world.PROMPTS}
    assert max(float(np.abs(stepwise[x] - best[x]).max()) for x in world.PROMPTS) < 1e-10
    rows = {"pi_ref": {x: toy.on_answers(reference[x]) for x in world.PROMPTS}, "pi_r*": reward_only,
            "pi* (E[g] >= 1.7)": best}
    MEASURED.append(f"toy world, E[g] >= {BOUND} at beta = {BETA}: lambda* = {lam:.4f}; " + "; ".join(
        f"{name}: E[r] {mean(p, 'r'):.3f}, E[g] {mean(p, 'g'):.3f}, "
        f"KL(pi || pi_ref) {kl_from_reference(p, reference):.3f}" for name, p in rows.items()))
