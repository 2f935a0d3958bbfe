"""dpo.py --rpo_alpha: RPO's term (Pang et al. 2024), the chosen answer's negative log-likelihood per token, added to
each pair's DPO loss. By hand, and on the first step of a run, where the policy is the reference (so DPO's part is
log 2 exactly) and the NLL is recomputed by plain forwards of the starting model."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpo
from helpers import SHORT_RUN, direct_logp


def test_rpo_nll_by_hand():
    """-(-6) / 3 = 2 and -(-3) / 2 = 1.5."""
    assert dpo.rpo_nll(torch.tensor([-6.0, -3.0]), torch.tensor([3, 2])).tolist() == [2.0, 1.5]


def test_the_first_step_adds_alpha_times_the_chosen_nll(tmp_path, toy_model_dir, data_dir):
    args = dpo.Args(**{**SHORT_RUN, "max_steps": 1, "save_steps": 0}, model_name_or_path=str(toy_model_dir),
                    dataset_name=str(data_dir), rpo_alpha=0.5, output_dir=str(tmp_path / "rpo"))
    metrics = dpo.train(args)
    assert metrics["train/loss"] == pytest.approx(math.log(2) + 0.5 * metrics["train/nll"], abs=1e-6)
    # the step's pairs, as the run batched them, scored by the starting model
    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    rows = dpo.load_pairs(args, tokenizer)[0]
    runtime = dpo.Runtime(0, 1, torch.device("cpu"), False)
    (micro,) = list(dpo.TrainBatches(rows, args, runtime).of_step(0))
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    with torch.no_grad():
        nll = [-direct_logp(model, r["chosen"][: r["chosen_start"]], r["chosen"][r["chosen_start"]:])
               / (len(r["chosen"]) - r["chosen_start"]) for r in micro.rows[: micro.n]]
    assert metrics["train/nll"] == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    assert "train/nll" not in dpo.train(dpo.Args(**{**SHORT_RUN, "max_steps": 1, "save_steps": 0},
                                                 model_name_or_path=str(toy_model_dir), dataset_name=str(data_dir),
                                                 output_dir=str(tmp_path / "dpo")))
