"""online_dpo.py end to end on the toy world: `python reward_model.py && python online_dpo.py`, through its real
sampling, scoring, labelling and DPO code, measured exactly.

Its target is the judge's KL-regularised optimum pi*_RM = pi_ref exp(r_RM / beta) / Z, with r_RM the reward model's
score, computed here for every answer in Y (test_ppo_toy_world.py's enumeration). As for PPO, the policy also samples
outside Y (no <|end|> within 5 tokens, or a special token mid-answer); those outcomes are too many to score, so the
distance is taken on Y, KL(pi(.|Y) || pi*_RM(.|Y)), with the mass outside Y reported beside it.
"""

import numpy as np
import pytest

import online_dpo
import toy
from conftest import MEASURED
from helpers import python
from test_ppo_toy_world import all_reward_model_scores, optimum_on_answers

# needs the session's toy_reward_model, trains 200 rounds and enumerates the toy world
pytestmark = pytest.mark.slow

world = toy.world


def test_online_dpo_moves_toward_the_judges_optimum(tmp_path, toy_reward_model):
    """The default run (beta 0.1, 200 rounds of 32 prompts, Bradley-Terry labels), against the session's reward model.

    Measured over seeds 1, 2, 3 (with a reward model from the same default run): KL to pi*_RM on Y 27.6%, 27.1% and
    27.6% of the reference's; E[r] 1.849 -> 2.945, 3.038, 2.873; mass outside Y 0.015, 0.032, 0.023. Seed 1 again,
    after pair_logps and load_model changed in their last bits: 27.4%, E[r] 2.924, mass outside Y 0.035. The bound is
    the worst seed plus the seeds' range, rounded up to a whole point: 29%. The mass outside Y stays under 5%.
    """
    args = online_dpo.Args(reward_model_path=toy_reward_model.path, output_dir=str(tmp_path / "online"),
                           logging_steps=10_000, eval_steps=0, device="cpu")
    metrics = online_dpo.train(args)
    r_rm = all_reward_model_scores(toy_reward_model.path)
    reference, policy = toy.reference_logprobs(), toy.exact_logprobs(tmp_path / "online")
    optimum = {p: optimum_on_answers(reference[p], r_rm[p], args.beta) for p in world.PROMPTS}

    def kl_to_optimum(pi: dict) -> float:
        return float(np.mean([world.kl(toy.on_answers(pi[p]), optimum[p]) for p in world.PROMPTS]))

    f = {"kl_ref": kl_to_optimum(reference), "kl": kl_to_optimum(policy),
         "reward_ref": toy.expected_reward(reference), "reward": toy.expected_reward(policy),
         "reward_opt": float(np.mean([np.exp(optimum[p]) @ world.reward_vector(p)[:-1] for p in world.PROMPTS])),
         "bottom": toy.bottom_mass(policy)}
    MEASURED.append(
        f"online_dpo.py defaults (beta={args.beta}, {args.num_rounds} rounds, {args.label} labels): "
        f"KL(pi|Y || pi*_RM|Y) {f['kl_ref']:.3f} -> {f['kl']:.3f} ({f['kl'] / f['kl_ref']:.1%} of the reference's); "
        f"E[r] {f['reward_ref']:.3f} -> {f['reward']:.3f} (pi*_RM {f['reward_opt']:.3f}); mass outside Y "
        f"{f['bottom']:.3f}; last round's score {metrics['objective/score']:.3f}")
    assert f["kl"] < 0.29 * f["kl_ref"]
    assert f["reward"] > f["reward_ref"] + 0.5 * (f["reward_opt"] - f["reward_ref"])
    assert f["bottom"] < 0.05


def test_default_command_runs(tmp_path, toy_reward_model):
    """`python online_dpo.py`, given the session's reward model and capped at 20 rounds: it completes, prints its
    steps and held-out pairs, and saves a model that loads."""
    result = python("online_dpo.py", "--num_rounds", "20", "--reward_model_path", toy_reward_model.path,
                    "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 8 prompts kept of 8" in result.stdout and "step 20:" in result.stdout
    assert "held-out pairs after round 20" in result.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
