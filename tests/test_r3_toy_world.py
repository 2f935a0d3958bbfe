"""R3 (ppo_rlhf.py --reward r3) and relevance alone (--reward relevance) on the toy world, measured exactly.

The toy relevance encoder (toy_world/relevance_model; docs/toy_world.md says how it was made) scores every answer in
Y against every prompt and reference answer, so each reward R's optimum pi_ref exp(R/beta)/Z is exact, and so is
every figure below:
- the copy mass: answers that are a span of the prompt at least three words long, plus the one copy outside Y, the
  whole five-word question with no <|end|> (the response budget is five tokens), whose probability is exact too;
- the true E[r] (world.reward; the mass outside Y earns 0), and the distribution of answer lengths;
- for a trained policy, KL(pi|Y || pi*|Y) as a fraction of the reference's, as test_ppo_toy_world.py reports it.

The relevance reward is hacked: its exact optimum copies the question with 40% of its mass (the paper: about 40% of
outputs) and gives short answers the rest. R3's optimum copies less: its reference-answer form (the constrained prompts,
"was the food good ?") leaves no copies, while its length incentive (the open-ended prompts, "how was the food ?")
moves them from three words to four, since no toy answer can be longer than a copy. PPO, in NUM_ROLLOUTS rollouts,
finds the short answers but not the copies, whose reference probability is about 1e-4 (docs/r3.md).
"""

import functools

import numpy as np
import pytest
import torch

import ppo_rlhf as ppo
import toy
from conftest import MEASURED
from helpers import TOY

pytestmark = pytest.mark.slow  # enumerates the toy world and trains two runs of NUM_ROLLOUTS

world = toy.world
NUM_ROLLOUTS = 30  # of the default 100
BETA = {"relevance": 0.1, "r3": 0.005}  # R3's rewards are about 1/30 of the relevance's: LI = words/100 <= 0.04
MAX_NEW_TOKENS = ppo.Args.max_new_tokens  # 5, which sets F's scale


@functools.lru_cache(maxsize=1)
def exact_rewards() -> dict[str, dict[str, np.ndarray]]:
    """exact_rewards()[kind][prompt]: --reward relevance's and r3's score of every answer in Y, through the script's own
    encoder code and reward."""
    encoder, tokenizer = ppo.load_encoder(str(TOY / "relevance_model"), torch.device("cpu"))
    texts = [" ".join(y) for y in world.RESPONSES]
    words = [ppo.wordpunct(t) for t in texts]
    length_incentive = torch.tensor([ppo.length_incentive(w) for w in words])
    repetition = torch.tensor([ppo.repetition_penalty(w) for w in words])
    with torch.no_grad():
        answers = torch.cat([ppo.mean_pooled(encoder, tokenizer, texts[i : i + 8192])
                             for i in range(0, len(texts), 8192)])  # (|Y|, H)
        out = {"relevance": {}, "r3": {}}
        for prompt in world.PROMPTS:
            open_ended = world.query_type(prompt) == "open_ended"
            against = prompt if open_ended else world.reference_answer(prompt)
            relevance_x = answers @ ppo.mean_pooled(encoder, tokenizer, [prompt])[0]
            relevance = answers @ ppo.mean_pooled(encoder, tokenizer, [against])[0]
            out["relevance"][prompt] = relevance_x.double().numpy()
            out["r3"][prompt] = ppo.r3_reward(relevance, torch.full((len(texts),), open_ended), length_incentive,
                                              repetition, MAX_NEW_TOKENS).double().numpy()
    return out


@pytest.fixture(scope="module")
def rewards() -> dict[str, dict[str, np.ndarray]]:
    return exact_rewards()


COPIES = {p: np.array([world.is_copy(p, y) for y in world.RESPONSES]) for p in world.PROMPTS}
LENGTHS = np.array([len(y) for y in world.RESPONSES])


@torch.no_grad()
def whole_question_logprob(path) -> dict[str, float]:
    """log pi(the prompt's five words, then the budget ends | x): the copy that lies outside Y."""
    model, tokenizer = toy.load(path)
    out = {}
    for prompt in world.PROMPTS:
        query, words = world.prompt_ids(tokenizer, prompt), tokenizer.convert_tokens_to_ids(prompt.split())
        logits = model(input_ids=torch.tensor([query + words])).logits[0, len(query) - 1 : -1].double()
        out[prompt] = float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(words)[:, None]).sum())
    return out


def figures(policy: dict, outside: dict | None = None) -> dict:
    """Copy mass (with the copy outside Y where its log-prob is given), true E[r], length distribution over Y (and
    the mass outside it), averaged over the prompts."""
    copy = np.mean([np.exp(policy[p][:-1]) @ COPIES[p] + (np.exp(outside[p]) if outside else 0.0)
                    for p in world.PROMPTS])
    lengths = np.mean([[np.exp(policy[p][:-1])[LENGTHS == k].sum() for k in range(5)] + [np.exp(policy[p][-1])]
                       for p in world.PROMPTS], axis=0)  # P(0..4 words), then the mass outside Y
    by_type = {t: float(np.mean([np.exp(policy[p][:-1]) @ COPIES[p] for p in world.PROMPTS
                                 if world.query_type(p) == t])) for t in ("open_ended", "constrained")}
    return {"copy": float(copy), "reward": toy.expected_reward(policy), "lengths": lengths,
            "outside": float(lengths[5]), "mean_length": float(lengths[:5] @ np.arange(5) / lengths[:5].sum()),
            **by_type}


def optimum(reference: dict, reward: dict, beta: float) -> dict:
    """log pi* over Y, with BOTTOM at -inf (the optimum on Y never leaves it)."""
    return {p: np.append(world.optimum_logprobs(toy.on_answers(reference[p]), reward[p], beta), -np.inf)
            for p in world.PROMPTS}


def describe(name: str, f: dict) -> str:
    lengths = " ".join(f"{v:.2f}" for v in f["lengths"])
    return (f"{name}: copy mass {f['copy']:.4f} (Y only: open-ended {f['open_ended']:.3f}, constrained "
            f"{f['constrained']:.3f}), E[r] {f['reward']:.3f}, mean length {f['mean_length']:.2f}, P(0..4 words, "
            f"outside Y) {lengths}")


def test_exact_optima_copy_the_question_under_relevance_alone(rewards):
    """The exact optima at the betas the end-to-end runs use: the relevance hack, and what R3 does to it."""
    reference = toy.reference_logprobs()
    ref = figures(reference)
    rel = figures(optimum(reference, rewards["relevance"], BETA["relevance"]))
    r3 = figures(optimum(reference, rewards["r3"], BETA["r3"]))
    for name, f in (("reference", ref), (f"relevance optimum (beta {BETA['relevance']})", rel),
                    (f"R3 optimum (beta {BETA['r3']})", r3)):
        MEASURED.append("R3 toy world, exact: " + describe(name, f))
    # Measured: reference copy mass 0.0004, E[r] 1.849, mean length 2.32; relevance optimum copy mass 0.405, E[r]
    # 3.044, length 2.47; R3 optimum 0.145 (open-ended 0.285, constrained 0.005), E[r] 2.913, length 3.04.
    assert ref["copy"] < 1e-3
    assert rel["copy"] > 0.3  # the hack: copies take 40% of the mass, over 1,000 times the reference's
    assert r3["constrained"] < 0.02  # the reference-answer form leaves no copies
    assert r3["open_ended"] > 0.2  # LI keeps them: no toy answer is longer than a four-word copy
    assert r3["copy"] < rel["copy"] / 2
    assert r3["mean_length"] > rel["mean_length"] + 0.3  # LI lengthens the answers
    assert min(rel["reward"], r3["reward"]) > ref["reward"] + 0.8


def measure(path, reward: str, beta: float) -> dict:
    """figures() of the policy saved at path, with its copy outside Y, and KL(pi|Y || pi*|Y) to its reward's exact
    optimum, also as a fraction of the reference's."""
    reference, policy = toy.reference_logprobs(), toy.exact_logprobs(path)
    best = optimum(reference, exact_rewards()[reward], beta)

    def kl_to_optimum(pi: dict) -> float:
        return float(np.mean([world.kl(toy.on_answers(pi[p]), best[p][:-1]) for p in world.PROMPTS]))

    f = figures(policy, whole_question_logprob(path))
    return {**f, "kl": kl_to_optimum(policy),
            "kl_fraction": kl_to_optimum(policy) / kl_to_optimum(reference)}


def reference_figures() -> dict:
    return figures(toy.reference_logprobs(), whole_question_logprob(TOY / "model"))


@pytest.mark.parametrize("reward", ["relevance", "r3"])
def test_ppo_moves_toward_its_reward_s_exact_optimum(tmp_path, rewards, reward):
    """`python ppo_rlhf.py --reward {relevance,r3} --dataset_name toy_world/r3_prompts --query_type_column query_type
    --beta B`, cut to NUM_ROLLOUTS rollouts."""
    args = ppo.Args(reward=reward, dataset_name="toy_world/r3_prompts", query_type_column="query_type",
                    beta=BETA[reward], num_rollouts=NUM_ROLLOUTS, output_dir=str(tmp_path / reward),
                    logging_steps=10_000, eval_steps=0, device="cpu")
    metrics = ppo.train(args)
    before, after = reference_figures(), measure(tmp_path / reward, reward, args.beta)
    target = figures(optimum(toy.reference_logprobs(), rewards[reward], args.beta))
    MEASURED.append(
        f"ppo_rlhf.py --reward {reward}, {NUM_ROLLOUTS} rollouts (beta={args.beta}): KL(pi|Y || pi*|Y) "
        f"{after['kl'] / after['kl_fraction']:.3f} -> {after['kl']:.3f} ({after['kl_fraction']:.1%} of the "
        f"reference's); copy mass {before['copy']:.4f} -> {after['copy']:.4f} (pi* {target['copy']:.3f}); E[r] "
        f"{before['reward']:.3f} -> {after['reward']:.3f} (pi* {target['reward']:.3f}); mass outside Y "
        f"{before['outside']:.3f} -> {after['outside']:.3f}; last rollout's objective/relevance "
        f"{metrics['objective/relevance']:.3f}")
    MEASURED.append(f"  {describe('trained', after)}")
    # Measured: relevance 41.2% of the reference's KL, E[r] 1.849 -> 2.859, mean length 2.32 -> 1.60 (60% of the mass
    # on one word), copy mass 0.0004 -> 0.0004; R3 44.2%, E[r] 2.437, mean length 2.93, copy mass 0.002.
    assert after["kl_fraction"] < 0.5
    if reward == "relevance":  # the short answers of the hack
        assert after["reward"] > before["reward"] + 0.8
        assert after["mean_length"] < before["mean_length"] - 0.4
    else:  # LI lengthens them; the reference-answer form leaves no copies
        assert after["reward"] > before["reward"] + 0.4
        assert after["mean_length"] > before["mean_length"] + 0.4
        assert after["constrained"] < 0.02
