"""grpo.py's pure functions against values worked out by hand: group advantages under each scaling (a group whose
rewards are all equal included), the clipped surrogate with its asymmetric clip and the k3 term, and the token weights
of each --loss_type on responses of different lengths. The toy world's reward function (toy_world/world.py), which
the end-to-end test trains against, is checked here too."""

import math

import pytest
import torch

from grpo import group_advantages, grpo_token_losses, k3_kl, loss_weights, uniform_groups
from helpers import TOY_EOS, toy_ids

REWARDS = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two groups of 4; the second all equal


def test_group_advantages_divide_by_the_groups_unbiased_std():
    # group 1: mean 3, deviations -2, -1, 0, 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14 / 3
    std = math.sqrt(14 / 3) + 1e-4
    expected = [-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0]
    assert group_advantages(REWARDS, 4, "group").tolist() == pytest.approx(expected, abs=1e-6)


def test_batch_scaling_keeps_the_group_mean_and_divides_by_the_batch_std():
    # all 8 rewards: mean 4, deviations -3 -2 -1 2 1 1 1 1, unbiased variance 22 / 7
    std = math.sqrt(22 / 7) + 1e-4
    expected = [-2 / std, -1 / std, 0.0, 3 / std, 0.0, 0.0, 0.0, 0.0]
    assert group_advantages(REWARDS, 4, "batch").tolist() == pytest.approx(expected, abs=1e-6)


def test_no_scaling_only_centres_each_group():
    assert group_advantages(REWARDS, 4, "none").tolist() == [-2.0, -1.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    assert group_advantages(REWARDS, 2, "none").tolist() == [-0.5, 0.5, -1.5, 1.5, 0.0, 0.0, 0.0, 0.0]


def test_uniform_groups():
    assert uniform_groups(REWARDS, 4).tolist() == [False, True]
    assert uniform_groups(REWARDS, 2).tolist() == [False, False, True, True]


def test_the_clipped_surrogate_clips_low_and_high_separately():
    """Ratios 1.5, 0.5, 0.5, 1.5 with advantages +1, -1, +1, -1; eps_low 0.2, eps_high 0.28:
    -min(1.5, 1.28) = -1.28 (clipped high); -min(-0.5, -0.8) = 0.8 (clipped low); -min(0.5, 0.8) = -0.5 and
    -min(-1.5, -1.28) = 1.5 (the clip takes no gradient away: the unclipped term is the smaller)."""
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5]]).T  # (4, 1)
    logps = ratios.log().requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    losses, low, high = grpo_token_losses(logps, torch.zeros(4, 1), advantages, 0.2, 0.28)
    assert losses[:, 0].tolist() == pytest.approx([-1.28, 0.8, -0.5, 1.5], abs=1e-6)
    assert low[:, 0].tolist() == [False, True, False, False]
    assert high[:, 0].tolist() == [True, False, False, False]
    losses.sum().backward()  # d/dlogp of -rho A is -rho A where unclipped, 0 where clipped
    assert logps.grad[:, 0].tolist() == pytest.approx([0.0, 0.0, -0.5, 1.5], abs=1e-6)


def test_k3_and_its_gradient():
    """pi = 0.5, pi_ref = 0.25: k3 = 0.5 - log 0.5 - 1 = 0.193147...; d k3 / d log pi = 1 - pi_ref/pi = 0.5.
    Equal log-probs give exactly 0."""
    logps = torch.tensor([[math.log(0.5), math.log(0.3)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]])
    kl = k3_kl(logps, ref)
    assert kl.tolist()[0] == pytest.approx([0.5 - math.log(0.5) - 1, 0.0], abs=1e-7)
    kl.sum().backward()
    assert logps.grad.tolist()[0] == pytest.approx([0.5, 0.0], abs=1e-7)


def test_the_kl_term_is_added_at_every_token():
    """At rho = 1 with A = 0 the loss is beta k3 alone: 0.04 * 0.193147... at the first token, 0 at the second."""
    logps = torch.tensor([[math.log(0.5), math.log(0.3)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.3)]])
    losses, _, _ = grpo_token_losses(logps, logps, torch.zeros(1), 0.2, 0.2, beta=0.04, ref_logps=ref)
    assert losses.tolist()[0] == pytest.approx([0.04 * (0.5 - math.log(0.5) - 1), 0.0], abs=1e-7)


MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)  # lengths 2, 3, 0 (masked), 1


def test_grpo_weights_make_each_response_a_token_mean():
    # N = 3 responses with tokens: 1 / (3 * 2), 1 / (3 * 3), 1 / (3 * 1); the masked one weighs nothing
    expected = [[1 / 6, 1 / 6, 0], [1 / 9, 1 / 9, 1 / 9], [0, 0, 0], [1 / 3, 0, 0]]
    assert loss_weights(MASK, "grpo", 5).flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-7)


def test_dr_grpo_weights_are_one_over_n_times_the_budget():
    expected = [[1 / 15, 1 / 15, 0], [1 / 15, 1 / 15, 1 / 15], [0, 0, 0], [1 / 15, 0, 0]]  # 1 / (3 * 5)
    assert loss_weights(MASK, "dr_grpo", 5).flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-7)


def test_dapo_weights_make_every_token_count_the_same():
    expected = [[1 / 6, 1 / 6, 0], [1 / 6, 1 / 6, 1 / 6], [0, 0, 0], [1 / 6, 0, 0]]  # 6 tokens in all
    assert loss_weights(MASK, "dapo", 5).flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-7)


def test_a_batch_with_no_tokens_weighs_nothing():
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        assert loss_weights(torch.zeros(2, 3, dtype=torch.bool), loss_type, 5).abs().sum() == 0


def test_the_toy_reward_function_reads_the_answer_from_the_ids():
    """r(x, y) = topic + sentiment + 2 (toy_world/world.py): "good food" after "how was the food ?" is 1 + 1/2 + 2;
    "not bad party" after "was the film good ?" is -1 + 1/4 + 2 (another topic; "not bad" = +1/2, halved); a special
    token inside the answer, no <|end|>, or five words is BOTTOM, 0."""
    from toy import world

    prompts = [[{"role": "user", "content": "how was the food ?"}], "was the film good ?"] + ["how was the trip ?"] * 3
    answers = ["good food", "not bad party", "good <|user|> trip", "great trip", "the trip was very good"]
    ids = [toy_ids(a) + ([] if a == "great trip" else [TOY_EOS]) for a in answers]
    assert world.grpo_reward(prompts, ["ignored"] * 5, ids) == [3.5, 1.25, 0.0, 0.0, 0.0]


def test_a_masked_response_that_counts_stays_in_n():
    """--mask_truncated_completions, as TRL: the third response (all masked) still counts, N = 4: grpo 1 / (4 * 2),
    1 / (4 * 3), 1 / (4 * 1); dr_grpo 1 / (4 * 5); dapo unchanged, 1 / 6."""
    counted = torch.ones(4, dtype=torch.bool)
    grpo_expected = [1 / 8, 1 / 8, 0, 1 / 12, 1 / 12, 1 / 12, 0, 0, 0, 1 / 4, 0, 0]
    assert loss_weights(MASK, "grpo", 5, counted).flatten().tolist() == pytest.approx(grpo_expected, abs=1e-7)
    assert loss_weights(MASK, "dr_grpo", 5, counted).flatten().tolist() == pytest.approx(
        [x / 20 for x in MASK.flatten().tolist()], abs=1e-7)
    assert loss_weights(MASK, "dapo", 5, counted).flatten().tolist() == pytest.approx(
        [x / 6 for x in MASK.flatten().tolist()], abs=1e-7)
