"""rrhf.py's data and training loop: ranked and pairwise formats, counted skips and named errors, the batched log-probs
of variable-k groups, reward-model scoring, and what it promises about saving, resuming, determinism, non-finite
steps and the command line. Helpers it shares with dpo.py are byte-identical copies (test_copies_identical.py) and
are tested in test_dpo_machinery.py."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import rrhf
from helpers import N_TEST, N_TRAIN, SHORT_RUN, TOY, assert_same_weights, cached_runner, head, python

P = "<|user|> how was the food ? <|assistant|>"


@pytest.fixture(scope="module")
def ranked_dir(tmp_path_factory) -> Path:
    """The first N_TRAIN / N_TEST groups of the toy world's ranked data (k = 2-4, true scores)."""
    d = tmp_path_factory.mktemp("ranked")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        head(TOY / "ranked" / f"{split}.jsonl", d / f"{split}.jsonl", n)
    return d


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_model_dir, ranked_dir):
    """train_run(fresh=False, **overrides): rrhf.train on the snapshots, 4 batches of 16 groups an epoch (helpers.cached_runner)."""
    return cached_runner(rrhf, tmp_path_factory, **SHORT_RUN, model_name_or_path=str(toy_model_dir), dataset_name=str(ranked_dir))


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def wrap_loss(monkeypatch, edit=lambda call, losses: losses) -> list:
    """Route rrhf_loss through `edit` on training calls (those with gradients); record their tensor inputs."""
    calls, real = [], rrhf.rrhf_loss

    def wrapped(*tensors, **kwargs):
        out = real(*tensors, **kwargs)
        if tensors[0].requires_grad:
            calls.append([t.detach().clone() for t in tensors if torch.is_tensor(t)])
            out = (edit(len(calls), out[0]), *out[1:])
        return out

    monkeypatch.setattr(rrhf, "rrhf_loss", wrapped)
    return calls


# --------------------------------------------------------------------------- the loop
def test_saved_model_loads(train_run, toy_model_dir, toy_tokenizer):
    run = train_run()
    for path in (run.out, run.out / "checkpoint-3"):
        assert json.loads((path / "args.json").read_text()) == asdict(run.args)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert all(torch.equal(model.state_dict()[k], w) for k, w in load_file(path / "model.safetensors").items())
        assert AutoTokenizer.from_pretrained(path)(P)["input_ids"] == toy_tokenizer(P)["input_ids"]
    before, after = load_file(toy_model_dir / "model.safetensors"), load_file(run.out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_resume_replays_the_run_exactly(train_run, monkeypatch, capsys):
    full = train_run()
    checkpoint = full.out / "checkpoint-3"
    calls = wrap_loss(monkeypatch)
    resumed = train_run(fresh=True, resume_from=str(checkpoint))
    assert f"resumed from {checkpoint} at step 3" in capsys.readouterr().out
    assert len(calls) == 3
    assert_same_weights(full.out, resumed.out)
    assert without_timing(resumed.metrics) == without_timing(full.metrics)


def test_same_seed_same_weights(train_run):
    first, again = train_run(), train_run(fresh=True)
    assert_same_weights(first.out, again.out)
    assert without_timing(first.metrics) == without_timing(again.metrics)


def test_non_finite_loss_stops_and_names_the_last_checkpoint(train_run, monkeypatch, tmp_path):
    wrap_loss(monkeypatch, lambda call, losses: losses * float("nan") if call == 5 else losses)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4") as info:
        train_run(fresh=True, output_dir=str(tmp_path / "run"))
    assert str(tmp_path / "run" / "checkpoint-3") in str(info.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_metrics_are_the_loss_parts(train_run):
    m = train_run().metrics
    assert not any("rewards" in k for k in m)
    for split in ("train", "eval"):
        assert m[f"{split}/loss"] == pytest.approx(m[f"{split}/rank"] + m[f"{split}/sft"], abs=1e-5)  # rank_weight 1
        assert m[f"{split}/p/best"] == -m[f"{split}/sft"]
        assert -1 <= m[f"{split}/p/kendall_tau"] <= 1 and 0 <= m[f"{split}/p/pair_accuracy"] <= 1


def test_one_model_is_loaded(train_run, monkeypatch):
    loads, real = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(rrhf.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    train_run(fresh=True, max_steps=1, save_steps=0)
    assert len(loads) == 1


def test_help_lists_the_method_flags_and_import_is_silent():
    result = python("rrhf.py", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: rrhf.py")
    assert all(f in result.stdout for f in ("--rank_weight", "--reward_model_path", "--responses_column", "--scores_column"))


def test_default_command_runs(tmp_path):
    """The default command on the whole toy world, capped at 20 steps (the full default run: benchmarks/toy_defaults.py).
    154 of the 2,048 groups drew answers of one score (i.i.d. reference samples): counted and skipped."""
    result = python("rrhf.py", "--max_steps", "20", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 1894 groups kept of 2048" in result.stdout and "skipped: all scores tied: 154" in result.stdout and "step 20:" in result.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# --------------------------------------------------------------------------- data
def ranked_row(completions, scores, prompt="how was the food ?"):
    return {"prompt": [{"role": "user", "content": prompt}], "completions": [[{"role": "assistant", "content": c}] for c in completions],
            "scores": scores}


def tokenize(rows, tokenizer, kind="ranked", **kwargs):
    return rrhf.tokenize_groups(Dataset.from_list(rows), tokenizer, 512, 256, "train", kind, "completions", "scores", **kwargs)


def test_bad_rows_are_counted_and_reported(toy_tokenizer, capsys):
    rows = [ranked_row(["great food", "awful"], [4.0, 1.0]),
            ranked_row(["great food", "awful", "the"], [4.0, 1.0]),  # 3 responses, 2 scores
            ranked_row(["great food", "awful"], [2.0, 2.0]),  # all tied
            ranked_row(["great food"], [4.0]),  # k = 1
            ranked_row(["great food", "awful", "the"], [4.0, 1.0, 1.0])]  # a tie below the top is fine
    kept = tokenize(rows, toy_tokenizer)
    out = capsys.readouterr().out
    assert [r["scores"] for r in kept] == [[4.0, 1.0], [4.0, 1.0, 1.0]]
    assert "train: 2 groups kept of 5 (k: 2 x1, 3 x1" in out
    assert "responses and scores do not line up: 1" in out and "all scores tied: 1" in out and "fewer than 2 responses: 1" in out


@pytest.mark.parametrize("row, match", [
    (ranked_row(["great food", "awful"], ["4", "high"]), r"row 0: column 'scores' should be a list of finite numbers, got .\['4', 'high'\]."),
    (ranked_row(["great food", "awful"], [4.0, float("nan")]), "row 0: column 'scores' should be a list of finite numbers"),
    (ranked_row(["great food", "awful"], [4.0, 1.0]) | {"completions": "great food"}, "row 0: column 'completions' should be a list of message lists"),
    (ranked_row(["great food", "awful"], [4.0, 1.0]) | {"prompt": "how was the food ?"}, "row 0: column 'completions' should be a list of strings"),
])
def test_malformed_rows_stop_naming_row_and_column(toy_tokenizer, row, match):
    with pytest.raises(ValueError, match=match):
        tokenize([row], toy_tokenizer)


@pytest.mark.parametrize("columns, need_scores, match", [
    ({"prompt": ["x"], "completions": [["a", "b"]]}, True, "has a 'completions' column but no 'scores' column"),
    ({"completions": [["a", "b"]], "scores": [[1, 0]]}, True, "has a 'completions' column but no 'prompt' column"),
    ({"prompt": ["x"], "answers": [["a", "b"]]}, True, "neither a 'completions' column nor 'chosen' and 'rejected'"),
])
def test_unknown_layouts_name_the_missing_column(columns, need_scores, match):
    with pytest.raises(ValueError, match=match):
        rrhf.data_kind(Dataset.from_dict(columns), "mine", "completions", "scores", need_scores)
    assert rrhf.data_kind(Dataset.from_dict({"prompt": ["x"], "completions": [["a", "b"]]}), "mine", "completions", "scores", False) == "ranked"


def test_pairwise_rows_are_groups_of_two(toy_tokenizer):
    """A conversational pair gives the same group as the ranked row (prompt, [chosen, rejected], [1, 0]): the two code
    paths (dpo.py's row_texts, and the ranked reader) tokenize alike. The plain-text and implicit-prompt pair formats
    keep every row as k = 2."""
    pairs = [json.loads(line) for line in (TOY / "pairs" / "train.jsonl").read_text().splitlines()[:32]]
    as_pairs = tokenize(pairs, toy_tokenizer, kind="pairwise")
    as_ranked = tokenize([{"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "scores": [1.0, 0.0]} for r in pairs], toy_tokenizer)
    assert as_pairs == as_ranked and len(as_pairs) == 32
    for name in ("pairs_standard", "pairs_implicit"):
        rows = [json.loads(line) for line in (TOY / name / "train.jsonl").read_text().splitlines()[:32]]
        groups = tokenize(rows, toy_tokenizer, kind="pairwise")
        assert len(groups) == 32 and all(g["scores"] == [1.0, 0.0] and len(g["seqs"]) == 2 for g in groups)


def test_batched_group_logps_match_one_sequence_at_a_time(toy_model_dir, toy_tokenizer):
    """Groups of k = 2, 4 and 3 in one batch: each (g, i) entry of group_logps is that response's summed log-prob and
    token count, computed here from a forward over the lone unpadded sequence; the padding slot is 0."""
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    rows = tokenize([ranked_row(["great food", "awful"], [4.0, 1.0]),
                     ranked_row(["the film was good", "", "very bad trip", "food"], [3.0, 2.0, 0.0, 2.5], "how was the film ?"),
                     ranked_row(["not bad", "good party", "?"], [2.5, 1.0, 0.0], "was the party good ?")], toy_tokenizer)
    batch = rrhf.collate_groups(rows, toy_tokenizer.pad_token_id)
    with torch.no_grad():
        logps, lengths = rrhf.group_logps(model, batch)
        for g, row in enumerate(rows):
            for i, (seq, start) in enumerate(zip(row["seqs"], row["starts"])):
                lp = model(input_ids=torch.tensor([seq])).logits[0].log_softmax(-1)
                want = sum(lp[t - 1, seq[t]] for t in range(start, len(seq)))
                assert logps[g, i].item() == pytest.approx(want.item(), abs=1e-4)
                assert lengths[g, i] == len(seq) - start
    assert batch["valid"].tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]
    assert logps[0, 2:].tolist() == [0.0, 0.0] and lengths[2, 3] == 0


# --------------------------------------------------------------------------- reward-model scoring
@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, toy_model_dir):
    """The toy model's body with a fresh one-label head (seeded): any scalar scorer will do to test the plumbing."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm")
    AutoModelForSequenceClassification.from_pretrained(toy_model_dir, num_labels=1).save_pretrained(path)
    AutoTokenizer.from_pretrained(toy_model_dir).save_pretrained(path)
    return path


def test_reward_model_scores_each_response_as_its_forward_does(tiny_reward_model, toy_tokenizer):
    """Scores from the batched, padded, length-sorted pass equal a forward over each lone (prompt + response) text; rows
    without a scores column are fine; an unusable row gets None."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    rows = [{"prompt": "how was the food ?", "completions": ["great food", "awful", "the film was very good"]},
            {"prompt": "", "completions": ["great food", "awful"]},
            {"prompt": "was the trip good ?", "completions": ["good trip", "bad"]}]
    got = rrhf.reward_model_scores(Dataset.from_list(rows), model, toy_tokenizer, 512, 256, "train", "ranked", "completions", 2)
    assert got[1] is None
    with torch.no_grad():
        for row, scores in zip((rows[0], rows[2]), (got[0], got[2])):
            want = [model(**toy_tokenizer(row["prompt"] + y + "<|end|>", return_tensors="pt")).logits[0, 0].item() for y in row["completions"]]
            assert scores == pytest.approx(want, abs=1e-4)


def test_reward_model_replaces_the_scores(train_run, tiny_reward_model, monkeypatch, capsys):
    """The scores rrhf_loss sees are the reward model's, and the run reports how often it agrees with the data's."""
    calls = wrap_loss(monkeypatch)
    train_run(fresh=True, reward_model_path=str(tiny_reward_model), max_steps=1, save_steps=0)
    out = capsys.readouterr().out
    assert "train: the reward model orders" in out and "of the data's strictly ordered pairs as the data does" in out
    scores = calls[0][2]
    assert not torch.equal(scores, scores.round(decimals=2))  # true toy scores are multiples of 0.25; a head's are not
