"""sacpo.py's two-stage run: each stage is exactly a dpo.py run (stage 2 from stage 1's result, which is also its
reference), both stages are saved and load, a run resumes from either stage's checkpoints, P-SACPO's merged weights,
and PKU-SafeRLHF's two-response rows.

The DPO loop itself and the helpers sacpo.py shares with dpo.py are byte-identical copies (test_copies_identical.py),
tested in test_dpo_machinery.py and test_shared_machinery.py.
"""

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpo
import sacpo
from helpers import SHORT_RUN, assert_same_weights, cached_runner, python, toy_chat_ids

P = "how was the food ?"


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_model_dir, data_dir, safety_dir):
    return cached_runner(sacpo, tmp_path_factory, **SHORT_RUN, model_name_or_path=str(toy_model_dir),
                         reward_dataset=str(data_dir), safety_dataset=str(safety_dir), merge=(0.5,))


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


@pytest.mark.parametrize("order", ["reward_first", "safety_first"])
def test_each_stage_is_a_dpo_run(train_run, tmp_path, toy_model_dir, data_dir, safety_dir, order):
    """Stage 1 is dpo.py on its pairs at its beta (reward: beta; safety: beta / lambda); stage 2 is dpo.py from stage
    1's model, as policy and reference, on the other pairs at the other beta: the same weights to the bit, and the
    same final metrics."""
    run = train_run(order=order)
    betas = {"reward": run.args.beta, "safety": run.args.beta / run.args.lambda_}
    datasets = {"reward": data_dir, "safety": safety_dir}
    first, second = ("reward", "safety") if order == "reward_first" else ("safety", "reward")
    dpo.train(dpo.Args(**SHORT_RUN, model_name_or_path=str(toy_model_dir), dataset_name=str(datasets[first]),
                       beta=betas[first], output_dir=str(tmp_path / first)))
    assert_same_weights(run.out / first, tmp_path / first)
    metrics = dpo.train(dpo.Args(**SHORT_RUN, model_name_or_path=str(run.out / first),
                                 dataset_name=str(datasets[second]), beta=betas[second],
                                 output_dir=str(tmp_path / second)))
    assert_same_weights(run.out, tmp_path / second)
    assert without_timing(run.metrics) == without_timing(metrics) | {"train/stage": 2}


def test_lora_stage_2_adapts_stage_1s_merged_model(train_run):
    """With --lora_r, stage 1 is saved merged (reward/merged), stage 2's adapter is on that model, whose adapter-off
    base is its reference, and P-SACPO merges the two merged models."""
    run = train_run(lora_r=8, learning_rate=3e-3, max_steps=2, save_steps=0)
    adapter = json.loads((run.out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(run.out / "reward" / "merged")
    first, second, merged = (load_file(p / "model.safetensors") for p in (run.out / "reward" / "merged",
                                                                          run.out / "merged", run.out / "merged-q0.5"))
    assert any(not torch.equal(first[k], second[k]) for k in first)  # stage 2 trained
    for name, w in merged.items():
        torch.testing.assert_close(w, (first[name] + second[name]) / 2, rtol=0, atol=1e-6)


def test_both_stages_are_saved_and_load(train_run):
    run = train_run()
    stage_1 = replace(run.args, output_dir=str(run.out / "reward"), merge=(0.5,))
    stage_2 = replace(run.args, output_dir=str(run.out), model_name_or_path=str(run.out / "reward"))
    for path, args in ((run.out / "reward", stage_1), (run.out / "reward" / "checkpoint-3", stage_1),
                       (run.out, stage_2), (run.out / "checkpoint-3", stage_2)):
        assert json.loads((path / "args.json").read_text()) == json.loads(json.dumps(asdict(args)))  # merge: a list
        AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    marks = [json.loads((path / "sacpo_stage.json").read_text()) for path in (run.out / "reward", run.out)]
    assert marks == [{"stage": 1, "preference": "reward", "dataset": run.args.reward_dataset, "beta": 1.0,
                      "output_dir": str(run.out / "reward"), "started_from": run.args.model_name_or_path},
                     {"stage": 2, "preference": "safety", "dataset": run.args.safety_dataset,
                      "beta": pytest.approx(1 / 0.72), "output_dir": str(run.out),
                      "started_from": str(run.out / "reward")}]


def test_merged_weights_and_merging_again_without_training(train_run, monkeypatch, tmp_path):
    """merged-q0.5 holds the mean of the stages' weights; --resume_from latest on the finished run trains nothing and
    adds merged-q0.25, three quarters stage 1 and a quarter stage 2."""
    run = train_run()
    out = Path(shutil.copytree(run.out, tmp_path / "run"))
    first, second = (load_file(p / "model.safetensors") for p in (out / "reward", out))
    calls = []
    monkeypatch.setattr(sacpo, "dpo_loss", lambda *a, **k: calls.append(1))
    sacpo.train(replace(run.args, output_dir=str(out), resume_from="latest", merge=(0.25,)))
    assert calls == []
    for q in (0.5, 0.25):
        merged = load_file(out / f"merged-q{q}" / "model.safetensors")
        assert merged.keys() == first.keys()
        for name, w in merged.items():
            torch.testing.assert_close(w, (1 - q) * first[name] + q * second[name], rtol=0, atol=1e-6)
        AutoModelForCausalLM.from_pretrained(out / f"merged-q{q}")


@pytest.mark.parametrize("checkpoint, trained_steps", [("reward/checkpoint-3", 3 + 6), ("checkpoint-3", 3)])
def test_resume_from_either_stage_replays_the_run(train_run, monkeypatch, tmp_path, checkpoint, trained_steps):
    """A copy of the run's directory as if killed just after the checkpoint (the later stages' finals removed),
    resumed from it: only the steps after it train, and the final weights are the uninterrupted run's."""
    full = train_run()
    out = Path(shutil.copytree(full.out, tmp_path / "run"))
    killed = ["model.safetensors", "sacpo_stage.json"]
    for name in killed + [f"reward/{name}" for name in killed] if checkpoint.startswith("reward") else killed:
        os.remove(out / name)
    calls, real = [], sacpo.dpo_loss
    monkeypatch.setattr(sacpo, "dpo_loss", lambda *a, **k: calls.append(a[0].requires_grad) or real(*a, **k))
    sacpo.train(replace(full.args, output_dir=str(out), resume_from=str(out / checkpoint)))
    assert sum(calls) == trained_steps
    assert_same_weights(full.out, out)
    assert_same_weights(full.out / "reward", out / "reward")


def test_latest_finds_the_stage_to_continue(tmp_path, capsys):
    args = sacpo.Args(lambda_=2.0, output_dir=str(tmp_path))
    stages = sacpo.sacpo_stages(args.beta, args.lambda_, args.order, args.reward_dataset, args.safety_dataset,
                                str(tmp_path))

    def checkpoint(path, **changes):  # a checkpoint directory as save_checkpoint leaves it: its args.json
        path.mkdir(parents=True)
        (path / "args.json").write_text(json.dumps(asdict(replace(args, **changes))))
        return str(path)

    def finish(k):
        (Path(stages[k].output_dir) / "sacpo_stage.json").write_text(json.dumps(stages[k]._asdict()))

    assert sacpo.resume_point(None, stages) == (0, None)
    assert sacpo.resume_point("latest", stages) == (0, None)  # nothing yet: a new run
    first = checkpoint(tmp_path / "reward" / "checkpoint-3")
    second = checkpoint(tmp_path / "checkpoint-6")  # stage 2's, but stage 1 has not finished: an earlier run's
    assert sacpo.resume_point("latest", stages) == (0, first)
    finish(0)
    # it was resumed against the new stage 1, without a word: an earlier run's stage 2 is now refused
    with pytest.raises(sacpo.UsageError, match="checkpoint-6 was written before stage 1 finished: an earlier run's"):
        sacpo.resume_point("latest", stages)
    finished_at = os.path.getmtime(Path(stages[0].output_dir) / "sacpo_stage.json")
    os.utime(second, (finished_at + 1, finished_at + 1))  # written after stage 1 finished, as this run's stage 2 is
    assert sacpo.resume_point("latest", stages) == (1, second)
    assert sacpo.resume_point(second, stages) == (1, second)
    finish(1)
    assert sacpo.resume_point("latest", stages) == (2, None)  # finished: only --merge runs
    assert "stage 2 (safety) has finished" in capsys.readouterr().out
    with pytest.raises(sacpo.UsageError, match="is not a checkpoint of either stage"):
        sacpo.resume_point(str(tmp_path / "elsewhere" / "checkpoint-6"), stages)


def test_what_was_trained_otherwise_is_not_reused(tmp_path):
    """A finished stage or a checkpoint of another plan (here lambda 1, so the safety stage at beta 1, not 0.5) stops
    the run, naming what it holds, instead of being continued."""
    args = sacpo.Args(lambda_=2.0, output_dir=str(tmp_path))
    stages = sacpo.sacpo_stages(args.beta, 2.0, args.order, args.reward_dataset, args.safety_dataset, str(tmp_path))
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "sacpo_stage.json").write_text(json.dumps(stages[0]._asdict()))
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "checkpoint-6" / "args.json").write_text(json.dumps(asdict(replace(args, lambda_=1.0))))
    message = r"checkpoint-6 holds stage 2 on safety preferences \(toy_world/safety_pairs\) at beta 1, not this run's"
    for resume_from in ("latest", str(tmp_path / "checkpoint-6")):
        with pytest.raises(sacpo.UsageError, match=message):
            sacpo.resume_point(resume_from, stages)
    other = sacpo.sacpo_stages(args.beta, 2.0, "safety_first", args.reward_dataset, args.safety_dataset, str(tmp_path))
    (tmp_path / "safety").mkdir()
    (tmp_path / "safety" / "sacpo_stage.json").write_text(json.dumps(other[0]._asdict()))
    changed = sacpo.sacpo_stages(args.beta, 4.0, "safety_first", args.reward_dataset, args.safety_dataset,
                                 str(tmp_path))
    with pytest.raises(sacpo.UsageError, match="holds stage 1 on safety preferences .* at beta 0.5, not this run's "
                                               "safety .* at beta 0.25: use another output_dir"):
        sacpo.resume_point("latest", changed)


def test_a_finished_stage_is_read_as_it_was_saved(tmp_path):
    """A stage saved as a LoRA adapter is read from its merged/ copy, whatever this run's --lora_r: a merge-only rerun
    (--resume_from latest --merge q) without --lora_r read the adapter directory as a plain model and failed."""
    stage = sacpo.Stage("reward", "toy_world/pairs", 1.0, str(tmp_path))
    assert sacpo.saved_model(stage) == str(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    assert sacpo.saved_model(stage) == str(tmp_path / "merged")


PKU_ROW = {"prompt": P, "response_0": "great food", "response_1": "good food", "better_response_id": 0,
           "safer_response_id": 1, "is_response_0_safe": True, "is_response_1_safe": True}


@pytest.mark.parametrize("preference, chosen, rejected", [("reward", "great food", "good food"),
                                                          ("safety", "good food", "great food")])
def test_pku_saferlhf_rows(tmp_path, toy_tokenizer, preference, chosen, rejected):
    """The reward stage prefers response_{better_response_id}, the safety stage response_{safer_response_id}; with a
    chat template a row is one chat turn, without one the authors' text template."""
    path = tmp_path / "pku.jsonl"
    path.write_text(json.dumps(PKU_ROW) + "\n")
    stage = sacpo.Stage(preference, str(path), 1.0, str(tmp_path))
    (row,), _ = sacpo.load_stage_pairs(sacpo.Args(eval_holdout=0), stage, toy_tokenizer)
    prompt_ids, chosen_ids = toy_chat_ids(P, chosen)
    assert row["chosen"] == prompt_ids + chosen_ids and row["rejected"] == prompt_ids + toy_chat_ids(P, rejected)[1]
    text = sacpo.from_two_responses(Dataset.from_list([PKU_ROW]), preference, "pku", chat=False)[0]
    assert text == {"prompt": f"BEGINNING OF CONVERSATION: USER: {P} ASSISTANT:", "chosen": " " + chosen,
                    "rejected": " " + rejected}


@pytest.mark.parametrize("row, match", [
    (PKU_ROW | {"safer_response_id": 2}, r"column 'safer_response_id' should hold 0 or 1, found 2$"),
    (PKU_ROW | {"safer_response_id": None}, r"column 'safer_response_id' should hold 0 or 1, found None$"),
    (PKU_ROW | {"safer_response_id": "1"}, r"column 'safer_response_id' should hold 0 or 1, found '1'$"),  # a string
    ({k: v for k, v in PKU_ROW.items() if k != "response_1"}, r"has response_0 but no column 'response_1'"),
])
def test_bad_pku_rows_are_named(row, match):
    with pytest.raises(sacpo.UsageError, match=match):
        sacpo.from_two_responses(Dataset.from_list([row]), "safety", "pku", chat=True)


@pytest.mark.slow  # starts a process: `python sacpo.py --help`
def test_help_lists_the_method_flags_and_import_is_silent():
    result = python("sacpo.py", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: sacpo.py")
    assert all(flag in result.stdout for flag in ("--beta", "--lambda_", "--order", "--merge", "--reward_dataset",
                                                  "--safety_dataset"))
