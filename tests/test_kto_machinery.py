"""kto.py's training loop and data: saving, loading, resuming, determinism, non-finite steps, the command line, the
unpaired and pairwise formats, each row's mismatched completion, and the errors and skips it reports.

The helpers kto.py shares with dpo.py and spin.py (tokenization, chat rendering, batching, log-probs, saving) are
byte-identical copies (test_copies_identical.py), tested in test_dpo_machinery.py and test_shared_machinery.py.
"""

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import kto
from helpers import SHORT_RUN, assert_same_weights, cached_runner, direct_logp, python, toy_chat_ids

P = "how was the food ?"


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_model_dir, unpaired_dir):
    return cached_runner(kto, tmp_path_factory, **SHORT_RUN, model_name_or_path=str(toy_model_dir),
                         dataset_name=str(unpaired_dir))


def write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rows_of(tmp_path, rows, **overrides):
    """kto.load_unpaired on `rows` written as a .jsonl file (no eval split): the train rows."""
    args = kto.Args(dataset_name=str(write(tmp_path / "data.jsonl", rows)), eval_holdout=0, **overrides)
    tokenizer, _ = kto.load_tokenizer(kto.resolve_path(args.model_name_or_path))
    return kto.load_unpaired(args, tokenizer)[0]


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def test_saved_model_loads(train_run, toy_model_dir):
    run = train_run()
    for path in (run.out, run.out / "checkpoint-3"):
        assert json.loads((path / "args.json").read_text()) == asdict(run.args)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert all(torch.equal(model.state_dict()[k], w) for k, w in load_file(path / "model.safetensors").items())
        AutoTokenizer.from_pretrained(path)
    before, after = load_file(toy_model_dir / "model.safetensors"), load_file(run.out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_resume_replays_the_run_exactly(train_run, monkeypatch, capsys):
    full = train_run()
    calls, real = [], kto.kto_loss
    monkeypatch.setattr(kto, "kto_loss", lambda *a, **k: calls.append(a[0].requires_grad) or real(*a, **k))
    resumed = train_run(fresh=True, resume_from=str(full.out / "checkpoint-3"))
    assert f"resumed from {full.out / 'checkpoint-3'} at step 3" in capsys.readouterr().out
    assert sum(calls) == 3  # only steps 4-6 trained
    assert_same_weights(full.out, resumed.out)
    assert without_timing(resumed.metrics) == without_timing(full.metrics)


def test_same_seed_same_weights(train_run):
    first, again = train_run(), train_run(fresh=True)
    assert_same_weights(first.out, again.out)
    assert without_timing(first.metrics) == without_timing(again.metrics)


def test_precomputed_reference_log_probs_train_the_same(train_run):
    """One reference pass before training gives the run the per-batch reference passes give (float rounding aside)."""
    assert_same_weights(train_run().out, train_run(precompute_ref_logps=True).out, atol=1e-6)


def test_non_finite_loss_stops_and_names_the_last_checkpoint(train_run, monkeypatch, tmp_path):
    calls, real = [], kto.kto_loss

    def poisoned(*a, **k):
        losses, rewards = real(*a, **k)
        calls.append(a[0].requires_grad)
        return (losses * float("nan") if sum(calls) == 5 and a[0].requires_grad else losses), rewards

    monkeypatch.setattr(kto, "kto_loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4") as info:
        train_run(fresh=True, output_dir=str(tmp_path / "run"))
    assert str(tmp_path / "run" / "checkpoint-3") in str(info.value)


def test_eval_metrics_are_per_label_means(train_run, toy_model_dir):
    """eval/desirable is the eval split's share of desirable rows, and eval/rewards/chosen and /rejected are beta
    times the mean log-ratio over each label's rows, recomputed here by plain forwards of the saved model."""
    run = train_run(fresh=True, max_steps=2, eval_steps=0)
    rows = kto.load_unpaired(run.args, AutoTokenizer.from_pretrained(toy_model_dir))[1]
    policy, reference = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (run.out, toy_model_dir))
    rewards = {True: [], False: []}
    for row in rows:
        prompt, answer = row["completion"][: row["completion_start"]], row["completion"][row["completion_start"]:]
        rewards[row["label"]].append(run.args.beta * (direct_logp(policy, prompt, answer)
                                                      - direct_logp(reference, prompt, answer)))
    assert run.metrics["eval/desirable"] == pytest.approx(len(rewards[True]) / len(rows))
    for label, name in ((True, "chosen"), (False, "rejected")):
        assert run.metrics[f"eval/rewards/{name}"] == pytest.approx(sum(rewards[label]) / len(rewards[label]),
                                                                    abs=1e-6)


def test_each_row_is_scored_with_another_rows_completion_after_its_own_prompt(tmp_path, toy_model_dir):
    """The mismatched ids are the row's prompt ids then the completion ids of the row before it in a seeded shuffle:
    every completion is used once, none by its own row, and the pairing depends on the seed only."""
    answers = ["great food", "bad", "the film was good", "awful trip", "good"]
    rows = rows_of(tmp_path, [{"prompt": [{"role": "user", "content": P}],
                               "completion": [{"role": "assistant", "content": a}], "label": i % 2 == 0}
                              for i, a in enumerate(answers)])
    prompt_ids, _ = toy_chat_ids(P, "good")
    completions = [toy_chat_ids(P, a)[1] for a in answers]
    partners = []
    for row, answer in zip(rows, completions):
        assert row["completion"] == prompt_ids + answer and row["completion_start"] == len(prompt_ids)
        assert row["kl"][: row["kl_start"]] == prompt_ids
        partners.append(completions.index(row["kl"][row["kl_start"]:]))
    assert sorted(partners) == list(range(5)) and all(p != i for i, p in enumerate(partners))
    assert [row["label"] for row in rows] == [True, False, True, False, True]
    again = rows_of(tmp_path, [{"prompt": P, "completion": " " + a, "label": True} for a in answers], seed=1)
    assert [r["kl"][r["kl_start"]:][:-1] for r in again] == [completions[p][:-1] for p in partners]
    other = rows_of(tmp_path, [{"prompt": P, "completion": " " + a, "label": True} for a in answers], seed=2)
    assert [r["kl"][r["kl_start"]:][:-1] for r in other] != [completions[p][:-1] for p in partners]


def test_the_reference_point_is_the_mean_log_ratio_of_the_mismatched_rows(train_run, monkeypatch, unpaired_dir,
                                                                          toy_model_dir):
    """At step 1 the policy is the reference, so z0's estimate is 0; what kto_loss receives at eval time on the trained
    model is the mean over the batch of log pi(y'|x) - log pi_ref(y'|x), computed here by plain forwards."""
    seen = []
    real = kto.kto_loss
    monkeypatch.setattr(kto, "kto_loss", lambda *a, **k: seen.append(float(a[3])) or real(*a, **k))
    run = train_run(fresh=True, max_steps=1, eval_steps=0, per_device_eval_batch_size=16)
    assert seen[0] == 0.0  # training step 1: pi = pi_ref
    rows = kto.load_unpaired(run.args, AutoTokenizer.from_pretrained(toy_model_dir))[1]
    policy, reference = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (run.out, toy_model_dir))
    ratios = [direct_logp(policy, r["kl"][: r["kl_start"]], r["kl"][r["kl_start"]:])
              - direct_logp(reference, r["kl"][: r["kl_start"]], r["kl"][r["kl_start"]:]) for r in rows]
    assert seen[-1] == pytest.approx(sum(ratios) / len(ratios), abs=1e-5)  # the one eval batch of 16


def test_pairwise_data_is_unpaired(tmp_path, capsys):
    rows = rows_of(tmp_path, [{"prompt": P, "chosen": " great food", "rejected": " bad"},
                              {"prompt": P, "chosen": " good", "rejected": " awful"}])
    out = capsys.readouterr().out
    assert "holds preference pairs: each becomes a desirable row (chosen) and an undesirable row" in out
    assert [row["label"] for row in rows] == [True, False, True, False]


def test_text_and_messages_formats(tmp_path, capsys):
    text = rows_of(tmp_path, [{"prompt": "<|user|> " + P + " <|assistant|>", "completion": " great food",
                               "label": True}])
    chat = rows_of(tmp_path, [{"messages": [{"role": "user", "content": P},
                                            {"role": "assistant", "content": "great food"}], "label": 1}])
    assert text[0]["completion"][text[0]["completion_start"]:] == chat[0]["completion"][chat[0]["completion_start"]:]
    assert chat[0]["label"] is True


@pytest.mark.parametrize("row, match", [
    ({"prompt": P, "completion": " good", "label": "yes"}, r"row 0: column 'label' should be a boolean"),
    ({"prompt": P, "completion": " good"}, r"has no column 'label'"),
    ({"prompt": P, "label": True}, r"has no column 'completion'"),
    ({"prompt": P, "completion": ["good"], "label": True}, r"row 0: column 'completion' should be a string"),
])
def test_bad_rows_are_named(tmp_path, row, match):
    with pytest.raises(kto.UsageError, match=match):
        rows_of(tmp_path, [row])


def test_skipped_rows_are_counted(tmp_path, capsys):
    rows = rows_of(tmp_path, [{"prompt": "", "completion": " good", "label": True},
                              {"prompt": P, "completion": " good", "label": False}])
    assert len(rows) == 1
    assert "skipped rows: empty prompt or completion: 1" in capsys.readouterr().out


def test_a_tied_pair_is_skipped_and_a_row_skipped_alone_is_counted_as_a_row(tmp_path, capsys, monkeypatch):
    """A pair whose answers are equal holds no preference: it was kept as a desirable and an undesirable copy of one
    answer, reported nowhere. It is skipped, as dpo.py skips it. A row skipped at tokenization (its whole prompt
    merged into its answer, forced here) is one of a pair's two rows: it is counted as a row, not as a pair."""
    rows = rows_of(tmp_path, [{"prompt": P, "chosen": " good", "rejected": " good"},
                              {"prompt": P, "chosen": " great food", "rejected": " bad"}])
    assert [row["label"] for row in rows] == [True, False]
    assert "from 2 pairs: 1 desirable, 1 undesirable" in (out := capsys.readouterr().out)
    assert "skipped pairs: chosen equals rejected: 1\n" in out
    real = kto.tokenize_response

    def merging(tokenizer, prompt, response, templated):
        prompt_ids, response_ids = real(tokenizer, prompt, response, templated)
        return ([], prompt_ids + response_ids) if response == " bad" else (prompt_ids, response_ids)

    monkeypatch.setattr(kto, "tokenize_response", merging)
    rows = rows_of(tmp_path, [{"prompt": P, "chosen": " great food", "rejected": " bad"}])
    assert [row["label"] for row in rows] == [True]
    assert "skipped pairs: none; skipped rows: whole prompt merged into the completion: 1\n" in capsys.readouterr().out


@pytest.mark.slow  # starts a process: `python kto.py --help`
def test_help_lists_the_method_flags_and_import_is_silent():
    result = python("kto.py", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: kto.py")
    assert all(flag in result.stdout for flag in ("--beta", "--desirable_weight", "--undesirable_weight"))


@pytest.mark.slow  # starts a process: `python kto.py --max_steps 20`
def test_default_command_runs(tmp_path):
    """The default command on the whole toy world, capped at 20 steps: every row is kept, and the model loads."""
    result = python("kto.py", "--max_steps", "20", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 16384 rows kept from 16384 rows: 7623 desirable, 8761 undesirable" in result.stdout
    assert "step 20:" in result.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
