"""online_dpo.py's rounds: the pairs it samples, scores and labels (against plain forwards of the reward model), their
independence of batching, the labels' rules, the reference it trains against, saving, resuming, determinism, bad
inputs and the command line.

The helpers online_dpo.py shares with dpo.py (the DPO loss, log-probs, batching, saving) and with ppo_rlhf.py (the
sampler, reward scores, prompts) are byte-identical copies (test_copies_identical.py), tested with those scripts.
Everything runs on CPU with the toy model and a reward model with a random, seeded head made from it, so no test
depends on a trained reward model.
"""


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import online_dpo
from helpers import assert_same_weights, cached_runner, python

# 8 prompts a round (online: one step of 2 micro-batches of 4 pairs), generated in chunks of 3 prompts
BASE_ARGS = dict(num_rounds=4, save_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                 forward_batch_size=6, eval_steps=2, num_eval_prompts=5, logging_steps=1000, learning_rate=1e-3,
                 device="cpu")


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_dirs):
    return cached_runner(online_dpo, tmp_path_factory, **BASE_ARGS, model_name_or_path=str(toy_dirs.model),
                         dataset_name=str(toy_dirs.prompts), reward_model_path=str(toy_dirs.rm))


def make_pairs(toy_dirs, label="argmax", seed=5, n_prompts=7, **flags):
    """online_pairs on n_prompts train prompts (the 8 toy prompts in turn) with the toy policy and the random-head
    reward model, on one process."""
    args = online_dpo.Args(model_name_or_path=str(toy_dirs.model), dataset_name=str(toy_dirs.prompts),
                           reward_model_path=str(toy_dirs.rm), label=label, device="cpu", **flags)
    runtime = online_dpo.setup(args)
    policy = online_dpo.load_model(str(toy_dirs.model), args, runtime, trained=True).eval()
    rm = online_dpo.load_model(str(toy_dirs.rm), args, runtime, trained=False,
                               model_class=AutoModelForSequenceClassification)
    prompts = online_dpo.load_prompts(args, toy_dirs.tokenizer)[0]
    prompts = [prompts[i % len(prompts)] for i in range(n_prompts)]
    eos_ids = online_dpo.eos_token_ids(policy, toy_dirs.tokenizer)
    return prompts, online_dpo.online_pairs(policy, rm, prompts, args, eos_ids, toy_dirs.tokenizer.pad_token_id,
                                            seed, runtime)


@torch.no_grad()
def plain_score(rm, ids: list[int]) -> float:
    """The reward model's own forward on one unpadded sequence: its score at the last token."""
    return float(rm(input_ids=torch.tensor([ids])).logits[0, 0])


def test_pairs_are_the_prompts_answers_scored_by_the_reward_model(toy_dirs):
    """Each pair is its prompt followed by two sampled answers, each ending in EOS here; row["scores"] are the reward
    model's own scores of them; with argmax labels the chosen one scores at least as high."""
    prompts, (rows, stats) = make_pairs(toy_dirs, forward_batch_size=6)
    rm = AutoModelForSequenceClassification.from_pretrained(toy_dirs.rm).eval()
    eos = toy_dirs.tokenizer.eos_token_id
    for prompt, row in zip(prompts, rows):
        for part, score in zip(("chosen", "rejected"), row["scores"]):
            ids, start = row[part], row[f"{part}_start"]
            assert ids[:start] == prompt and ids[-1] == eos and eos not in ids[start:-1]
            assert plain_score(rm, ids) == pytest.approx(score, abs=1e-5)
        assert row["scores"][0] >= row["scores"][1]
    answers = [len(r[p]) - r[f"{p}_start"] for r in rows for p in ("chosen", "rejected")]
    assert stats["rollout/length"] == pytest.approx(sum(answers) / len(answers))
    assert stats["objective/score_margin"] == pytest.approx(sum(r["scores"][0] - r["scores"][1] for r in rows) / 7)


def test_pairs_do_not_depend_on_the_batching(toy_dirs):
    """Each prompt's answers and label come from its own draws: chunks of 1 prompt or of 32 give the same pairs."""
    _, (one, _) = make_pairs(toy_dirs, forward_batch_size=2)
    _, (many, _) = make_pairs(toy_dirs, forward_batch_size=64)
    assert [(r["chosen"], r["rejected"]) for r in one] == [(r["chosen"], r["rejected"]) for r in many]
    for a, b in zip(one, many):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_label_rules():
    """argmax: the first when it scores at least as high (a tie picks it, as TRL's >=); Bradley-Terry: sigmoid of the
    difference, sigmoid(1.5) = 0.8175744761936437, sigmoid(0) = 1/2, sigmoid(-2) = 0.11920292202211755."""
    first, second = torch.tensor([1.0, 0.3, -1.0]), torch.tensor([-0.5, 0.3, 1.0])
    assert online_dpo.label_probability(first, second, "argmax").tolist() == [1.0, 1.0, 0.0]
    assert online_dpo.label_probability(first, second, "bradley_terry").tolist() == pytest.approx(
        [0.8175744761936437, 0.5, 0.11920292202211755], abs=1e-7)


def test_saved_model_loads_and_resuming_replays_the_run(train_run):
    full = train_run()
    resumed = train_run(fresh=True, resume_from=str(full.out / "checkpoint-2"))
    assert_same_weights(full.out, resumed.out)
    assert {k: v for k, v in resumed.metrics.items() if not k.startswith("perf/")} == {
        k: v for k, v in full.metrics.items() if not k.startswith("perf/")}
    for path in (full.out, full.out / "checkpoint-2"):
        AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    assert full.metrics["train/round"] == 4 and "eval/score" in full.metrics


def test_same_seed_same_weights(train_run):
    assert_same_weights(train_run().out, train_run(fresh=True).out)


def test_iterative_rounds_of_several_steps(train_run, monkeypatch):
    """--iterative with 12 prompts a round over micro-batches of 4 (3 an epoch), 2 epochs, 2 micro-batches a step:
    3 optimizer steps a round, and the schedule ends at 0 after the 6 of 2 rounds."""
    calls, steps = [], []
    real_loss, real_clip = online_dpo.dpo_loss, online_dpo.clip_gradients
    monkeypatch.setattr(online_dpo, "dpo_loss", lambda *a, **k: calls.append(len(a[0])) or real_loss(*a, **k))
    monkeypatch.setattr(online_dpo, "clip_gradients", lambda *a, **k: steps.append(1) or real_clip(*a, **k))
    run = train_run(fresh=True, num_rounds=2, iterative=True, prompts_per_round=12, epochs_per_round=2,
                    eval_steps=0, save_steps=0)
    assert calls == [4] * 12 and len(steps) == 6  # 2 rounds x 2 epochs x 3 micro-batches; 2 rounds x 3 steps
    assert run.metrics["train/lr"] == 0.0 and run.metrics["train/round"] == 2


@pytest.mark.parametrize("update_reference", [False, True])
def test_the_reference(train_run, monkeypatch, update_reference):
    """Iterative rounds of 8 pairs, 2 epochs of 2 micro-batches, one a step: 4 steps a round. Against the fixed pi_ref
    the log-ratio moves off 0 after the first step and stays off; with --update_reference each round's reference is
    the policy as the round starts, so each round's first step has log pi - log pi_ref = 0 (up to the rounding of the
    reference's pass, which batches the pairs otherwise: measured 6e-9), and its later steps do not."""
    ratios, real = [], online_dpo.dpo_loss
    monkeypatch.setattr(online_dpo, "dpo_loss", lambda *a, **k: (
        ratios.append(float((a[0] - a[2]).detach().abs().max())) if a[0].requires_grad else None) or real(*a, **k))
    train_run(fresh=True, num_rounds=3, iterative=True, prompts_per_round=8, epochs_per_round=2,
              gradient_accumulation_steps=1, update_reference=update_reference, eval_steps=0, save_steps=0)
    assert len(ratios) == 12 and ratios[0] == 0.0  # pi_ref is the starting policy, in the same batch
    firsts, others = ratios[4::4], [x for i, x in enumerate(ratios) if i % 4]
    assert min(others) > 1e-4
    assert (max(firsts) < 1e-6) if update_reference else (min(firsts) > 1e-4)


@pytest.mark.parametrize("flags, match", [
    (dict(update_reference=True), "--update_reference needs --iterative"),
    (dict(update_reference=True, iterative=True, ref_model_name_or_path="x"), "--ref_model_name_or_path is unused"),
    (dict(iterative=True, prompts_per_round=0), r"--iterative needs prompts_per_round \(0\)"),
])
def test_bad_flags_are_named(flags, match):
    with pytest.raises(online_dpo.UsageError, match=match):
        online_dpo.Args(**flags)


def test_bradley_terry_labels_follow_the_scores(toy_dirs):
    """Over 512 prompts, the chosen answer is the higher-scored one in a fraction matching E[sigmoid(|r1 - r2|)] over
    the pairs whose answers differ in score, within 4 binomial standard errors."""
    _, (rows, _) = make_pairs(toy_dirs, label="bradley_terry", n_prompts=512)
    differ = [r["scores"] for r in rows if abs(r["scores"][0] - r["scores"][1]) > 1e-6]
    higher = sum(chosen > rejected for chosen, rejected in differ) / len(differ)
    expected = float(torch.sigmoid(torch.tensor([abs(c - r) for c, r in differ])).mean())
    assert abs(higher - expected) < 4 * (expected * (1 - expected) / len(differ)) ** 0.5, (higher, expected)
    assert higher < 0.99  # not argmax


def test_the_missing_eos_penalty(toy_dirs):
    """With room for 2 tokens, answers of 2 words have no EOS: their scores are the reward model's minus 5."""
    rm = AutoModelForSequenceClassification.from_pretrained(toy_dirs.rm).eval()
    eos = toy_dirs.tokenizer.eos_token_id
    _, (rows, stats) = make_pairs(toy_dirs, max_new_tokens=2, missing_eos_penalty=5.0)
    seen = 0
    for row in rows:
        for part, score in zip(("chosen", "rejected"), row["scores"]):
            penalty = 0.0 if row[part][-1] == eos else 5.0
            seen += penalty > 0
            assert plain_score(rm, row[part]) - penalty == pytest.approx(score, abs=1e-5)
    assert seen > 0 and stats["rollout/no_eos"] == seen / (2 * len(rows))


def test_missing_or_bad_reward_model(toy_dirs, tmp_path, monkeypatch):
    args = dict(model_name_or_path=str(toy_dirs.model), dataset_name=str(toy_dirs.prompts),
                output_dir=str(tmp_path / "out"), device="cpu")
    monkeypatch.chdir(tmp_path)  # no runs/reward_model here, nor (resolve_path as the identity) next to the script
    monkeypatch.setattr(online_dpo, "resolve_path", lambda name: name)
    with pytest.raises(online_dpo.UsageError, match="no reward model at 'runs/reward_model': train one first"):
        online_dpo.train(online_dpo.Args(**args))
    AutoModelForSequenceClassification.from_pretrained(toy_dirs.model, num_labels=2).save_pretrained(tmp_path / "rm2")
    with pytest.raises(online_dpo.UsageError, match="has 2 labels, not 1"):
        online_dpo.train(online_dpo.Args(**args, reward_model_path=str(tmp_path / "rm2")))


@pytest.mark.slow  # starts a process: `python online_dpo.py --help`
def test_help_lists_the_method_flags_and_import_is_silent():
    result = python("online_dpo.py", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: online_dpo.py")
    assert all(flag in result.stdout for flag in ("--beta", "--label", "--reward_model_path", "--prompts_per_round",
                                                  "--epochs_per_round", "--update_reference"))
