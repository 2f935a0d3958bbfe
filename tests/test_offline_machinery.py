"""The training loops of ipo.py, slic_hf.py, fdpo.py and rrhf.py: what each promises about saving, loading, resuming,
determinism, non-finite steps and the command line, and the parts that are theirs alone (IPO's per-token averaging,
SLiC-HF's target column and its single model, f-DPO's divergences, RRHF's metrics, single model and reward-model
scores).

The data helpers they share with dpo.py are byte-identical copies (test_copies_identical.py), so their tokenization,
formats and batched log-probs are tested once, in test_dpo_machinery.py; rrhf.py's own ranked-data reader is tested in
test_rrhf_data.py.
"""

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import fdpo
import ipo
import rrhf
import slic_hf
from helpers import (
    N_TEST,
    SHORT_RUN,
    TOY,
    TOY_EOS,
    assert_same_weights,
    cached_runner,
    direct_logp,
    python,
    toy_chat_ids,
    toy_ids,
)

MODULES = {"ipo": ipo, "slic_hf": slic_hf, "fdpo": fdpo, "rrhf": rrhf}
LOSSES = {"ipo": "ipo_loss", "slic_hf": "slic_loss", "fdpo": "fdpo_loss", "rrhf": "rrhf_loss"}
BASE_ARGS = SHORT_RUN
P = "<|user|> how was the food ? <|assistant|>"


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_model_dir, data_dir, ranked_dir):
    """train_run(name, fresh=False, **overrides): that script's train() on the snapshots (helpers.cached_runner);
    rrhf.py trains on ranked groups, 16 a batch, the others on pairs."""
    runners = {name: cached_runner(module, tmp_path_factory, **BASE_ARGS, model_name_or_path=str(toy_model_dir),
                                   dataset_name=str(ranked_dir if name == "rrhf" else data_dir))
               for name, module in MODULES.items()}
    return lambda name, **kwargs: runners[name](**kwargs)


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def wrap_loss(monkeypatch, name: str, edit=lambda call, losses: losses) -> list:
    """Route the script's loss through `edit` on training calls (those with gradients); record their inputs."""
    module = MODULES[name]
    calls, real = [], getattr(module, LOSSES[name])

    def wrapped(*tensors, **kwargs):
        out = real(*tensors, **kwargs)
        if tensors[0].requires_grad:  # evaluation runs under no_grad
            calls.append([t.detach().clone() for t in tensors if torch.is_tensor(t)])
            out = (edit(len(calls), out[0]), *out[1:])
        return out

    monkeypatch.setattr(module, LOSSES[name], wrapped)
    return calls


# --------------------------------------------------------------------------- every script
@pytest.mark.parametrize("name", MODULES)
def test_saved_model_loads(train_run, toy_model_dir, toy_tokenizer, name):
    run = train_run(name)
    for path in (run.out, run.out / "checkpoint-3"):
        assert json.loads((path / "args.json").read_text()) == asdict(run.args)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert all(torch.equal(model.state_dict()[k], w) for k, w in load_file(path / "model.safetensors").items())
        assert AutoTokenizer.from_pretrained(path)(P)["input_ids"] == toy_tokenizer(P)["input_ids"]
    before, after = load_file(toy_model_dir / "model.safetensors"), load_file(run.out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


@pytest.mark.parametrize("name", MODULES)
def test_resume_replays_the_run_exactly(train_run, monkeypatch, capsys, name):
    full = train_run(name)
    checkpoint = full.out / "checkpoint-3"
    calls = wrap_loss(monkeypatch, name)
    resumed = train_run(name, fresh=True, resume_from=str(checkpoint))
    assert f"resumed from {checkpoint} at step 3" in capsys.readouterr().out
    assert len(calls) == 3  # only steps 4-6 ran
    assert_same_weights(full.out, resumed.out)
    assert without_timing(resumed.metrics) == without_timing(full.metrics)


@pytest.mark.parametrize("name", MODULES)
def test_same_seed_same_weights(train_run, name):
    first, again = train_run(name), train_run(name, fresh=True)
    assert_same_weights(first.out, again.out)
    assert without_timing(first.metrics) == without_timing(again.metrics)


@pytest.mark.parametrize("name", MODULES)
def test_non_finite_loss_stops_and_names_the_last_checkpoint(train_run, monkeypatch, tmp_path, name):
    wrap_loss(monkeypatch, name, lambda call, losses: losses * float("nan") if call == 5 else losses)
    with pytest.raises(FloatingPointError, match="loss is nan at step 4") as info:
        train_run(name, fresh=True, output_dir=str(tmp_path / "run"))
    assert str(tmp_path / "run" / "checkpoint-3") in str(info.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow  # starts a process: `python X.py --help`
@pytest.mark.parametrize("name, flags", [("ipo", ("--beta", "--average_log_probs")),
                                         ("slic_hf", ("--delta", "--lambda_reg", "--target_column")),
                                         ("fdpo", ("--divergence", "--alpha", "--beta", "--label_smoothing",
                                                   "reverse_kl", "forward_kl")),
                                         ("rrhf", ("--rank_weight", "--reward_model_path", "--responses_column",
                                                   "--scores_column"))])
def test_help_lists_the_method_flags_and_import_is_silent(name, flags):
    """`python X.py --help` imports the script as __main__, so anything the import printed would precede "usage:"."""
    result = python(f"{name}.py", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith(f"usage: {name}.py")
    assert all(flag in result.stdout for flag in flags)


# 154 groups of i.i.d. reference samples drew one score throughout: skipped, counted
KEPT = {"rrhf": "train: 1894 groups kept of 2048"}


@pytest.mark.slow  # starts a process: `python X.py --max_steps 20`
@pytest.mark.parametrize("name", MODULES)
def test_default_command_runs(tmp_path, name):
    """The default command on the whole toy world, capped at 20 steps: every default parses, every pair (every group
    with a ranking) is kept, and the saved model loads. (What the full default run reaches:
    benchmarks/toy_defaults.py.)"""
    result = python(f"{name}.py", "--max_steps", "20", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert KEPT.get(name, "train: 16384 pairs kept of 16384") in result.stdout and "step 20:" in result.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# --------------------------------------------------------------------------- ipo.py
def test_ipo_metrics_are_implicit_rewards(train_run):
    m = train_run("ipo").metrics
    assert m["train/rewards/margin"] == pytest.approx(m["train/rewards/chosen"] - m["train/rewards/rejected"], abs=1e-6)
    assert {"train/loss", "train/rewards/accuracy", "train/logps/chosen", "train/logps/rejected",
            "train/lr"} <= m.keys()


def test_average_log_probs_divides_by_token_counts(train_run, monkeypatch, toy_model_dir, data_dir):
    """With --average_log_probs the loss receives summed log-probs divided by each response's token count, for the
    policy and the reference alike; without it, the sums. Checked on the first training step against log-probs
    computed here, response by response: each pair's ids written out from its text and the toy vocabulary, and a
    plain forward over each lone sequence from the same starting model (helpers.direct_logp)."""
    calls = {}
    for average in (False, True):
        calls[average] = wrap_loss(monkeypatch, "ipo")
        train_run("ipo", fresh=True, average_log_probs=average, max_steps=1, save_steps=0)
    model, tok = (AutoModelForCausalLM.from_pretrained(toy_model_dir).eval(),
                  AutoTokenizer.from_pretrained(toy_model_dir))
    data = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    rows = ipo.tokenize_pairs(ipo.load_splits(str(data_dir), None, "train", "test", 0, 1)[0], tok, 512, 256, "train")
    first = [rows[i] for i in ipo.batch_order(rows, BASE_ARGS["per_device_train_batch_size"], 1, 0, True)[0]]
    want = {"sum": [[], []], "n": [[], []]}  # [chosen, rejected] of each pair of the first batch, in batch order
    for row in first:
        source = data[row["row"]]
        for side, key in enumerate(("chosen", "rejected")):
            prompt_ids, answer_ids = toy_chat_ids(source["prompt"][0]["content"], source[key][0]["content"])
            assert row[key] == prompt_ids + answer_ids  # the pair the script trained on is this text
            want["sum"][side].append(direct_logp(model, prompt_ids, answer_ids))
            want["n"][side].append(len(answer_ids))
    (chosen_sum, rejected_sum), (chosen_n, rejected_n) = (torch.tensor(want[k], dtype=torch.float32)
                                                          for k in ("sum", "n"))
    summed, averaged = calls[False][0], calls[True][0]
    for got, expected in ((summed, (chosen_sum, rejected_sum, chosen_sum, rejected_sum)),
                          (averaged, (chosen_sum / chosen_n, rejected_sum / rejected_n,
                                      chosen_sum / chosen_n, rejected_sum / rejected_n))):
        for g, w in zip(got, expected):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)  # batched and padded against lone: ~1e-6 apart
    assert (chosen_n > 1).any() and not torch.allclose(summed[0], averaged[0])  # the division shows


# --------------------------------------------------------------------------- slic_hf.py
def test_slic_loads_one_model(train_run, monkeypatch):
    """No reference model: exactly one from_pretrained of a causal LM per run (the policy)."""
    loads, real = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(slic_hf.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    train_run("slic_hf", fresh=True, max_steps=1, save_steps=0)
    assert len(loads) == 1


def test_slic_metrics_are_log_probs(train_run):
    m = train_run("slic_hf").metrics
    assert not any("rewards" in k for k in m)  # reference-free: logps/..., never rewards
    for split in ("train", "eval"):
        assert m[f"{split}/logps/margin"] == pytest.approx(m[f"{split}/logps/chosen"] - m[f"{split}/logps/rejected"],
                                                           abs=1e-5)
        assert m[f"{split}/logps/target"] == m[f"{split}/logps/chosen"]  # no target column: y_ref is the chosen answer
        assert m[f"{split}/logps/margin_met"] <= m[f"{split}/logps/accuracy"]  # delta > 0
        assert m[f"{split}/loss"] == pytest.approx(m[f"{split}/hinge"] - 0.5 * m[f"{split}/logps/target"], abs=1e-4)


def test_slic_eval_metrics_by_hand(train_run, data_dir):
    """The final evaluation, recomputed from the saved model: each held-out pair's log-probs by a plain forward over
    its lone sequences (ids written out from its text), then by hand the hinge max(0, delta - margin), the loss
    hinge - lambda log pi(y_w) (no target column), and the fractions with margin > 0 and margin >= delta. The run
    uses delta 3: at the default 1 no held-out margin falls between 0 and delta, so the two fractions would agree and
    could not tell the thresholds apart."""
    run = train_run("slic_hf", delta=3.0)
    delta, lambda_reg = run.args.delta, run.args.lambda_reg
    model = AutoModelForCausalLM.from_pretrained(run.out).eval()
    chosen, rejected = [], []
    for line in (data_dir / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompt = row["prompt"][0]["content"]
        for out, key in ((chosen, "chosen"), (rejected, "rejected")):
            out.append(direct_logp(model, *toy_chat_ids(prompt, row[key][0]["content"])))
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert min(min(abs(x), abs(x - delta)) for x in margins) > 1e-3  # no margin on a threshold: the fractions are exact
    hinges = [max(0.0, delta - x) for x in margins]
    n, m = len(margins), run.metrics
    assert n == N_TEST
    want = {"eval/logps/chosen": sum(chosen) / n, "eval/logps/rejected": sum(rejected) / n,
            "eval/logps/margin": sum(margins) / n, "eval/hinge": sum(hinges) / n,
            "eval/loss": sum(h - lambda_reg * c for h, c in zip(hinges, chosen)) / n,
            "eval/logps/accuracy": sum(x > 0 for x in margins) / n,
            "eval/logps/margin_met": sum(x >= delta for x in margins) / n}
    assert {k: m[k] for k in want} == pytest.approx(want, abs=1e-5)
    assert want["eval/logps/margin_met"] < want["eval/logps/accuracy"]  # the check tells the thresholds apart


@pytest.fixture(scope="module")
def target_data(tmp_path_factory, data_dir) -> Path:
    """The same pairs, all asked "how was the food ?", with an sft_target column: 'great food' for every row."""
    d = tmp_path_factory.mktemp("target")
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (data_dir / f"{split}.jsonl").read_text().splitlines()]
        (d / f"{split}.jsonl").write_text("".join(
            json.dumps({**r, "prompt": [{"role": "user", "content": "how was the food ?"}],
                        "sft_target": [{"role": "assistant", "content": "great food"}]}) + "\n" for r in rows))
    return d


def test_slic_target_column_is_the_regulariser(train_run, monkeypatch, target_data, toy_model_dir, capsys):
    """With an sft_target column the regulariser's log-probs are those of the target, computed here directly."""
    calls = wrap_loss(monkeypatch, "slic_hf")
    run = train_run("slic_hf", fresh=True, dataset_name=str(target_data), max_steps=1, save_steps=0)
    assert "train: y_ref from column 'sft_target'" in capsys.readouterr().out
    model, tok = (AutoModelForCausalLM.from_pretrained(toy_model_dir).eval(),
                  AutoTokenizer.from_pretrained(toy_model_dir))
    ids = tok(P + " great food <|end|>", add_special_tokens=False)["input_ids"]
    start = len(tok(P, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    want = sum(logps[t - 1, ids[t]] for t in range(start, len(ids)))
    target = calls[0][2]
    torch.testing.assert_close(target, torch.full_like(target, want.item()), rtol=0, atol=1e-5)
    assert run.metrics["eval/logps/target"] != run.metrics["eval/logps/chosen"]


def implicit_split(chosen: str, rejected: str) -> int:
    """How many words of an implicit-prompt pair are its prompt: the leading words the two texts share, except that an
    answer is never left empty unless it was written empty (the text ends in a space): where one text's words are all
    shared ("... party" / "... party trip"), its last word goes back to the answers."""
    c, r = chosen.split(), rejected.split()
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    return k - any(k == len(words) and not text[-1].isspace() for words, text in ((c, chosen), (r, rejected)))


@pytest.mark.parametrize("name", ["pairs_standard", "pairs_implicit"])
def test_slic_text_formats_tokenize_as_written(toy_tokenizer, name):
    """The toy pairs in plain text, with an explicit prompt (pairs_standard) and with the prompt left implicit in both
    answers (pairs_implicit, hh-rlhf's layout), through tokenize_triples, no target column: each pair's ids are those
    written out here from its text and the toy vocabulary, <|end|> appended, and each answer starts after the prompt.
    An implicit pair's prompt is its shared leading words (implicit_split), so where both answers begin with the same
    word ("how the" / "how film") that word is prompt: 3 of the first 64 rows."""
    rows = [json.loads(line) for line in (TOY / name / "train.jsonl").read_text().splitlines()[:64]]
    got = slic_hf.tokenize_triples(Dataset.from_list(rows), toy_tokenizer, 512, 256, "train", "sft_target")
    assert len(got) == len(rows) and all("target" not in pair for pair in got)
    moved = 0
    for pair, row in zip(got, rows):
        if name == "pairs_standard":
            texts, start = [row["prompt"] + row[k] for k in ("chosen", "rejected")], len(toy_ids(row["prompt"]))
        else:
            texts, start = [row["chosen"], row["rejected"]], implicit_split(row["chosen"], row["rejected"])
            moved += start != row["chosen"].split().index("<|assistant|>") + 1
        assert [pair["chosen"], pair["rejected"]] == [toy_ids(t) + [TOY_EOS] for t in texts]
        assert pair["chosen_start"] == pair["rejected_start"] == start
    assert moved == (3 if name == "pairs_implicit" else 0)


@pytest.mark.parametrize("fmt", ["text", "chat"])
@pytest.mark.parametrize("max_length, max_prompt_length, cut", [(512, 256, False), (9, 4, True)],
                         ids=["whole", "truncated"])
def test_slic_target_is_tokenized_and_truncated_as_the_answers(toy_tokenizer, fmt, max_length, max_prompt_length,
                                                               cut):
    """A target in the format of the answers (plain text or messages) becomes the prompt's ids and its own, as written
    out here. With max_length 9 and max_prompt_length 4 the pair (7 prompt tokens + 3) is cut as dpo.py cuts it: the
    prompt's last 4 tokens, then each answer's first 5; the target (7 + 6) is cut by the same rule, so it keeps
    "the food was very good" and loses its <|end|>."""
    prompt, answers = "how was the food ?", {"chosen": "great food", "rejected": "awful",
                                             "sft_target": "the food was very good"}
    if fmt == "text":
        row = {"prompt": f"<|user|> {prompt} <|assistant|>", **{k: f" {v}" for k, v in answers.items()}}
    else:
        row = {"prompt": [{"role": "user", "content": prompt}],
               **{k: [{"role": "assistant", "content": v}] for k, v in answers.items()}}
    (pair,) = slic_hf.tokenize_triples(Dataset.from_list([row]), toy_tokenizer, max_length, max_prompt_length, "train",
                                       "sft_target")
    prompt_ids = toy_ids(f"<|user|> {prompt} <|assistant|>")
    if cut:
        prompt_ids = toy_ids("the food ? <|assistant|>")
    for key, column in (("chosen", "chosen"), ("rejected", "rejected"), ("target", "sft_target")):
        want = (prompt_ids + toy_ids(answers[column]) + [TOY_EOS])[:max_length]
        assert (pair[key], pair[f"{key}_start"]) == (want, len(prompt_ids)), key
    assert len(pair["target"]) == (9 if cut else 13)


@pytest.mark.parametrize("edit, match", [
    (lambda r: {k: v for k, v in r.items() if k != "prompt"} | {
        "chosen": [{"role": "user", "content": "how was the food ?"}, *r["chosen"]],
        "rejected": [{"role": "user", "content": "how was the food ?"}, *r["rejected"]]},
     "needs an explicit 'prompt' column"),
    (lambda r: r | {"sft_target": "great food"}, "should be in the same format as 'chosen'"),
], ids=["implicit-prompt", "text-target-for-chat-data"])
def test_slic_bad_targets_raise(toy_tokenizer, target_data, edit, match):
    row = edit(json.loads((target_data / "train.jsonl").read_text().splitlines()[0]))
    with pytest.raises(ValueError, match=match):
        slic_hf.tokenize_triples(Dataset.from_list([row]), toy_tokenizer, 512, 256, "train", "sft_target")


def test_slic_rows_without_a_target_are_named(train_run, target_data, data_dir, tmp_path):
    """A target column that some rows lack (here the whole test split: `datasets` fills the column with None there)
    stops the run at the first such row, naming the column, rather than training on a silently different objective."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.jsonl").write_text((target_data / "train.jsonl").read_text())
    (mixed / "test.jsonl").write_text((data_dir / "test.jsonl").read_text())
    with pytest.raises(ValueError,
                       match="row 0: column 'sft_target' should be in the same format as 'chosen', got NoneType"):
        train_run("slic_hf", fresh=True, dataset_name=str(mixed), max_steps=1, save_steps=0)


# --------------------------------------------------------------------------- fdpo.py
@pytest.mark.parametrize("divergence, alpha", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("js", 0.5), ("alpha", 0.3)])
def test_fdpo_divergence_reaches_the_loss(train_run, monkeypatch, divergence, alpha):
    """--divergence, --alpha and --label_smoothing arrive at fdpo_loss unchanged, and the logged f-DPO rewards are
    beta f'(u)."""
    seen, real = [], fdpo.fdpo_loss

    def spy(*args, **kwargs):
        seen.append(args[5:])
        return real(*args, **kwargs)

    monkeypatch.setattr(fdpo, "fdpo_loss", spy)
    run = train_run("fdpo", fresh=True, divergence=divergence, alpha=alpha, label_smoothing=0.1, max_steps=2,
                    save_steps=0)
    assert set(seen) == {(divergence, alpha, 0.1)}
    m = run.metrics
    assert {"train/fdpo/chosen", "eval/fdpo/chosen", "train/rewards/margin", "eval/rewards/accuracy"} <= m.keys()
    if divergence == "reverse_kl":  # beta f'(u) = beta (log u + 1): the DPO reward plus beta
        assert m["eval/fdpo/chosen"] == pytest.approx(m["eval/rewards/chosen"] + run.args.beta, abs=1e-6)


def test_fdpo_bad_alpha_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--alpha must be in"):
        fdpo.train(fdpo.Args(alpha=1.0, output_dir=str(tmp_path), device="cpu"))


# --------------------------------------------------------------------------- rrhf.py
def test_rrhf_metrics_are_the_loss_parts(train_run):
    m = train_run("rrhf").metrics
    assert not any("rewards" in k for k in m)
    for split in ("train", "eval"):
        assert m[f"{split}/loss"] == pytest.approx(m[f"{split}/rank"] + m[f"{split}/sft"], abs=1e-5)  # rank_weight 1
        assert m[f"{split}/p/best"] == -m[f"{split}/sft"]
        # every pair is concordant or discordant: tau = (right - wrong) / pairs = 2 accuracy - 1, group by group
        assert m[f"{split}/p/kendall_tau"] == pytest.approx(2 * m[f"{split}/p/pair_accuracy"] - 1, abs=1e-6)


def test_rrhf_eval_metrics_by_hand(train_run, ranked_dir):
    """The final evaluation, recomputed from the saved model: each held-out response's length-normalised log-prob
    p = log pi(y|x) / |y| (a plain forward over its lone sequence, ids written out from its text), then group by
    group by hand: the hinge sum over pairs with r_i < r_j of max(0, p_i - p_j), the first top-scored response's -p,
    and the share of those pairs that p orders as r does, each averaged over the groups."""
    run = train_run("rrhf")
    model = AutoModelForCausalLM.from_pretrained(run.out).eval()
    rank, sft, accuracy, p_mean = [], [], [], []
    for line in (ranked_dir / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        scores = row["scores"]
        if len(set(scores)) == 1:
            continue  # all tied: no ranking, skipped by the script (and counted)
        p = []
        for y in row["completions"]:
            prompt_ids, answer_ids = toy_chat_ids(row["prompt"][0]["content"], y[0]["content"])
            p.append(direct_logp(model, prompt_ids, answer_ids) / len(answer_ids))
        pairs = [(i, j) for i in range(len(p)) for j in range(len(p)) if scores[i] < scores[j]]
        rank.append(sum(max(0.0, p[i] - p[j]) for i, j in pairs))
        sft.append(-p[scores.index(max(scores))])
        accuracy.append(sum(p[i] < p[j] for i, j in pairs) / len(pairs))
        p_mean.append(sum(p) / len(p))
    n, m = len(rank), run.metrics
    want = {"eval/rank": sum(rank) / n, "eval/sft": sum(sft) / n, "eval/loss": (sum(rank) + sum(sft)) / n,
            "eval/p/mean": sum(p_mean) / n, "eval/p/pair_accuracy": sum(accuracy) / n,
            "eval/p/kendall_tau": sum(2 * a - 1 for a in accuracy) / n}
    assert {k: m[k] for k in want} == pytest.approx(want, abs=1e-5)


def test_rrhf_loads_one_model(train_run, monkeypatch):
    loads, real = [], AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(rrhf.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    train_run("rrhf", fresh=True, max_steps=1, save_steps=0)
    assert len(loads) == 1


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory, toy_model_dir):
    """The toy model's body with a fresh one-label head (seeded): any scalar scorer will do to test the plumbing."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm")
    AutoModelForSequenceClassification.from_pretrained(toy_model_dir, num_labels=1).save_pretrained(path)
    AutoTokenizer.from_pretrained(toy_model_dir).save_pretrained(path)
    return path


def test_rrhf_reward_model_scores_each_response_as_its_forward_does(tiny_reward_model, toy_tokenizer):
    """Scores from the batched, padded, length-sorted pass equal a forward over each lone (prompt + response) sequence,
    whose ids are written out here from the toy vocabulary (plain-text rows: prompt and response joined as they are,
    then <|end|>); rows without a scores column are fine; an unusable row gets None."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    rows = [{"prompt": P, "completions": [" great food", " awful", " the film was very good"]},
            {"prompt": "", "completions": [" great food", " awful"]},
            {"prompt": "<|user|> was the trip good ? <|assistant|>", "completions": [" good trip", " bad"]}]
    got = rrhf.reward_model_scores(Dataset.from_list(rows), rrhf.Forward(model), toy_tokenizer, 512, 256, "train",
                                   "ranked", "completions", 2, rrhf.Runtime(0, 1, torch.device("cpu"), bf16=False))
    assert got[1] is None
    with torch.no_grad():
        for row, scores in zip((rows[0], rows[2]), (got[0], got[2])):
            want = [model(input_ids=torch.tensor([toy_ids(row["prompt"] + y) + [TOY_EOS]])).logits[0, 0].item()
                    for y in row["completions"]]
            assert scores == pytest.approx(want, abs=1e-5)


def test_rrhf_reward_model_replaces_the_scores(train_run, tiny_reward_model, ranked_dir, monkeypatch, capsys):
    """The scores rrhf_loss sees on the first step are the reward model's: every group of the batch carries the scores
    that a plain forward gives its responses, one lone sequence at a time, on ids written out here from each row's
    text (the toy conversation as its chat template renders it)."""
    calls = wrap_loss(monkeypatch, "rrhf")
    train_run("rrhf", fresh=True, reward_model_path=str(tiny_reward_model), max_steps=1, save_steps=0)
    out = capsys.readouterr().out
    assert "train: the reward model orders" in out and "of the data's strictly ordered pairs as the data does" in out
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    expected = []  # every train row's scores, by hand
    with torch.no_grad():
        for line in (ranked_dir / "train.jsonl").read_text().splitlines():
            row = json.loads(line)
            prompt = row["prompt"][0]["content"]
            expected.append([model(input_ids=torch.tensor([sum(toy_chat_ids(prompt, y[0]["content"]), [])]))
                             .logits[0, 0].item() for y in row["completions"]])
    _, _, scores, valid = calls[0][:4]
    assert len(scores) == BASE_ARGS["per_device_train_batch_size"]
    for group, keep in zip(scores, valid):
        got = group[keep].tolist()
        assert any(len(got) == len(e) and got == pytest.approx(e, abs=1e-5) for e in expected), got
