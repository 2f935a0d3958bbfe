"""rrhf.py end to end on the toy world: through its real data, tokenization and log-prob code, measured exactly.

RRHF has no KL term and no closed-form target on the toy world (its population minimiser depends on which answer is
best in each sampled group, test_rrhf_optimum.py), so what is measured is what the method promises: the exact
expected reward of the policy rises, and the policy's length-normalised log-probs p_i come to order held-out groups
as the true scores do (Kendall's tau over each group's untied pairs, mean over the 235 test groups that have one).
"""

import json

import numpy as np
import pytest

import rrhf
import toy
from conftest import MEASURED
from helpers import TOY

# trains for epochs of the toy groups (one test against the session's toy_reward_model) and enumerates the toy world
pytestmark = pytest.mark.slow

world = toy.world
RM_R, RM_TAU = 2.476, 0.838  # measured with the reward model, below


def held_out_groups() -> list[tuple[str, list[int], list[int], list[float]]]:
    """(prompt, answer indices in Y, token counts (words + <|end|>), scores) of each toy test group."""
    groups = []
    for line in (TOY / "ranked" / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        answers = [tuple(c[0]["content"].split()) for c in row["completions"]]
        groups.append((row["prompt"][0]["content"], [world.RESPONSE_INDEX[y] for y in answers],
                       [len(y) + 1 for y in answers], row["scores"]))
    return groups


def kendall_tau(policy: dict) -> float:
    """Mean over groups with an untied pair of (concordant - discordant) / untied pairs, p_i = log pi(y_i|x) / |y_i|."""
    taus = []
    for prompt, answers, lengths, scores in held_out_groups():
        p = [policy[prompt][i] / n for i, n in zip(answers, lengths)]
        pairs = [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] < scores[j]]
        if pairs:
            taus.append(sum(np.sign(p[j] - p[i]) for i, j in pairs) / len(pairs))
    return float(np.mean(taus))


def measure(name: str, policy: dict) -> tuple[float, float, float, float]:
    reference = toy.reference_logprobs()
    r_ref, r = toy.expected_reward(reference), toy.expected_reward(policy)
    tau_ref, tau = kendall_tau(reference), kendall_tau(policy)
    entropy = lambda d: float(np.mean([world.summarize(d[p], world.reward_vector(p))["entropy"]  # noqa: E731
                                       for p in world.PROMPTS]))
    MEASURED.append(f"{name}: E[r] {r_ref:.3f} -> {r:.3f}; held-out Kendall tau(p, scores) {tau_ref:.3f} -> {tau:.3f}; "
                    f"entropy {entropy(reference):.3f} -> {entropy(policy):.3f}; "
                    f"mass outside Y {toy.bottom_mass(policy):.4f}")
    return r_ref, r, tau_ref, tau


def test_rrhf_raises_reward_and_ranks_held_out_groups(tmp_path):
    """The default run (2 epochs, true scores). Measured: E[r] 1.849 -> 2.522, tau 0.284 -> 0.821; held to at least
    half of each gain."""
    rrhf.train(rrhf.Args(output_dir=str(tmp_path / "rrhf"), eval_steps=0, logging_steps=10_000, device="cpu"))
    r_ref, r, tau_ref, tau = measure("python rrhf.py (defaults)", toy.exact_logprobs(tmp_path / "rrhf"))
    assert r - r_ref > 0.5 * (2.522 - 1.849)
    assert tau - tau_ref > 0.5 * (0.821 - 0.284)


def test_rrhf_with_a_learned_reward_model(tmp_path, toy_reward_model):
    """The paper's setting: the same responses, scored by `python reward_model.py`'s model rather than the true reward.
    Measured: E[r] 1.849 -> 2.476, tau against the true scores 0.284 -> 0.838; held to at least half of each gain."""
    rrhf.train(rrhf.Args(reward_model_path=toy_reward_model.path, output_dir=str(tmp_path / "rrhf"), eval_steps=0,
                         logging_steps=10_000, device="cpu"))
    r_ref, r, tau_ref, tau = measure("python rrhf.py --reward_model_path runs/reward_model",
                                     toy.exact_logprobs(tmp_path / "rrhf"))
    assert r - r_ref > 0.5 * (RM_R - 1.849)
    assert tau - tau_ref > 0.5 * (RM_TAU - 0.284)
