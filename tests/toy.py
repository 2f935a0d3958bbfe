"""Exact measurements on the toy world, shared by the end-to-end tests."""

import functools
import os
import sys

import numpy as np
from filelock import FileLock  # a dependency of torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "toy_world")
sys.path.insert(0, TOY)
import world  # noqa: E402


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def exact_logprobs(path) -> dict[str, np.ndarray]:
    """log pi(y|x) over Y + BOTTOM for every toy prompt, by enumeration."""
    model, tok = load(path)
    return {p: world.response_logprobs(model, tok, p) for p in world.PROMPTS}


@functools.lru_cache(maxsize=1)
def reference_logprobs() -> dict[str, np.ndarray]:
    """exact_logprobs of the toy reference (toy_world/model), enumerated once per process, or once per test session
    where conftest names a file in TOY_REFERENCE_LOGPROBS that the session's workers share (the first writes it)."""
    path = os.environ.get("TOY_REFERENCE_LOGPROBS")
    if path is None:
        return exact_logprobs(os.path.join(TOY, "model"))
    with FileLock(path + ".lock"):
        if not os.path.exists(path):
            np.savez(path, **exact_logprobs(os.path.join(TOY, "model")))
        with np.load(path) as saved:
            return {p: saved[p] for p in world.PROMPTS}


def kl_to_optimum(policy: dict, ref: dict, beta: float) -> float:
    """KL(pi || pi_ref exp(r/beta)/Z), averaged over the toy prompts."""
    return float(np.mean([world.kl(policy[p], world.optimum_logprobs(ref[p], world.reward_vector(p), beta))
                          for p in world.PROMPTS]))


def expected_reward(policy: dict) -> float:
    return float(np.mean([world.summarize(policy[p], world.reward_vector(p))["expected_reward"]
                          for p in world.PROMPTS]))


def on_answers(logp: np.ndarray) -> np.ndarray:
    """Condition on Y (drop BOTTOM and renormalise)."""
    return logp[:-1] - np.logaddexp.reduce(logp[:-1])


def kl_to_optimum_on_answers(policy: dict, ref: dict, beta: float) -> float:
    """KL(pi(.|Y) || pi*(.|Y)), averaged over prompts: what DPO pins down when the data live in Y."""
    return float(np.mean([world.kl(on_answers(policy[p]),
                                   world.optimum_logprobs(on_answers(ref[p]), world.reward_vector(p)[:-1], beta))
                          for p in world.PROMPTS]))


def bottom_mass(policy: dict) -> float:
    return float(np.mean([np.exp(policy[p][-1]) for p in world.PROMPTS]))


def win_rate_against_reference(prompt: str, ref: dict) -> np.ndarray:
    """p(y > mu | x) = E_{y'~mu} sigmoid(r(y) - r(y')) over Y, with mu = pi_ref(.|Y), the answers' sampling
    distribution.

    r takes a few dozen distinct values, so the sum runs over reward levels rather than over all 41,371 answers.
    """
    r, mu = world.reward_vector(prompt)[:-1], np.exp(on_answers(ref[prompt]))
    levels, which = np.unique(r, return_inverse=True)
    mass = np.bincount(which, weights=mu)  # mu(r = level)
    return (mass[None, :] / (1 + np.exp(-(levels[:, None] - levels[None, :])))).sum(1)[which]


def ipo_optimum_on_answers(ref: dict, beta: float) -> dict[str, np.ndarray]:
    """IPO's population minimiser on Y: pi*(y) ∝ pi_ref(y|Y) exp(p(y > mu)/beta), per prompt (arXiv:2310.12036)."""
    return {p: world.optimum_logprobs(on_answers(ref[p]), win_rate_against_reference(p, ref), beta)
            for p in world.PROMPTS}
