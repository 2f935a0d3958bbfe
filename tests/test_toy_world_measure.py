"""toy_world/world.py's exact enumeration, the measuring tool behind every end-to-end figure, against plain forwards.

world.response_logprobs gives log pi(y|x) for all 41,371 answers y in Y and, as the rest of the mass, BOTTOM (all that
is not a well-formed answer). It walks the answers with a KV cache, level by level; here each log-prob is recomputed
with a plain forward over the lone sequence (helpers.direct_logp: log-softmax of the logits, summed over the answer's
tokens, <|end|> included), and BOTTOM's mass is recomputed as what leaves Y at each step, not as 1 minus the rest.
"""

import itertools
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import toy
from helpers import TOY_EOS, direct_logp, toy_ids

world = toy.world


def direct_prompt_ids(prompt: str) -> list[int]:
    return toy_ids(f"<|user|> {prompt} <|assistant|>")


pytestmark = pytest.mark.slow  # enumerates the answers to a toy prompt (about 10 s each in float64)


def test_response_logprobs_agree_with_a_direct_forward(toy_model_dir, toy_tokenizer):
    """On the toy reference, in float64 (so that rounding cannot hide a slip in the bookkeeping: in float32 the two
    paths differ by up to 1.2e-6 nats, measured), 255 answers (the 15 of at most one word, and 80 distinct ones of each
    length 2-4, seeded) agree with a plain forward to 1e-6 nats (measured: at most 3.6e-15). And the mass of Y is not
    over-counted: its raw total is at most 1 (before BOTTOM's clamp at 1e-300), and BOTTOM is exactly the rest (the
    clamp did not engage)."""
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float64).eval()
    prompt = world.PROMPTS[0]
    prompt_ids = direct_prompt_ids(prompt)
    assert world.prompt_ids(toy_tokenizer, prompt) == prompt_ids
    logp = world.response_logprobs(model, toy_tokenizer, prompt)
    assert logp.shape == (len(world.RESPONSES) + 1,) == (41_372,)
    rng = random.Random(0)
    by_length = [[y for y in world.RESPONSES if len(y) == k] for k in range(5)]
    answers = by_length[0] + by_length[1] + [y for k in (2, 3, 4) for y in rng.sample(by_length[k], 80)]
    gaps = [abs(logp[world.RESPONSE_INDEX[y]] - direct_logp(model, prompt_ids, toy_ids(" ".join(y)) + [TOY_EOS]))
            for y in answers]
    assert len(answers) == 255 and max(gaps) < 1e-6
    mass = np.exp(logp[:-1]).sum()
    assert mass <= 1 + 1e-12
    assert np.exp(logp[-1]) == pytest.approx(1 - mass, rel=1e-9, abs=1e-15)


def test_bottom_is_what_leaves_the_answer_space(toy_tokenizer):
    """BOTTOM's mass recomputed from what leaves Y, on a tiny random model whose BOTTOM is most of the mass (so an
    over- or under-count of Y shows in it): one plain forward over each of the 14^4 four-word continuations of the
    prompt gives every next-token distribution along the way, and

        P(BOTTOM) = sum over prefixes w of k < 4 words of P(w) P(next is neither a word nor <|end|> | w)
                    + sum over four-word prefixes w of P(w) (1 - P(<|end|> | w)).

    It matches world.response_logprobs's BOTTOM (1 minus the mass of Y) to 1e-12, and every one of the 41,371 answers'
    log-probs matches the same forwards to 1e-9 nats (measured: 1.1e-16 and 3.6e-15), all in float64."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(toy_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                         eos_token_id=TOY_EOS, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    prompt = world.PROMPTS[2]
    logp = world.response_logprobs(model, toy_tokenizer, prompt)
    prompt_ids, word_ids = direct_prompt_ids(prompt), toy_ids(" ".join(world.WORDS))
    continuations = torch.tensor(list(itertools.product(word_ids, repeat=4)))  # (14^4, 4), canonical order
    inputs = torch.cat([torch.tensor(prompt_ids).expand(len(continuations), -1), continuations], 1)
    with torch.no_grad():
        nxt = torch.cat([model(input_ids=chunk).logits[:, len(prompt_ids) - 1:].log_softmax(-1)
                         for chunk in inputs.split(4096)])  # (14^4, 5, V): before each word, and after the fourth
    words = torch.tensor(word_ids)
    bottom, answers = 0.0, {}
    for k in range(5):
        rows = torch.arange(0, len(continuations), 14 ** (4 - k))  # each k-word prefix once
        prefix_logp = sum((nxt[rows, j].gather(1, continuations[rows, j : j + 1])[:, 0] for j in range(k)),
                          torch.zeros(len(rows), dtype=torch.float64))
        step = nxt[rows, k].exp()
        leaves = 1 - step[:, TOY_EOS] - (step[:, words].sum(1) if k < 4 else 0)
        bottom += float((prefix_logp.exp() * leaves).sum())
        for r, lp in zip(rows.tolist(), (prefix_logp + nxt[rows, k, TOY_EOS]).tolist()):
            answers[tuple(world.WORDS[word_ids.index(i)] for i in continuations[r, :k].tolist())] = lp
    assert len(answers) == len(world.RESPONSES) and bottom > 0.5
    gap = max(abs(logp[world.RESPONSE_INDEX[y]] - lp) for y, lp in answers.items())
    assert np.exp(logp[-1]) == pytest.approx(bottom, abs=1e-12)
    assert gap < 1e-9
