"""sacpo.py's pure parts against values computed by hand: the two stages' plan (which preferences, which beta, which
directory), the DPO loss at the safety stage's beta / lambda, and P-SACPO's weight interpolation."""

import pytest
import torch

import sacpo


def test_the_stages_in_each_order():
    reward_first = sacpo.sacpo_stages(0.1, 4.0, "reward_first", "R", "S", "out")
    assert reward_first == [("reward", "R", 0.1, "out/reward"), ("safety", "S", pytest.approx(0.025), "out")]
    safety_first = sacpo.sacpo_stages(0.1, 4.0, "safety_first", "R", "S", "out")
    assert safety_first == [("safety", "S", pytest.approx(0.025), "out/safety"), ("reward", "R", 0.1, "out")]


def test_the_safety_stage_loss_at_beta_over_lambda():
    """h = [-1 - (-1.5)] - [-2 - (-1)] = 1.5 at beta 1, lambda 0.5: the stage's beta is 2, so the loss is
    -log sigmoid(3) = log(1 + e^-3) = 0.0485873515737, the rewards 2 x 0.5 = 1 and 2 x -1 = -2."""
    beta = sacpo.sacpo_stages(1.0, 0.5, "reward_first", "R", "S", "out")[1].beta
    losses, chosen, rejected = sacpo.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                              torch.tensor([-1.0]), beta)
    assert losses.item() == pytest.approx(0.0485873515737, abs=1e-7)
    assert (chosen.item(), rejected.item()) == (1.0, -2.0)


def test_interpolation_by_hand():
    first = {"w": torch.tensor([1.0, 3.0]), "step": torch.tensor([7])}
    second = {"w": torch.tensor([3.0, 7.0]), "step": torch.tensor([9])}
    merged = sacpo.interpolate(first, second, 0.25)
    assert merged["w"].tolist() == [1.5, 4.0]  # 0.75 x 1 + 0.25 x 3, 0.75 x 3 + 0.25 x 7
    assert merged["step"].tolist() == [7]  # an integer buffer is the first model's
    assert sacpo.interpolate(first, second, 1.5)["w"].tolist() == [4.0, 9.0]  # extrapolation: -0.5 x 1 + 1.5 x 3


@pytest.mark.parametrize("flags, match", [
    (dict(lambda_=0.0), r"beta \(1.0\) and lambda_ \(0.0\) must be positive"),
    (dict(beta=-0.1), r"beta \(-0.1\) and lambda_ \(0.72\) must be positive"),
])
def test_bad_values_are_named(flags, match):
    with pytest.raises(sacpo.UsageError, match=match):
        sacpo.Args(**flags)


def test_lora_saves_each_stage_merged():
    """--lora_r turns --merge_lora on: stage 2 needs stage 1's merged model (test_sacpo_machinery.py runs it)."""
    assert sacpo.Args(lora_r=8).merge_lora and not sacpo.Args().merge_lora
