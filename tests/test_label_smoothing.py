"""--label_smoothing eps (cDPO) in dpo.py and fdpo.py, on the first step of a run. There the policy is the reference,
so every pair's logit z is 0: the loss is log 2 for any eps, and its slope in z, -(1 - eps) sigmoid(-z) +
eps sigmoid(z) = -(1 - 2 eps) / 2, is the plain loss's times (1 - 2 eps). So is the whole first gradient, and its norm.
(The loss itself is checked by hand in test_dpo_loss.py and test_fdpo_loss.py; this checks that the flag reaches it.)"""

import importlib
import math

import pytest

from helpers import SHORT_RUN


@pytest.mark.parametrize("name", ["dpo", "fdpo"])
def test_smoothing_scales_the_first_gradient_by_one_minus_two_eps(tmp_path, toy_model_dir, data_dir, name):
    module = importlib.import_module(name)
    common = dict(**{**SHORT_RUN, "max_steps": 1, "save_steps": 0}, model_name_or_path=str(toy_model_dir),
                  dataset_name=str(data_dir))
    plain = module.train(module.Args(**common, output_dir=str(tmp_path / "plain")))
    smoothed = module.train(module.Args(**common, label_smoothing=0.25, output_dir=str(tmp_path / "smoothed")))
    assert plain["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert smoothed["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    # measured: exactly half (each pair's slope goes from -1/2 to -1/4, and halving is exact in floating point); an
    # unwired flag would leave the norm as it is
    assert smoothed["train/grad_norm"] == pytest.approx(0.5 * plain["train/grad_norm"], rel=1e-6)
