"""The machinery of reward_model.py: where the score is read, padding, the margin column, bad inputs, and what the
training loop promises about saving, loading, resuming, non-finite steps and determinism. (The loss has its own
tests: test_reward_model_loss.py, test_reward_model_optimum.py. Tokenization and data loading are dpo.py's, tested in
test_dpo_machinery.py and kept identical by test_copies_identical.py; only the margin is new here.)

Everything runs on CPU. The toy world is copied once per module, since toy_world/ may be regenerated while the tests
run, and every expected value is computed here from the same model, tokenizer or data.
"""

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import load_dataset
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

import reward_model as rm
from helpers import TOY, assert_same_weights, cached_runner, head, python, softplus, toy_chat_ids

N_TRAIN, N_TEST = 64, 16  # rows of toy data the training runs use
CPU = rm.Runtime(rank=0, world=1, device=torch.device("cpu"), bf16=False)


# --------------------------------------------------------------------------- shared fixtures
def margin_of(i: int) -> float:
    return (i % 5) / 2  # 0, 0.5, ..., 2: a pattern any misalignment of rows and margins breaks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The first rows of the toy world's conversational pairs, with a train and a test split and a margin column."""
    d = tmp_path_factory.mktemp("data")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        head(TOY / "pairs" / f"{split}.jsonl", d / f"{split}.jsonl", n, margin_of)
    return d


# 4 batches an epoch: step 3 -> 4 crosses an epoch; eval 6 + 6 + 4
BASE_ARGS = dict(max_steps=6, save_steps=3, per_device_train_batch_size=16, per_device_eval_batch_size=6,
                 eval_steps=0, logging_steps=1000, device="cpu")


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_model_dir, data_dir):
    """train_run(fresh=False, **overrides): rm.train on the snapshots (helpers.cached_runner)."""
    return cached_runner(rm, tmp_path_factory, **BASE_ARGS, model_name_or_path=str(toy_model_dir),
                         dataset_name=str(data_dir))


def assert_same_metrics(a: dict, b: dict) -> None:
    """All metrics but the wall-clock one."""
    keys = sorted(k for k in a if not k.startswith("perf/"))
    assert keys == sorted(k for k in b if not k.startswith("perf/"))
    assert [b[k] for k in keys] == [a[k] for k in keys]


def wrap_reward_loss(monkeypatch, edit=lambda call, losses, chosen: losses) -> list:
    """Route rm.reward_loss through `edit` on the training loop's calls (those with gradients); record their margins."""
    calls, real = [], rm.reward_loss

    def wrapped(chosen_rewards, rejected_rewards, margin=None, center_rewards_coef=0.0):
        losses, chosen, rejected = real(chosen_rewards, rejected_rewards, margin, center_rewards_coef)
        if chosen_rewards.requires_grad:  # evaluation runs under no_grad
            calls.append(None if margin is None else margin.tolist())
            losses = edit(len(calls), losses, chosen_rewards)
        return losses, chosen, rejected

    monkeypatch.setattr(rm, "reward_loss", wrapped)
    return calls


# --------------------------------------------------------------------------- 1. where the score is read
TINY = dict(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, num_labels=1)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),  # grouped-query attention, rotary positions
    "qwen2": lambda: Qwen2Config(**TINY),
    # learned positions
    "gpt2": lambda: GPT2Config(vocab_size=37, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=1),
}
# (prompt, chosen, rejected) lengths: rows of different widths, so most are right-padded
LENGTHS = [(1, 1, 5), (4, 3, 1), (2, 6, 2), (7, 2, 3)]


@pytest.fixture(scope="module", params=["toy", *CONFIGS])
def score_model(request, toy_model_dir):
    torch.manual_seed(0)
    if request.param == "toy":
        return AutoModelForSequenceClassification.from_pretrained(toy_model_dir, num_labels=1).eval()
    return AutoModelForSequenceClassification.from_config(CONFIGS[request.param]()).eval()


@pytest.mark.parametrize("pad", ["first id", "last id"])
def test_score_is_read_at_the_last_non_padding_token(score_model, pad):
    """pair_rewards on a right-padded batch gives each row the head's output at its last real token: the same as the
    model on that row alone, unpadded, and as the head applied by hand to the body's last hidden state."""
    vocab = score_model.config.vocab_size
    pad_id = 0 if pad == "first id" else vocab - 1
    score_model.config.pad_token_id = pad_id  # as rm.train sets it
    g = torch.Generator().manual_seed(0)
    ids = lambda n: (torch.randint(vocab - 1, (n,), generator=g) + (pad_id == 0)).tolist()  # noqa: E731  never pad_id
    rows = []
    for i, (p, c, r) in enumerate(LENGTHS):
        prompt = ids(p)
        rows.append({"chosen": prompt + ids(c), "chosen_start": p, "rejected": prompt + ids(r), "rejected_start": p,
                     "index": i})
    batch = rm.collate(rows, pad_id)
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    assert (batch["attention_mask"] == 0).any()  # some rows are padded
    with torch.no_grad():
        chosen, rejected = rm.pair_rewards(score_model, batch)
        alone = torch.cat([score_model(input_ids=torch.tensor([s])).logits[:, 0] for s in seqs])
        by_hand = torch.stack([
            score_model.score(score_model.base_model(input_ids=torch.tensor([s])).last_hidden_state[0, -1])[0]
            for s in seqs])
        first = score_model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        at_position_0 = score_model.score(first.hidden_states[-1][:, 0])[:, 0]
    assert chosen.shape == rejected.shape == (len(rows),) and chosen.dtype == torch.float32
    # float32 through a 2-3 layer body: rounding ~1e-7; reading one position off changes a score by >= 1e-3
    torch.testing.assert_close(torch.cat([chosen, rejected]), alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, by_hand, rtol=0, atol=1e-5)
    assert (torch.cat([chosen, rejected]) - at_position_0).abs().max() > 1e-3  # the check can tell positions apart


def test_tokenizer_without_pad_pads_with_eos(tmp_path, train_run):
    """A tokenizer with no pad token pads with <eos>; the config and the saved tokenizer say so, and the saved model
    scores a padded batch as it scores each row alone. Pad and eos then share an id, so the model's forward counts
    the final <eos> as padding and reads the score one token earlier, in training and in use alike."""
    model_dir = Path(shutil.copytree(TOY / "model", tmp_path / "nopad"))
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    config = json.loads((model_dir / "config.json").read_text())
    config["pad_token_id"] = None
    (model_dir / "config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    out = train_run(fresh=True, model_name_or_path=str(model_dir), max_steps=2, save_steps=0).out
    tokenizer, model = (AutoTokenizer.from_pretrained(out),
                        AutoModelForSequenceClassification.from_pretrained(out).eval())
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == model.config.pad_token_id == eos
    texts = ["<|user|> how was the food ? <|assistant|> great food <|end|>",
             "<|user|> how was the trip ? <|assistant|> <|end|>"]
    with torch.no_grad():
        padded = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits[:, 0] for t in texts])
        ids = tokenizer(texts[0])["input_ids"]
        assert ids[-1] == eos
        body = model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (T, H)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], model.score(body[-2])[0], rtol=0, atol=1e-5)  # the token before <eos>


def test_a_lora_reward_model_loads_with_its_pad_id_here_and_with_transformers(tmp_path, train_run):
    """A LoRA reward model on a base whose config has no pad id (Qwen's and Llama's have none; the tokenizer has one).
    The script's loader rebuilt it from the base's config, so the pad id was lost: a padded batch failed in the model's
    forward, and a pad == eos model was read at the wrong token. And the config.json saved beside the adapter made
    transformers take the directory for a whole model, so from_pretrained failed. Now the loader restores the pad id
    from classifier_config.json, and transformers loads the adapter given the head's size and the pad id, to the same
    scores."""
    model_dir = Path(shutil.copytree(TOY / "model", tmp_path / "nopad_config"))
    config = json.loads((model_dir / "config.json").read_text())
    config["pad_token_id"] = None
    (model_dir / "config.json").write_text(json.dumps(config))
    out = train_run(fresh=True, model_name_or_path=str(model_dir), max_steps=2, save_steps=0, lora_r=8).out
    assert (out / "classifier_config.json").is_file() and not (out / "config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = ["<|user|> how was the food ? <|assistant|> great food <|end|>",
             "<|user|> how was the trip ? <|assistant|> <|end|>"]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    assert inputs["attention_mask"][1].sum() < inputs["attention_mask"].shape[1]  # a padded row
    args = SimpleNamespace(lora_r=0, dtype="float32", attn_implementation=None, gradient_checkpointing=False,
                           fsdp=False)
    ours = rm.unwrap(rm.load_model(str(out), args, CPU, trained=False,
                                   model_class=AutoModelForSequenceClassification))
    assert ours.config.pad_token_id == tokenizer.pad_token_id is not None
    theirs = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1,
                                                                pad_token_id=tokenizer.pad_token_id).eval()
    with torch.no_grad():
        padded = ours(**inputs).logits[:, 0]
        alone = torch.cat([ours(**tokenizer([t], return_tensors="pt")).logits[:, 0] for t in texts])
        torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs(**inputs).logits[:, 0], padded, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 2. data: formats, margins, bad columns
def test_formats_give_identical_sequences(toy_tokenizer, tmp_path):
    """The three formats tokenize to the same scored sequences (only their prompt/response split can differ, which
    a reward model does not use), so they train the same reward model."""
    rows = {}
    for name in ("pairs", "pairs_standard", "pairs_implicit"):
        head(TOY / name / "train.jsonl", tmp_path / f"{name}.jsonl", N_TRAIN)
        data = load_dataset("json", data_files=str(tmp_path / f"{name}.jsonl"), split="train")
        rows[name] = [(r["chosen"], r["rejected"])
                      for r in rm.tokenize_pairs_with_margins(data, toy_tokenizer, 512, 256, name, None)]
    assert len(rows["pairs"]) == N_TRAIN
    assert rows["pairs"] == rows["pairs_standard"] == rows["pairs_implicit"]


P = "<|user|> how was the food ? <|assistant|>"


def test_margins_stay_with_their_rows_when_rows_are_skipped(toy_tokenizer, capsys):
    rows = [
        {"prompt": P, "chosen": " good", "rejected": " bad", "m": 1.5},
        {"prompt": P, "chosen": " good", "rejected": " good", "m": 9.0},  # skipped: chosen equals rejected
        {"prompt": "", "chosen": " good", "rejected": " bad", "m": 8.0},  # skipped: empty prompt
        {"prompt": P, "chosen": " great", "rejected": " awful", "m": -0.25},
        {"prompt": P, "chosen": " food", "rejected": " bad", "m": 2},  # an int is a number too
    ]
    kept = rm.tokenize_pairs_with_margins(rows, toy_tokenizer, 512, 256, "unit", "m")
    assert "unit: 3 pairs kept of 5" in capsys.readouterr().out
    assert [r["margin"] for r in kept] == [1.5, -0.25, 2.0]
    assert [r["index"] for r in kept] == [0, 1, 2]
    assert [r["margin"]
            for r in rm.tokenize_pairs_with_margins(rows, toy_tokenizer, 512, 256, "unit", None)] == [0.0] * 3


@pytest.mark.parametrize("value, match", [
    (None, "no margin column 'm'"),
    ("1.5", "should hold a finite number, got '1.5'"),
    (float("nan"), "should hold a finite number, got nan"),
    (True, "should hold a finite number, got True"),
])
def test_bad_margins_raise(toy_tokenizer, value, match):
    row = {"prompt": P, "chosen": " good", "rejected": " bad"}
    if value is not None:
        row["m"] = value
    with pytest.raises(ValueError, match=match):
        rm.tokenize_pairs_with_margins([row], toy_tokenizer, 512, 256, "unit", "m")


def test_margin_column_reaches_the_loss(train_run, monkeypatch, data_dir):
    """Over one epoch the loop hands reward_loss every train row's margin exactly once; without --margin_column, none.
    The final evaluation uses the test rows' margins too: its loss is the margin loss of the saved model's scores."""
    calls = wrap_reward_loss(monkeypatch)
    with_margin = train_run(fresh=True, margin_column="margin", max_steps=4, save_steps=0)
    assert sorted(m for call in calls for m in call) == sorted(margin_of(i) for i in range(N_TRAIN))
    calls.clear()
    train_run(fresh=True, max_steps=4, save_steps=0)
    assert calls == [None] * 4
    model = AutoModelForSequenceClassification.from_pretrained(with_margin.out).eval()
    tok = AutoTokenizer.from_pretrained(with_margin.out)
    test = load_dataset("json", data_files=str(data_dir / "test.jsonl"), split="train")
    rows = rm.tokenize_pairs_with_margins(test, tok, 512, 256, "test", "margin")
    with torch.no_grad():
        chosen, rejected = rm.pair_rewards(model, rm.collate(rows, tok.pad_token_id))
    margins = torch.tensor([margin_of(i) for i in range(N_TEST)])
    d = (chosen - rejected).double()
    with_m, without_m = (torch.nn.functional.softplus(margins - d).mean().item(),
                         torch.nn.functional.softplus(-d).mean().item())
    assert with_margin.metrics["eval/loss"] == pytest.approx(with_m, rel=1e-5)
    assert with_m > without_m  # the margins (mean 1 > 0) raise every pair's loss: -log s(d - m) > -log s(d)


def test_missing_columns_are_named(train_run, tmp_path, data_dir):
    with pytest.raises(ValueError, match="no margin column 'score'"):
        train_run(fresh=True, margin_column="score", max_steps=1, save_steps=0)
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"]}) + "\n"
                                                  for r in rows))
    with pytest.raises(ValueError, match="no column 'rejected'"):
        train_run(fresh=True, dataset_name=str(tmp_path / "train.jsonl"), eval_holdout=16, max_steps=1, save_steps=0)


# --------------------------------------------------------------------------- 3. training runs
def test_saved_model_loads_and_gives_the_trained_scores(train_run, data_dir, toy_tokenizer, toy_model_dir):
    """The final model and the checkpoint load with AutoModelForSequenceClassification. The final one reproduces the
    run's last evaluation (same scores, so the same means, accuracy and loss), so a later script that loads it by
    path scores exactly what was trained."""
    run = train_run()
    for path in (run.out, run.out / "checkpoint-3"):
        assert json.loads((path / "args.json").read_text()) == asdict(run.args)
        model = AutoModelForSequenceClassification.from_pretrained(path)
        assert model.config.num_labels == 1 and model.config.pad_token_id == toy_tokenizer.pad_token_id
        saved = load_file(path / "model.safetensors")
        assert "score.weight" in saved and all(torch.equal(model.state_dict()[name], w) for name, w in saved.items())
        assert AutoTokenizer.from_pretrained(path)(P)["input_ids"] == toy_tokenizer(P)["input_ids"]
    assert (run.out / "checkpoint-3" / "training_state.pt").exists() and not (run.out / "training_state.pt").exists()
    # the last evaluation by hand: each held-out sequence (ids written out from its text) scored by a plain forward on
    # its own, then the Bradley-Terry loss -log sigmoid(r_w - r_l), the accuracy and the score statistics
    model = AutoModelForSequenceClassification.from_pretrained(run.out).eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for line in (data_dir / "test.jsonl").read_text().splitlines():
            row = json.loads(line)
            for out, key in ((chosen, "chosen"), (rejected, "rejected")):
                ids = sum(toy_chat_ids(row["prompt"][0]["content"], row[key][0]["content"]), [])
                out.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    n, scores = len(chosen), chosen + rejected
    margins = [c - r for c, r in zip(chosen, rejected)]
    assert n == N_TEST and min(abs(x) for x in margins) > 1e-4  # no pair on the fence: the accuracy is exact
    mean = sum(scores) / (2 * n)
    want = {"eval/loss": sum(softplus(-x) for x in margins) / n,
            "eval/rewards/accuracy": sum(x > 0 for x in margins) / n,
            "eval/rewards/chosen": sum(chosen) / n, "eval/rewards/rejected": sum(rejected) / n,
            "eval/rewards/margin": sum(margins) / n, "eval/rewards/mean": mean,
            "eval/rewards/std": math.sqrt(sum((x - mean) ** 2 for x in scores) / (2 * n - 1))}  # unbiased, as torch's
    assert {k: run.metrics[k] for k in want} == pytest.approx(want, rel=1e-5, abs=1e-5)
    before = load_file(toy_model_dir / "model.safetensors")
    after = load_file(run.out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)  # the body trained too


@pytest.mark.parametrize("config", [{}, {"gradient_accumulation_steps": 2}], ids=["plain", "gradient_accumulation"])
def test_resume_replays_the_run_exactly(train_run, monkeypatch, capsys, config):
    full = train_run(**config)
    checkpoint = full.out / "checkpoint-3"
    calls = wrap_reward_loss(monkeypatch)
    resumed = train_run(fresh=True, resume_from=str(checkpoint), **config)
    assert f"resumed from {checkpoint} at step 3" in capsys.readouterr().out
    assert len(calls) == 3 * config.get("gradient_accumulation_steps", 1)  # only steps 4-6 ran
    assert_same_weights(full.out, resumed.out)
    assert_same_metrics(full.metrics, resumed.metrics)


def test_same_seed_same_weights_and_a_seeded_head(train_run, toy_model_dir):
    """The new score head is drawn from the seed: the same seed gives the same run, another seed another head."""
    first, again = train_run(), train_run(fresh=True)
    assert_same_weights(first.out, again.out)
    assert_same_metrics(first.metrics, again.metrics)
    heads = []
    for seed in (1, 1, 2):
        rm.seed_everything(seed)  # what rm.train does before loading
        heads.append(AutoModelForSequenceClassification.from_pretrained(toy_model_dir, num_labels=1).score.weight)
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


@pytest.mark.parametrize("corrupt, bad_call, last_good", [("loss", 5, 3), ("gradient", 5, 3), ("loss", 1, None)])
def test_non_finite_step_stops_and_names_the_last_checkpoint(train_run, monkeypatch, tmp_path, corrupt, bad_call,
                                                             last_good):
    edit = {
        "loss": lambda losses, chosen: losses * float("nan"),
        # finite loss, NaN gradient: d sqrt(u)/du = inf at u = 0, times 0
        "gradient": lambda losses, chosen: losses + 0.0 * torch.sqrt(chosen - chosen.detach()),
    }[corrupt]
    wrap_reward_loss(monkeypatch, lambda call, losses, chosen: edit(losses, chosen) if call == bad_call else losses)
    out = tmp_path / "run"
    message = {"loss": "loss is nan", "gradient": "gradient norm is nan"}[corrupt]
    with pytest.raises(FloatingPointError, match=f"{message} at step {bad_call - 1}") as info:
        train_run(fresh=True, output_dir=str(out))
    assert not (out / "model.safetensors").exists()
    if last_good is None:
        assert "none saved" in str(info.value)
        return
    checkpoint = out / f"checkpoint-{last_good}"
    assert str(checkpoint) in str(info.value)
    assert_same_weights(checkpoint, train_run().out / f"checkpoint-{last_good}")  # the healthy run's


def test_resume_from_a_final_model_says_what_it_needs(train_run):
    with pytest.raises(ValueError, match="checkpoint directory written with --save_steps"):
        train_run(fresh=True, resume_from=str(train_run().out))


def test_metrics_are_named_and_consistent(train_run):
    m = train_run().metrics
    for split in ("train", "eval"):
        for key in ("loss", "rewards/accuracy", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/mean",
                    "rewards/std"):
            assert math.isfinite(m[f"{split}/{key}"]), f"{split}/{key}"
    assert m["eval/rewards/margin"] == pytest.approx(m["eval/rewards/chosen"] - m["eval/rewards/rejected"], abs=1e-6)
    assert m["eval/rewards/mean"] == pytest.approx((m["eval/rewards/chosen"] + m["eval/rewards/rejected"]) / 2,
                                                   abs=1e-6)
    # a fraction of the 16 held-out pairs
    assert m["eval/rewards/accuracy"] * N_TEST == round(m["eval/rewards/accuracy"] * N_TEST)
    assert {"train/lr", "train/grad_norm", "perf/tokens_per_sec", "train/epoch"} <= m.keys()


# --------------------------------------------------------------------------- 4. the command line
@pytest.mark.slow  # starts a process: `python reward_model.py --help`
def test_help_works_and_import_is_silent():
    """`python reward_model.py --help` imports the script (as __main__) and then prints tyro's help, so anything the
    import printed would come before "usage:" or on stderr. One subprocess instead of two: each pays for importing
    torch and transformers."""
    result = python("reward_model.py", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: reward_model.py")
    assert "--margin_column" in result.stdout and "--center_rewards_coef" in result.stdout
