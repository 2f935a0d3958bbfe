"""SPIN scores the real answer and its generated rival after one and the same prompt (issue 17, defect 4).

The loss compares log pi(y|x) with log pi(y'|x) for y' ~ pi_t(.|x); if y' is sampled after other prompt tokens than
the ones y is scored after, the loss mixes two conditionals and p_data is no longer its fixed point. Both cases the
issue found are here: a prompt longer than max_prompt_length in a row that fits in max_length (generation used to
cut it, the real answer did not), and a token that merges across the prompt/answer boundary (generation used the
prompt's own tokens, the real answer the tokens before the merge).
"""

import json

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import spin


def pairs_of(rows: list[dict], tmp_path, model, tokenizer, **args) -> list[dict]:
    """spin.py's own loading and self-play generation of `rows`, as a train split with no evaluation."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = spin.Args(dataset_name=str(data), eval_holdout=0, device="cpu", **args)
    train_rows, _ = spin.load_sft(args, tokenizer)
    runtime = spin.Runtime(0, 1, torch.device("cpu"), bf16=False)
    pad_id = tokenizer.pad_token_id
    return spin.self_play_pairs(spin.Forward(model), train_rows, tokenizer, pad_id, args, 0, "train", runtime)[0]


def contexts(pair: dict) -> tuple[list[int], list[int]]:
    """(the tokens the real answer is scored after, the tokens the generated one is)."""
    return pair["chosen"][: pair["chosen_start"]], pair["rejected"][: pair["rejected_start"]]


def test_a_long_prompt_in_a_short_row_is_one_context(toy_model_dir, toy_tokenizer, tmp_path):
    """The issue's example: the toy tokenizer, max_prompt_length 4, max_length 64 and a two-question prompt of 10
    tokens. The row (10 + 3 tokens, or 10 + at most 5 generated) fits in 64, so neither answer's prompt is cut: both
    sit on `how was the food ? how was the film ?` (the generated one used to sit on `was the film ?`)."""
    prompt = "how was the food ? how was the film ?"
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    pairs = pairs_of([{"prompt": prompt, "completion": " good film"}] * 4, tmp_path, model, toy_tokenizer,
                     max_prompt_length=4, max_length=64)
    for pair in pairs:
        real, generated = contexts(pair)
        assert real == generated == toy_tokenizer(prompt)["input_ids"], (real, generated)


def test_a_cut_prompt_is_cut_alike_for_both_answers(toy_model_dir, toy_tokenizer, tmp_path):
    """A row too long for max_length 12 keeps the last max_prompt_length = 4 prompt tokens, for both answers."""
    prompt = "how was the food ? how was the film ?"
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    pairs = pairs_of([{"prompt": prompt, "completion": " good film"}] * 2, tmp_path, model, toy_tokenizer,
                     max_prompt_length=4, max_length=12)
    for pair in pairs:
        real, generated = contexts(pair)
        assert real == generated == toy_tokenizer("was the film ?")["input_ids"], (real, generated)
        assert len(pair["chosen"]) <= 12 and len(pair["rejected"]) <= 12


def test_a_token_merged_across_the_boundary_is_one_context(tmp_path):
    """A BPE tokenizer that merges `a` + `b` into `ab`: the prompt `xa` alone is [x, a], but the prompt and the answer
    `b` are [x, ab], so the real answer is `ab <eos>` after [x] (as in TRL). The generation starts after [x] too (it
    used to start after [x, a])."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "x": 3, "a": 4, "b": 5, "ab": 6}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    assert tokenizer("xa")["input_ids"] == [3, 4] and tokenizer("xab")["input_ids"] == [3, 6]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=None))
    pairs = pairs_of([{"prompt": "xa", "completion": "b"}] * 2, tmp_path, model, tokenizer, max_new_tokens=3)
    for pair in pairs:
        real, generated = contexts(pair)
        assert real == generated == [3], (real, generated)
        assert pair["chosen"] == [3, 6, 1]


def test_a_generation_after_a_cut_prompt_must_fit_in_max_length():
    """A cut prompt keeps max_prompt_length tokens, and the generation after it may take max_new_tokens: their sum
    must fit in max_length, or the generated sequence would be longer than every real one may be."""
    spin.Args(max_length=9, max_prompt_length=4, max_new_tokens=5)
    with pytest.raises(ValueError, match=r"max_prompt_length \(4\) \+ max_new_tokens \(6\) must not exceed"):
        spin.Args(max_length=9, max_prompt_length=4, max_new_tokens=6)


@pytest.mark.parametrize("flags", [dict(temperature=0.0), dict(temperature=-1.0), dict(max_new_tokens=0)])
def test_sampling_flags_that_cannot_sample_are_refused(flags):
    """--temperature 0 divided the logits by 0: every generation came out as one token repeated, trained on without a
    word; --max_new_tokens 0 failed inside generation with an IndexError. Both now stop the run, naming the flags."""
    with pytest.raises(spin.UsageError, match="temperature must be > 0 and max_new_tokens >= 1"):
        spin.Args(**flags)
