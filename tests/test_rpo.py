"""--rpo_alpha in dpo.py, ipo.py and fdpo.py: RPO's term (Pang et al. 2024), the chosen answer's negative
log-likelihood per token, added to each pair's loss. By hand, and on the first step of a run, where the policy is the
reference (so DPO's and f-DPO's part is log 2 exactly and IPO's is (1/(2 beta))^2) and the NLL is recomputed by plain
forwards of the starting model. IPO's --average_log_probs averages the loss's log-probs, not RPO's NLL."""

import importlib
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import SHORT_RUN, direct_logp

SCRIPTS = ("dpo", "ipo", "fdpo")


@pytest.mark.parametrize("name", SCRIPTS)
def test_rpo_nll_by_hand(name):
    """-(-6) / 3 = 2 and -(-3) / 2 = 1.5."""
    module = importlib.import_module(name)
    assert module.rpo_nll(torch.tensor([-6.0, -3.0]), torch.tensor([3, 2])).tolist() == [2.0, 1.5]


@pytest.mark.parametrize("name, options, first_loss", [
    ("dpo", {}, math.log(2)),
    ("ipo", {}, (1 / (2 * 0.1)) ** 2),  # h = 0 at step 0: (0 - 1/(2 beta))^2 at the default beta 0.1
    ("ipo", {"average_log_probs": True}, (1 / (2 * 0.1)) ** 2),
    ("fdpo", {}, math.log(2)),  # u = 1 for both answers: f'(u_w) = f'(u_l)
])
def test_the_first_step_adds_alpha_times_the_chosen_nll(tmp_path, toy_model_dir, data_dir, name, options,
                                                        first_loss):
    module = importlib.import_module(name)
    common = dict(**{**SHORT_RUN, "max_steps": 1, "save_steps": 0}, model_name_or_path=str(toy_model_dir),
                  dataset_name=str(data_dir), **options)
    args = module.Args(**common, rpo_alpha=0.5, output_dir=str(tmp_path / "rpo"))
    assert args.beta == 0.1
    metrics = module.train(args)
    assert metrics["train/loss"] == pytest.approx(first_loss + 0.5 * metrics["train/nll"], abs=1e-5)
    # the step's pairs, as the run batched them, scored by the starting model
    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    rows = module.load_pairs(args, tokenizer)[0]
    runtime = module.Runtime(0, 1, torch.device("cpu"), False)
    (micro,) = list(module.TrainBatches(rows, args, runtime).of_step(0))
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    with torch.no_grad():
        nll = [-direct_logp(model, r["chosen"][: r["chosen_start"]], r["chosen"][r["chosen_start"]:])
               / (len(r["chosen"]) - r["chosen_start"]) for r in micro.rows[: micro.n]]
    assert metrics["train/nll"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert "eval/nll" in metrics
    # without the flag: no term, no metric, and another gradient (the term is not detached)
    plain = module.train(module.Args(**common, output_dir=str(tmp_path / "plain")))
    assert "train/nll" not in plain and "eval/nll" not in plain
    assert plain["train/loss"] == pytest.approx(first_loss, abs=1e-6)
    # detached, the term would leave the gradient exactly as it is; measured, it moves its norm by 1.8% (IPO) to 6x
    assert abs(metrics["train/grad_norm"] - plain["train/grad_norm"]) > 1e-3 * plain["train/grad_norm"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_negative_alpha_is_refused(name):
    module = importlib.import_module(name)
    with pytest.raises(module.UsageError, match="--rpo_alpha"):
        module.Args(rpo_alpha=-0.1)
