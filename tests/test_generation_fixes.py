"""Generation in ppo_rlhf.py and spin.py (issue 17): it stops at every id that ends the model's turn, not only the
tokenizer's eos (defect 7); it calls the model the way current transformers supports, with no deprecation warning
(defect 12); and its inverse-CDF sampler keeps rare tokens' probabilities to float64 precision (defect 13).

The turn-end tests build their own tiny chat model: a word-level tokenizer whose eos is <eos> (id 1), and a Llama
whose generation_config lists <end_of_turn> (id 2) beside it, as Gemma, Qwen and Phi list their turn ends. Its weights
make the final hidden state the same at every position, and its LM head gives <end_of_turn> a logit of 30 and every
other token 0, so it answers <end_of_turn> at once (every other token has probability e^-30 = 9e-14).
"""

import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import ppo_rlhf as ppo
import spin

EOS, END_OF_TURN = 1, 2
VOCAB = ["<pad>", "<eos>", "<end_of_turn>", "<unk>", "how", "are", "you", "?", "fine"]
PROMPT = "how are you ?"


@pytest.fixture(scope="module")
def turn_end_dirs(tmp_path_factory) -> SimpleNamespace:
    """The chat model and its tokenizer, a reward model with a random head on the same tokenizer, and prompt and SFT
    data (the one prompt, 8 times), each in a directory of its own."""
    base = tmp_path_factory.mktemp("turn_end")
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    sizes = dict(vocab_size=len(VOCAB), hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=EOS, bos_token_id=None)
    config = LlamaConfig(**sizes, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # every position's final hidden state is RMSNorm(ones) = ones: logits are lm_head's row sums
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[END_OF_TURN] = 30.0 / config.hidden_size
    model.generation_config.eos_token_id = [EOS, END_OF_TURN]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(base / "model")
    tokenizer.save_pretrained(base / "model")
    rm = LlamaForSequenceClassification(LlamaConfig(**sizes, num_labels=1))
    rm.save_pretrained(base / "rm")
    tokenizer.save_pretrained(base / "rm")
    for name, row in (("prompts", {"prompt": PROMPT}), ("sft", {"prompt": PROMPT, "completion": " fine"})):
        (base / name).mkdir()
        for split in ("train", "test"):
            (base / name / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for _ in range(8)))
    return SimpleNamespace(model=base / "model", rm=base / "rm", prompts=base / "prompts", sft=base / "sft",
                           tokenizer=tokenizer)


# --------------------------------------------------------------------------- defect 7: every turn-end id stops
def test_the_turn_end_model_is_what_the_tests_assume(turn_end_dirs):
    model = AutoModelForCausalLM.from_pretrained(turn_end_dirs.model).eval()
    ids = turn_end_dirs.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        p = model(input_ids=torch.tensor([ids])).logits[0, -1].double().softmax(-1)
    assert turn_end_dirs.tokenizer.eos_token_id == EOS and model.generation_config.eos_token_id == [EOS, END_OF_TURN]
    assert p[END_OF_TURN] > 1 - 1e-12


@pytest.mark.parametrize("script", [ppo, spin])
def test_eos_token_ids_read_the_generation_config(turn_end_dirs, script):
    """The tokenizer's eos and every id in generation_config.eos_token_id, which may also be an int or missing."""
    model = AutoModelForCausalLM.from_pretrained(turn_end_dirs.model)
    assert script.eos_token_ids(script.Forward(model), turn_end_dirs.tokenizer) == [EOS, END_OF_TURN]
    for listed, want in ((END_OF_TURN, [EOS, END_OF_TURN]), (None, [EOS]), ([EOS], [EOS])):
        model.generation_config.eos_token_id = listed
        assert script.eos_token_ids(script.Forward(model), turn_end_dirs.tokenizer) == want


@pytest.mark.parametrize("script", [ppo, spin])
def test_eos_token_ids_add_the_turn_end_of_the_chat_template(turn_end_dirs, script):
    """A model whose generation_config lists no turn end (a base model's SFT copy with a chat template whose answers
    end with a special token that is not eos, as ChatML's <|im_end|> is not Qwen base's eos) ran its generations past
    the answer's end into turns it invented. The token the template closes an answer with now ends a response too."""
    tokenizer = AutoTokenizer.from_pretrained(turn_end_dirs.model)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} <end_of_turn>\n{% endfor %}"
    assert tokenizer.convert_tokens_to_ids("<end_of_turn>") == END_OF_TURN
    model = AutoModelForCausalLM.from_pretrained(turn_end_dirs.model)
    model.generation_config.eos_token_id = None
    assert script.eos_token_ids(script.Forward(model), tokenizer) == [EOS, END_OF_TURN]
    assert script.eos_token_ids(script.Forward(model), turn_end_dirs.tokenizer) == [EOS]  # no template, no turn end


def test_truncation_treats_every_eos_id_as_the_end():
    sampled = torch.tensor([[5, 2, 6, 1], [5, 6, 1, 2], [5, 6, 7, 8], [2, 1, 2, 1]])
    responses, mask, has_eos = ppo.truncate_after_eos(sampled, [EOS, END_OF_TURN], 0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert responses.tolist() == [[5, 2, 0, 0], [5, 6, 1, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, False, True]


def test_generation_stops_at_a_turn_end_id(turn_end_dirs):
    """Both rows answer <end_of_turn> at once: generation stops after one token, not at max_new_tokens."""
    model = AutoModelForCausalLM.from_pretrained(turn_end_dirs.model).eval()
    query, mask = ppo.left_pad([turn_end_dirs.tokenizer(PROMPT)["input_ids"], [4, 7]], 0)
    out = ppo.generate(model, query, mask, 6, 1.0, [EOS, END_OF_TURN], torch.full((2, 6), 0.5))
    assert out.tolist() == [[END_OF_TURN], [END_OF_TURN]]


def test_ppo_ends_and_scores_responses_at_the_turn_end(turn_end_dirs, tmp_path):
    """One PPO rollout: every response is <end_of_turn> alone, so none lacks an EOS, none pays the missing-EOS
    penalty, and each is scored by the reward model's own forward on prompt + <end_of_turn>."""
    args = ppo.Args(model_name_or_path=str(turn_end_dirs.model), reward_model_path=str(turn_end_dirs.rm),
                    dataset_name=str(turn_end_dirs.prompts), num_rollouts=1, rollout_batch_size=4,
                    per_device_train_batch_size=4, num_ppo_epochs=1, forward_batch_size=4, missing_eos_penalty=1.0,
                    learning_rate=1e-5, eval_steps=0, logging_steps=1000, output_dir=str(tmp_path), device="cpu")
    metrics = ppo.train(args)
    rm = AutoModelForSequenceClassification.from_pretrained(turn_end_dirs.rm).eval()
    with torch.no_grad():
        score = rm(input_ids=torch.tensor([turn_end_dirs.tokenizer(PROMPT)["input_ids"] + [END_OF_TURN]])).logits
    assert metrics["rollout/no_eos"] == 0 and metrics["rollout/length"] == 1
    assert metrics["objective/score"] == pytest.approx(score.item(), abs=1e-5)


def test_spin_generations_end_at_the_turn_end(turn_end_dirs):
    """SPIN's generated answers are <end_of_turn> alone, after the real answer's prompt, and none is counted as cut
    without an EOS."""
    args = spin.Args(dataset_name=str(turn_end_dirs.sft), device="cpu")
    rows, _ = spin.load_sft(args, turn_end_dirs.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(turn_end_dirs.model)
    runtime = spin.Runtime(0, 1, torch.device("cpu"), bf16=False)
    pairs, stats = spin.self_play_pairs(spin.Forward(model), rows, turn_end_dirs.tokenizer, 0, args, 0, "train",
                                        runtime)
    assert [p["rejected"] for p in pairs] == [row["prompt"] + [END_OF_TURN] for row in rows]
    assert stats["generation/no_eos"] == 0 and stats["generation/length"] == 1


# --------------------------------------------------------------------------- defect 12: no deprecated API
@pytest.mark.parametrize("script", [ppo, spin])
def test_generation_raises_no_deprecation_warning(toy_model_dir, script):
    """Several tokens, so the KV cache is passed back to the model (where transformers 5.24 warned that
    `past_key_values=` goes in 5.40)."""
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    query, mask = script.left_pad([[2, 7, 6, 5, 11, 8, 3], [2, 6, 5, 12, 15, 8, 3]], 0)
    uniforms = torch.rand(2, 5, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = script.generate(model, query, mask, 5, 1.0, [-1], uniforms)  # no eos: all 5 tokens are generated
    assert out.shape == (2, 5)


@pytest.mark.slow
def test_the_toy_worlds_enumeration_raises_no_deprecation_warning(toy_model_dir):
    """The measuring tool passes its KV cache back the same way (toy_world/world.py), so that it keeps working once
    transformers drops `past_key_values=`; its numbers are unchanged (the same bytes before and after this fix)."""
    from toy import world

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        logps = world.response_logprobs(model, tokenizer, "how was the food ?")
    assert logps.shape == (len(world.RESPONSES) + 1,) and math.isclose(np.exp(logps).sum(), 1.0, rel_tol=1e-9)


def test_generation_with_the_cache_matches_full_forwards(toy_model_dir):
    """The cache passed back is the one the model filled: each sampled token is the one a full forward over the
    prompt and the tokens so far gives for the same uniform, computed here without a cache (float64 inverse CDF)."""
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    prompts = [[2, 7, 6, 5, 11, 8, 3], [2, 12, 8, 3]]
    query, mask = ppo.left_pad(prompts, 0)
    uniforms = torch.rand(2, 5, generator=torch.Generator().manual_seed(1))
    out = ppo.generate(model, query, mask, 5, 1.0, [-1], uniforms)
    for b, prompt in enumerate(prompts):
        ids = list(prompt)
        for t in range(5):
            with torch.no_grad():
                p = model(input_ids=torch.tensor([ids])).logits[0, -1].double().softmax(-1).numpy()
            cdf = np.cumsum(p)
            ids.append(int(np.searchsorted(cdf, uniforms[b, t].item() * cdf[-1], side="right")))
        assert out[b].tolist() == ids[len(prompt) :]


# --------------------------------------------------------------------------- defect 13: the sampler's precision
def test_inverse_cdf_keeps_rare_tokens_probabilities():
    """A 152,064-token vocabulary (Qwen2.5's): 4 common tokens, a long tail (each p = 4.9e-7, 7% in all) and 6 rare
    tokens (p from 1.6e-10 to 6.6e-8). The CDF the sampler inverts is located at each rare token's two edges by
    bisection on the uniform (46 halvings: to 1.4e-14), and compared with a float64 reference built here with
    math.fsum. Measured: every edge within 5.1e-13 (bound 1e-11), every rare token's probability within 5.4e-5 of its
    value (bound 1e-3, above the bisection's resolution). A float32 softmax and cumsum put these edges up to 1.5e-8
    off, and a rare token's probability off by up to 2.4e-8, 4 times its value (over the whole vocabulary,
    sum |p - p_ref| was 1.5e-3 in float32 and 2.2e-12 in float64)."""
    vocab = 152_064
    logits = torch.full((vocab,), -12.0)
    logits[[17, 40_000, 90_000, 150_000]] = torch.tensor([0.0, 1.0, -0.5, 2.0])
    rare = [5, 20_001, 70_000, 100_000, 140_000, 152_063]
    logits[rare] = torch.linspace(-20.0, -14.0, len(rare))
    weights = [math.exp(x) for x in logits.double().tolist()]
    total = math.fsum(weights)
    edges = {k: (math.fsum(weights[:k]) / total, math.fsum(weights[: k + 1]) / total) for k in rare}
    first = torch.tensor([k + side for k in rare for side in (0, 1)])  # the tokens whose first u is each edge
    lo, hi = torch.zeros(len(first), dtype=torch.float64), torch.ones(len(first), dtype=torch.float64)
    for _ in range(46):
        mid = (lo + hi) / 2
        reached = ppo.sample_tokens(logits.expand(len(mid), -1), 1.0, mid)[:, 0] >= first
        hi, lo = torch.where(reached, mid, hi), torch.where(reached, lo, mid)
    for k, (start, end) in zip(rare, hi.view(len(rare), 2).tolist()):
        assert abs(start - edges[k][0]) < 1e-11 and abs(end - edges[k][1]) < 1e-11, (k, start, end, edges[k])
        assert end - start == pytest.approx(weights[k] / total, rel=1e-3, abs=0), k
    middle = torch.tensor([sum(edges[k]) / 2 for k in rare], dtype=torch.float64)
    assert spin.sample_tokens(logits.expand(len(rare), -1), 1.0, middle)[:, 0].tolist() == rare  # spin's copy too


# --------------------------------------------------------------------------- the sampler's logits are the scorer's
def test_the_sampler_draws_from_the_logits_the_policy_is_scored_with(monkeypatch):
    """Gemma 2 soft-caps its logits, tanh(z / 30) * 30. Under bf16 autocast (CUDA's; the CPU's here) its own forward
    caps them in bf16, while every log-prob the scripts train on comes from lm_logits, which caps in float32. The
    sampler took the model's own logits, so it drew from one distribution and scored with another. It now samples from
    lm_logits of the final hidden state. A tiny Gemma 2 built here, its head scaled x30 for logits of a real model's
    spread (std 3.4): measured, the sampler's log-probs equal a full forward's through lm_logits (0 apart), and the
    model's own are 0.074 nats off."""
    config = Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0,
                          tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    seen, sample = [], ppo.sample_tokens
    monkeypatch.setattr(ppo, "sample_tokens", lambda z, *rest: seen.append(z.float()) or sample(z, *rest))
    query, mask = ppo.left_pad([[5, 6, 7, 8], [9, 10]], 0)
    uniforms = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ppo.generate(model, query, mask, 4, 1.0, [-1], uniforms)
        hidden, width = ppo.forward_hidden(model, query, mask, out, torch.ones_like(out))
        scored = ppo.lm_logits(model, hidden[:, width - 1 : width - 1 + out.shape[1]]).log_softmax(-1)
        full_mask = torch.cat([mask, torch.ones_like(out)], dim=1)
        own = model(input_ids=torch.cat([query, out], dim=1), attention_mask=full_mask,
                    position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, query.shape[1] - 1 : -1]
    sampled = torch.stack(seen, dim=1).log_softmax(-1)  # (B, R, V)
    assert (sampled - scored).abs().max() < 1e-4
    assert (own.float().log_softmax(-1) - scored).abs().max() > 1e-2  # what the model's own logits would get wrong
