"""The machinery of dpo.py: batched log-probs, tokenization, the three data formats, bad inputs, and what the
training loop promises about saving, resuming, non-finite steps and determinism. (The loss math has its own tests:
test_dpo_loss.py, test_dpo_optimum.py.)

Everything runs on CPU. The toy world is copied once per module, since toy_world/ may be regenerated while the tests
run, and no test depends on what its model outputs: every expected value is computed here from the same model,
tokenizer or data.
"""

import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
import wandb
from datasets import Dataset, load_dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import dpo
import grpo
from helpers import (
    CONFIGS,
    N_TRAIN,
    SHORT_RUN,
    TOY,
    assert_same_weights,
    cached_runner,
    head,
    python,
    wandb_offline_log,
)

FORMATS = ("pairs", "pairs_standard", "pairs_implicit")  # conversational, standard, implicit prompt (hh-rlhf)


# --------------------------------------------------------------------------- shared fixtures (data_dir: conftest.py)
BASE_ARGS = SHORT_RUN


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_model_dir, data_dir):
    """train_run(fresh=False, **overrides): dpo.train on the snapshots (helpers.cached_runner)."""
    return cached_runner(dpo, tmp_path_factory, **BASE_ARGS, model_name_or_path=str(toy_model_dir),
                         dataset_name=str(data_dir))


def assert_same_metrics(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    """All metrics but the wall-clock one."""
    keys = sorted(k for k in a if not k.startswith("perf/"))
    assert keys == sorted(k for k in b if not k.startswith("perf/"))
    assert [b[k] for k in keys] == pytest.approx([a[k] for k in keys], rel=rtol, abs=atol)


def wrap_dpo_loss(monkeypatch, edit=lambda call, losses, policy_chosen_logps: losses) -> list:
    """Route dpo.dpo_loss through `edit` on the training loop's calls (those with gradients), and count them."""
    calls, real = [], dpo.dpo_loss

    def wrapped(policy_chosen_logps, *args, **kwargs):
        losses, chosen_rewards, rejected_rewards = real(policy_chosen_logps, *args, **kwargs)
        if policy_chosen_logps.requires_grad:  # evaluation runs under no_grad
            calls.append(len(calls) + 1)
            losses = edit(len(calls), losses, policy_chosen_logps)
        return losses, chosen_rewards, rejected_rewards

    monkeypatch.setattr(dpo, "dpo_loss", wrapped)
    return calls


# --------------------------------------------------------------------------- 1. batched log-probs
@pytest.fixture(scope="module", params=["toy", "llama", "gemma2", "granite", "cohere"])
def logp_model(request, toy_model_dir):
    if request.param == "toy":
        return AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()


# (prompt, chosen, rejected) lengths: one-token prompts and responses, and rows of different widths (right padding)
LENGTHS = [(1, 1, 5), (4, 3, 1), (2, 6, 2), (7, 2, 3)]


def random_rows(vocab_size: int) -> list[dict]:
    """Rows as dpo.tokenize_pairs makes them, with random token ids."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(vocab_size, (n,), generator=g).tolist()  # noqa: E731
    rows = []
    for i, (p, c, r) in enumerate(LENGTHS):
        prompt = ids(p)
        rows.append({"chosen": prompt + ids(c), "chosen_start": p, "rejected": prompt + ids(r), "rejected_start": p,
                     "index": i})
    return rows


def unbatched_logp(model, seq: list[int], start: int) -> torch.Tensor:
    """log pi(seq[start:] | seq[:start]) from the full logits of the unpadded sequence alone."""
    logps = model(input_ids=torch.tensor([seq])).logits[0].float().log_softmax(-1)  # (T, V)
    return sum(logps[t - 1, seq[t]] for t in range(start, len(seq)))


@pytest.mark.parametrize("pad", ["first id", "last id"])
def test_batched_logps_match_unbatched(logp_model, pad):
    rows = random_rows(logp_model.config.vocab_size)
    batch = dpo.collate(rows, 0 if pad == "first id" else logp_model.config.vocab_size - 1)
    seqs = [(r["chosen"], r["chosen_start"]) for r in rows] + [(r["rejected"], r["rejected_start"]) for r in rows]
    assert (batch["attention_mask"] == 0).sum(-1).tolist() == [batch["input_ids"].shape[1] - len(s) for s, _ in seqs]
    with torch.no_grad():
        sums, counts = dpo.sequence_logps(logp_model, batch["input_ids"], batch["attention_mask"], batch["targets"])
        chosen, rejected = dpo.pair_logps(logp_model, batch)
        expected = torch.stack([unbatched_logp(logp_model, s, start) for s, start in seqs])
    # float32 sums of <= 7 terms of size <= ~5: rounding is ~1e-6; a prompt or padding token counted is >= 1e-2
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat([chosen, rejected]), expected, rtol=0, atol=1e-5)
    assert counts.tolist() == [len(s) - start for s, start in seqs]


def test_a_pair_of_equal_answers_has_h_exactly_0_and_no_gradient(logp_model):
    """Online DPO samples pairs of two equal answers. Their log-probs, from two rows of one batch, may differ in the
    last bits (chunking, row position); pair_logps gives both the same number, so h is 0, not rounding noise, and the
    pair gives no gradient. A pair that differs keeps its two numbers."""
    rows = random_rows(logp_model.config.vocab_size)
    rows[0] = {**rows[0], "rejected": rows[0]["chosen"], "rejected_start": rows[0]["chosen_start"]}
    batch = dpo.collate(rows, 0)
    chosen, rejected = dpo.pair_logps(logp_model, batch)
    losses, _, _ = dpo.dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.5)
    assert chosen[0].item() == rejected[0].item() and (chosen[1:] != rejected[1:]).all()
    logp_model.zero_grad()
    losses[0].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in logp_model.parameters())


# --------------------------------------------------------------------------- 2. the prompt/response boundary
@pytest.fixture(scope="module", params=[False, True], ids=["no-bos", "bos"])
def bpe_tokenizer(request):
    """A character-level BPE with one merge, a + b -> ab, which straddles the boundary when a prompt ends with a
    and its response starts with b; optionally with a post-processor that adds <s>."""
    vocab = {"<eos>": 0, "<s>": 1, "a": 2, "b": 3, "x": 4, "y": 5, "ab": 6}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.add_special_tokens(["<eos>", "<s>"])
    if request.param:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return SimpleNamespace(tok=PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<s>"),
                           adds_bos=request.param)


@pytest.mark.parametrize("templated", [False, True], ids=["text", "templated"])
@pytest.mark.parametrize("prompt, response, response_tokens", [
    ("xa", "by", ["ab", "y", "<eos>"]),  # the merged token is scored as a response token
    ("xa", "ay", ["a", "y", "<eos>"]),  # no merge: the boundary stays where the text puts it
    ("xy", "ab", ["ab", "<eos>"]),
    ("xa", "b<eos>", ["ab", "<eos>"]),  # the text already ends with eos: not appended twice
])
def test_tokenize_response_boundary(bpe_tokenizer, prompt, response, response_tokens, templated):
    tok = bpe_tokenizer.tok
    special = not templated  # a chat template writes its own bos
    prompt_ids, response_ids = dpo.tokenize_response(tok, prompt, response, templated)
    joint = tok(prompt + response, add_special_tokens=special)["input_ids"]
    assert prompt_ids + response_ids == joint + ([] if joint[-1] == tok.eos_token_id else [tok.eos_token_id])
    assert tok.convert_ids_to_tokens(response_ids) == response_tokens
    assert prompt_ids == tok(prompt, add_special_tokens=special)["input_ids"][: len(prompt_ids)]
    assert (prompt_ids[0] == tok.bos_token_id) == (bpe_tokenizer.adds_bos and special)


def test_text_that_writes_its_bos_gets_no_second_one(bpe_tokenizer):
    """A text column may hold a prompt a chat template rendered, bos included. A tokenizer that adds bos (Llama's,
    Gemma's) put a second one before it. Now such text keeps the one it writes, as a templated prompt does, in the
    pairs and in the samplers' prompts (grpo.py's copy of tokenize_prompts, as in ppo_rlhf.py and online_dpo.py)."""
    tok = bpe_tokenizer.tok
    prompt_ids, response_ids = dpo.tokenize_response(tok, "<s>xa", "y", templated=False)
    assert tok.convert_ids_to_tokens(prompt_ids) == ["<s>", "x", "a"]
    assert (prompt_ids, response_ids) == dpo.tokenize_response(tok, "<s>xa", "y", templated=True)
    prompts = grpo.tokenize_prompts(Dataset.from_dict({"prompt": ["<s>xa", "xa"]}), tok, 16, "train")
    assert [tok.convert_ids_to_tokens(ids) for ids in prompts] == [
        ["<s>", "x", "a"], ["<s>", "x", "a"] if bpe_tokenizer.adds_bos else ["x", "a"]]


def test_template_layout_after_the_turn_end_is_not_scored():
    """A chat template that writes a newline after the turn's end token (Qwen: "<|im_end|>\\n") gives a response that
    ends with that token, once: not "<eos>\\n<eos>", which would put the last scored token (and a reward model's
    score) where generation never stops."""
    vocab = {"<eos>": 0, "u": 1, "a": 2, "x": 3, "y": 4, "\n": 5}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[])), eos_token="<eos>")
    tok._tokenizer.add_special_tokens(["<eos>"])
    tok.chat_template = ("{% for m in messages %}{{ 'u' if m['role'] == 'user' else 'a' }}{{ m['content'] }}<eos>\n"
                         "{% endfor %}{% if add_generation_prompt %}a{% endif %}")
    row = {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": "y"}],
           "rejected": [{"role": "assistant", "content": "yy"}]}
    prompt, chosen, rejected, templated = dpo.row_texts(row, 0, tok)
    assert (prompt, chosen, rejected, templated) == ("ux<eos>\na", "y<eos>", "yy<eos>", True)
    _, response_ids = dpo.tokenize_response(tok, prompt, chosen, templated)
    assert tok.convert_ids_to_tokens(response_ids) == ["y", "<eos>"]


# --------------------------------------------------------------------------- 3. the three formats
@pytest.fixture(scope="module")
def format_rows(tmp_path_factory) -> dict:
    """The first 64 train pairs of the toy world in each format, loaded with datasets as dpo.train loads them."""
    d = tmp_path_factory.mktemp("formats")
    for name in FORMATS:
        head(TOY / name / "train.jsonl", d / f"{name}.jsonl", N_TRAIN)
    return {name: load_dataset("json", data_files=str(d / f"{name}.jsonl"), split="train") for name in FORMATS}


def test_formats_give_identical_token_ids(format_rows, toy_tokenizer, toy_model_dir):
    standard = format_rows["pairs_standard"]
    assert [r["prompt"] + r["chosen"] for r in standard] == format_rows["pairs_implicit"]["chosen"]  # the same pairs
    # empty answers are left to test_empty_answer_is_handled_alike_in_every_format
    keep = [i for i, r in enumerate(standard) if r["chosen"].strip() and r["rejected"].strip()]
    conv, std, imp = (dpo.tokenize_pairs(format_rows[n].select(keep), toy_tokenizer, 512, 256, n) for n in FORMATS)
    assert len(keep) == len(conv) == len(std) == len(imp) > N_TRAIN // 2
    assert conv == std
    # The implicit prompt is the longest shared prefix backed up to a space, so it can swallow leading response
    # words that chosen and rejected share. The sequences are the same, and the moved tokens, scored in both
    # responses under the same context, cancel in h, so the DPO loss is unchanged.
    for s, i in zip(std, imp):
        assert (i["chosen"], i["rejected"]) == (s["chosen"], s["rejected"])
        a, b = s["chosen_start"], i["chosen_start"]
        assert a == s["rejected_start"] <= b == i["rejected_start"] and i["chosen"][a:b] == i["rejected"][a:b]
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    with torch.no_grad():
        (sc, sr), (ic, ir) = (dpo.pair_logps(model, dpo.collate(rows, toy_tokenizer.pad_token_id))
                              for rows in (std, imp))
    torch.testing.assert_close(sc - sr, ic - ir, rtol=0, atol=1e-5)


def test_empty_answer_is_handled_alike_in_every_format(toy_tokenizer):
    question = [{"role": "user", "content": "how was the food ?"}]
    chat = toy_tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True)
    answers = [("great food", "bad"), ("good", "")]  # the second pair's rejected answer is empty
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = {  # as make_toy_world.py writes them
        "pairs": [{"prompt": question, "chosen": reply(c), "rejected": reply(r)} for c, r in answers],
        "pairs_standard": [{"prompt": chat, "chosen": " " + c, "rejected": " " + r} for c, r in answers],
        "pairs_implicit": [{"chosen": chat + " " + c, "rejected": chat + " " + r} for c, r in answers],
    }
    conv, std, imp = (dpo.tokenize_pairs(rows[n], toy_tokenizer, 512, 256, n) for n in FORMATS)
    assert conv == std == imp


HH = "\n\nHuman: hi\n\nAssistant:"
USER, USER2 = {"role": "user", "content": "hi"}, {"role": "user", "content": "and?"}
LIKE, HATE, OK = ({"role": "assistant", "content": t} for t in ("I like it", "I hate it", "ok"))


@pytest.mark.parametrize("chosen, rejected, expected", [
    (HH + " I like it", HH + " I hate it", (HH + " I", " like it", " hate it")),  # backs up to a word boundary
    (HH + " yes", HH + " yes please", (HH, " yes", " yes please")),  # one response is a prefix of the other
    # issue 17, defect 9: a newline is a word boundary too (backing up to a space split after "H:"), and a response
    # begins with all the whitespace before its first word, as " like it" does above
    ("H: hi\nA:\nYes", "H: hi\nA:\nNo", ("H: hi\nA:", "\nYes", "\nNo")),
    (HH + "\n\tYes", HH + "\n\tNo", (HH, "\n\tYes", "\n\tNo")),
    ([USER, LIKE], [USER, HATE], ([USER], [LIKE], [HATE])),
    ([USER, OK, USER2, LIKE], [USER, OK, USER2, HATE], ([USER, OK, USER2], [LIKE], [HATE])),
    ([USER, LIKE], [USER, LIKE], ([USER], [LIKE], [LIKE])),  # the last message always stays a response
], ids=["text", "text-prefix", "newline", "whitespace-run", "messages", "multi-turn", "identical"])
def test_split_implicit_prompt(chosen, rejected, expected):
    assert dpo.split_implicit_prompt(chosen, rejected) == expected


# --------------------------------------------------------------------------- 4. bad inputs
@pytest.mark.parametrize("columns, missing", [(("prompt", "chosen"), "rejected"), (("prompt", "rejected"), "chosen")])
def test_missing_column_is_named(columns, missing):
    data = Dataset.from_dict({c: ["x"] for c in columns})
    with pytest.raises(ValueError, match=f"no column '{missing}'") as info:
        dpo.check_columns(data, "my/data")
    assert "my/data" in str(info.value) and dpo.FORMATS in str(info.value)
    dpo.check_columns(Dataset.from_dict({"chosen": ["a"], "rejected": ["b"]}), "implicit prompt")  # accepted


MESSAGES = [{"role": "user", "content": "how was the food ?"}]
P = "<|user|> how was the food ? <|assistant|>"  # 7 toy tokens


@pytest.mark.parametrize("row, match", [
    ({"prompt": P, "chosen": 3, "rejected": " bad"}, "column 'chosen' should be a string"),
    ({"prompt": MESSAGES, "chosen": " good", "rejected": " bad"}, "column 'prompt' should be a string"),
    ({"prompt": P, "chosen": " good", "rejected": MESSAGES}, "column 'rejected' should be a string"),
    ({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": " bad"}, "column 'rejected' should be a list of"),
    ({"chosen": 1, "rejected": 2}, "column 'chosen' should be a string"),
    ({"prompt": "", "chosen": " good", "rejected": " bad"}, "no usable pairs"),
])
def test_bad_rows_raise(toy_tokenizer, row, match):
    with pytest.raises(ValueError, match=match):
        dpo.tokenize_pairs([row], toy_tokenizer, 10, 4, "unit")


def test_skipped_rows_are_counted_and_long_rows_truncated(toy_tokenizer, capsys):
    long = " very good food film the trip was"  # 7 tokens; a truncated row keeps 4 of the prompt, 6 of a response
    rows = [
        {"prompt": P, "chosen": " good", "rejected": " bad"},  # 9 tokens: fits, the whole prompt is kept
        {"prompt": P, "chosen": long, "rejected": " bad"},  # too long: prompt keeps its end, responses their start
        {"prompt": "", "chosen": " good", "rejected": " bad"},
        {"prompt": P, "chosen": " good", "rejected": " good"},
        {"prompt": P, "chosen": long + " good", "rejected": long + " bad"},  # differ only past max_length
    ]
    kept = dpo.tokenize_pairs(rows, toy_tokenizer, 10, 4, "unit")
    report = capsys.readouterr().out
    assert "unit: 2 pairs kept of 5" in report
    for reason in ("empty prompt or response: 1", "chosen equals rejected: 1",
                   "identical once tokenized or truncated: 1"):
        assert reason in report
    ids = lambda text: toy_tokenizer(text)["input_ids"]  # noqa: E731
    prompt, end, eos = ids(P), ids(P)[-4:], [toy_tokenizer.eos_token_id]
    assert kept == [
        {"chosen": prompt + ids(" good") + eos, "chosen_start": len(prompt),
         "rejected": prompt + ids(" bad") + eos, "rejected_start": len(prompt), "index": 0, "row": 0},
        {"chosen": end + ids(long)[:6], "chosen_start": 4, "rejected": end + ids(" bad") + eos, "rejected_start": 4,
         "index": 1, "row": 1},
    ]


@pytest.mark.parametrize("max_prompt_length", [256, 300])
def test_prompt_must_leave_room_for_a_response(max_prompt_length):
    with pytest.raises(ValueError, match="max_prompt_length"):
        dpo.train(dpo.Args(max_length=256, max_prompt_length=max_prompt_length, device="cpu"))


# --------------------------------------------------------------------------- 5. training runs
def test_saved_model_loads(train_run, toy_model_dir, toy_tokenizer):
    run = train_run()
    for path in (run.out, run.out / "checkpoint-3"):
        assert json.loads((path / "args.json").read_text()) == asdict(run.args)
        model = AutoModelForCausalLM.from_pretrained(path)
        saved = load_file(path / "model.safetensors")
        assert all(torch.equal(model.state_dict()[name], w) for name, w in saved.items())
        text = P + " great food"
        assert AutoTokenizer.from_pretrained(path)(text)["input_ids"] == toy_tokenizer(text)["input_ids"]
    assert (run.out / "checkpoint-3" / "training_state.pt").exists() and not (run.out / "training_state.pt").exists()
    before, after = load_file(toy_model_dir / "model.safetensors"), load_file(run.out / "model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)  # it trained


@pytest.mark.parametrize("config", [{}, {"precompute_ref_logps": True}, {"gradient_accumulation_steps": 2}],
                         ids=["plain", "precompute_ref_logps", "gradient_accumulation"])
def test_resume_replays_the_run_exactly(train_run, monkeypatch, capsys, config):
    full = train_run(**config)
    checkpoint = full.out / "checkpoint-3"
    calls = wrap_dpo_loss(monkeypatch)
    monkeypatch.setattr(dpo, "precompute_ref_logps",
                        lambda *a, **k: pytest.fail("resuming recomputed the reference log-probs"))
    resumed = train_run(fresh=True, resume_from=str(checkpoint), **config)
    assert f"resumed from {checkpoint} at step 3" in capsys.readouterr().out
    assert len(calls) == 3 * config.get("gradient_accumulation_steps", 1)  # only steps 4-6 ran
    assert_same_weights(full.out, resumed.out)
    assert_same_metrics(full.metrics, resumed.metrics)


def test_resuming_on_other_rows_with_saved_reference_log_probs_is_refused(train_run, capsys):
    """A checkpoint's reference log-probs are looked up by row. A run resumed on other rows (the same data cut to
    another --max_length here; another dataset or a held-out split under another --seed alike) gave each row another
    row's values, without a word. It is refused. The same rows resume (test_resume_replays_the_run_exactly)."""
    checkpoint = train_run(precompute_ref_logps=True).out / "checkpoint-3"
    with pytest.raises(dpo.UsageError, match="reference log-probs are of other rows than this run's"):
        train_run(fresh=True, precompute_ref_logps=True, resume_from=str(checkpoint), max_length=6, max_prompt_length=3)
    out = capsys.readouterr().out
    assert "truncated to 6 tokens" in out and " 0 truncated to 6 tokens" not in out  # the rows did change


@pytest.mark.parametrize("corrupt, bad_call, last_good", [("loss", 5, 3), ("gradient", 5, 3), ("loss", 1, None)])
def test_non_finite_step_stops_and_names_the_last_checkpoint(train_run, monkeypatch, tmp_path, corrupt, bad_call,
                                                             last_good):
    edit = {
        "loss": lambda losses, logps: losses * float("nan"),
        # finite loss, NaN gradient: d sqrt(u)/du = inf at u = 0, times 0
        "gradient": lambda losses, logps: losses + 0.0 * torch.sqrt(logps - logps.detach()),
    }[corrupt]
    wrap_dpo_loss(monkeypatch, lambda call, losses, logps: edit(losses, logps) if call == bad_call else losses)
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
    AutoModelForCausalLM.from_pretrained(checkpoint)
    assert_same_weights(checkpoint, train_run().out / f"checkpoint-{last_good}")  # the healthy run's


def test_precomputed_reference_matches_live(train_run):
    live, pre = train_run(), train_run(precompute_ref_logps=True)
    assert abs(live.metrics["train/rewards/margin"]) > 1e-3  # the policy has moved away from the reference
    # the reference log-probs of a pair differ only by float32 rounding (other batch, other padding)
    assert_same_metrics(live.metrics, pre.metrics, rtol=1e-4, atol=1e-6)
    assert_same_weights(live.out, pre.out, atol=1e-5)


@pytest.mark.parametrize("change", [{}, {"gradient_checkpointing": True}], ids=["same", "gradient_checkpointing"])
def test_same_seed_same_weights(train_run, change):
    first, again = train_run(), train_run(fresh=True, **change)
    assert_same_weights(first.out, again.out)
    assert_same_metrics(first.metrics, again.metrics)


@pytest.mark.parametrize("holdout", [6, 0])  # 6: a tenth of the 64 rows, the most a dataset this small gives
def test_single_file_holds_out_eval_rows(train_run, data_dir, capsys, holdout):
    run = train_run(dataset_name=str(data_dir / "train.jsonl"), eval_holdout=holdout, max_steps=1, save_steps=0)
    report = capsys.readouterr().out
    assert f"train: {N_TRAIN - holdout} pairs kept of {N_TRAIN - holdout}" in report
    assert ("eval: 6 pairs kept of 6" in report) == any(k.startswith("eval/") for k in run.metrics) == (holdout > 0)


def test_holdout_is_a_seeded_partition(data_dir):
    path = data_dir / "train.jsonl"
    key = lambda data: sorted(json.dumps(r, sort_keys=True) for r in data)  # noqa: E731
    train, held = dpo.load_splits(str(path), None, "train", "test", 6, 1)
    assert len(held) == 6
    assert key(list(train) + list(held)) == key(json.loads(line) for line in path.read_text().splitlines())
    assert key(held) == key(dpo.load_splits(str(path), None, "train", "test", 6, 1)[1])
    assert key(held) != key(dpo.load_splits(str(path), None, "train", "test", 6, 2)[1])


def test_accumulation_longer_than_an_epoch_fails_clearly(train_run):
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        train_run(fresh=True, per_device_train_batch_size=32, gradient_accumulation_steps=4, max_steps=1, save_steps=0)


# --------------------------------------------------------------------------- 6. the command line
@pytest.mark.slow  # starts a process: `python dpo.py --help`
def test_help_lists_the_method_flags():
    result = python("dpo.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "--beta" in result.stdout and "--label_smoothing" in result.stdout


@pytest.mark.slow  # starts a process: `python -c 'import dpo'`
def test_import_is_silent():
    result = python("-c", "import dpo")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.slow  # starts a process: wandb.init launches the wandb-core service
def test_track_logs_every_step_to_wandb_offline(train_run, tmp_path, monkeypatch):
    """--track with WANDB_MODE=offline writes a local run holding the logged metrics, and needs no network."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # wandb keeps the settings of an earlier run in this process (its directory included)
    train_run(fresh=True, track=True, max_steps=2, save_steps=0)
    wandb_offline_log(tmp_path, ("train/loss", "train/rewards/margin", "train/rewards/accuracy", "perf/tokens_per_sec",
                                 "beta"))


def test_resume_from_a_final_model_says_what_it_needs(train_run):
    """A final output_dir has no optimizer state: resuming from it must say so, not fail deep inside torch.load."""
    final = train_run().out
    with pytest.raises(ValueError, match="checkpoint directory written with --save_steps"):
        train_run(fresh=True, resume_from=str(final))
