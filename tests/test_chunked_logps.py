"""Chunked log-probs (issue 18): with --logp_chunk_tokens k the LM head and the float32 log-softmax run over k response
positions at a time, each chunk recomputed in the backward pass (in_chunks, shared by every script that scores
log-probs; tested here on dpo.py's copy, and on ppo_rlhf.py's own response_logps, which also divides by the temperature
and takes the entropy).

Checked: the same values and gradients as one pass over every position, for chunk sizes that split sequences (1, 3, 7)
and one larger than the batch, on the tiny Llama, Gemma 2 (soft-capped logits), Granite and Cohere (scaled logits);
and that at most one chunk's logits exist at once, in the forward pass and in the backward pass's recomputation.
"""

import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import dpo
import ppo_rlhf as ppo
from helpers import CONFIGS, SHORT_RUN

CHUNKS = [1, 3, 7, 1000]  # 1000: more positions than the batch has, so one chunk
WEIGHTS = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # a loss that weighs each row differently
# Three right-padded rows: (length, start of the response). Their 4 + 5 + 2 = 11 response positions are scored in
# chunks [0-2, 3-5, 6-8, 9-10] at k = 3 (the first row's 4 positions fall in two chunks) and [0-6, 7-10] at k = 7.
ROWS = [(9, 5), (10, 5), (6, 4)]


class HeadOutputs:
    """Forward hook on the LM head, call by call (the forward pass's, then any recomputation's in the backward pass):
    the rows of the output (the logits) it makes, and how many of the outputs it made before are still alive then (a
    weak reference to each)."""

    def __init__(self, model):
        self.rows, self.alive_at_call, self.outputs = [], [], []
        self.handle = model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.alive_at_call.append(sum(ref() is not None for ref in self.outputs))
        self.outputs.append(weakref.ref(output))
        self.rows.append(len(output))

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.outputs)


def tiny_model(family: str, dtype=torch.float64):
    """A random tiny model of the family. float64, so that chunked and unchunked differ only by float64 rounding (the
    log-softmax stays float32 in both: lm_logits casts the logits); in float32 the gradients differ by ~5e-7 of their
    size, the order in which the LM head's gradient is summed over positions."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family]()).eval().to(dtype)


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and targets (-100 except at the positions that predict a response token), (3, 10)."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.zeros(len(ROWS), 10, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    targets = torch.full_like(input_ids, -100)
    for b, (length, start) in enumerate(ROWS):
        input_ids[b, :length] = torch.randint(3, 37, (length,), generator=g)
        attention_mask[b, :length] = 1
        targets[b, start - 1 : length - 1] = input_ids[b, start:length]
    return input_ids, attention_mask, targets


def values_and_gradients(model, logps_of) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """logps_of(model) (3,), and the gradients of WEIGHTS . logps with respect to every parameter and to the body's
    final hidden states (3, 10, H)."""
    hidden = []

    def keep_hidden(module, inputs, output):
        output.last_hidden_state.retain_grad()
        hidden.append(output.last_hidden_state)

    handle = model.base_model.register_forward_hook(keep_hidden)
    model.zero_grad()
    logps = logps_of(model)
    (logps.double() @ WEIGHTS).backward()
    handle.remove()
    return logps.detach().double(), {n: p.grad.clone() for n, p in model.named_parameters()}, hidden[0].grad


def own_forward_logps(model) -> torch.Tensor:
    """Each row's summed response log-probs from the model's own forward: log_softmax of its (3, 10, V) logits."""
    input_ids, attention_mask, targets = batch()
    logps = model(input_ids=input_ids, attention_mask=attention_mask).logits.double().log_softmax(-1)
    return (logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)).sum(-1)


def chunked_logps(chunk_tokens: int):
    """sequence_logps in chunks of chunk_tokens positions, checking that the LM head saw chunks of that size."""
    def logps_of(model):
        model.logp_chunk_tokens = chunk_tokens
        head = HeadOutputs(model)
        logps = dpo.sequence_logps(model, *batch())[0]
        head.handle.remove()
        assert max(head.rows) == min(chunk_tokens or 11, 11), head.rows
        return logps

    return logps_of


@pytest.mark.parametrize("family", list(CONFIGS))
def test_chunked_log_probs_and_gradients_equal_one_pass(family):
    """sequence_logps in chunks of 1, 3, 7 and 1000 positions: the values and the gradients (every parameter, the
    hidden states) of one pass over all 11 positions to 1e-6, and the values of the model's own forward to 1e-5 (its
    float64 log-softmax against the scripts' float32 one)."""
    model = tiny_model(family)
    want_logps, want_grads, want_hidden = values_and_gradients(model, chunked_logps(0))
    with torch.no_grad():
        torch.testing.assert_close(want_logps, own_forward_logps(model).double(), rtol=0, atol=1e-5)
    for chunk_tokens in CHUNKS:
        logps, grads, hidden = values_and_gradients(model, chunked_logps(chunk_tokens))
        torch.testing.assert_close(logps, want_logps, rtol=0, atol=1e-6)
        torch.testing.assert_close(hidden, want_hidden, rtol=0, atol=1e-6)
        assert hidden.abs().sum() > 0
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk_tokens", CHUNKS)
def test_chunked_ppo_log_probs_entropy_and_gradients(chunk_tokens):
    """ppo_rlhf.response_logps at temperature 0.7 in chunks: the log-probs (with their gradients) and the entropies of
    one pass over every response position, to 1e-6; and the log-probs of the model's own forward (its logits / 0.7,
    log_softmax), to 1e-5."""
    model = tiny_model("granite")  # (Gemma 2 in float64 makes NaNs at left-padded prompts, chunked or not)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 37, (n,), generator=g).tolist() for n in (4, 2, 6)]
    responses = [torch.randint(3, 37, (n,), generator=g).tolist() for n in (5, 4, 2)]
    query, query_mask = ppo.left_pad(prompts, 0)
    response, mask = torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.bool)
    for b, r in enumerate(responses):
        response[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), True

    def logps_entropy_grads(chunk: int):
        model.logp_chunk_tokens = chunk
        model.zero_grad()
        head = HeadOutputs(model)
        logps, entropy = ppo.response_logps(model, query, query_mask, response, mask, 0.7, with_entropy=True)
        head.handle.remove()
        assert max(head.rows) == min(chunk or 11, 11), head.rows  # 5 + 4 + 2 response positions
        (logps.double().sum(-1) @ WEIGHTS).backward()
        return logps.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}

    want_logps, want_entropy, want_grads = logps_entropy_grads(0)
    logps, entropy, grads = logps_entropy_grads(chunk_tokens)
    torch.testing.assert_close(logps, want_logps, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, want_entropy, rtol=0, atol=1e-6)
    assert (entropy[mask] > 0).all() and (entropy[~mask] == 0).all()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        for b, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float() / 0.7
            own = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(logps[b, : len(r)], own, rtol=0, atol=1e-5)


def test_one_chunk_of_logits_exists_at_once_in_either_pass():
    """In chunks of 3, the 11 positions go through the LM head as 3 + 3 + 3 + 2 rows in the forward pass, each chunk's
    logits freed before the next is made and none kept for the backward pass, which makes each chunk's again (4 more
    head calls), one at a time. The unchunked pass (k = 0) makes one (11, V) output and keeps it for the backward."""
    model = tiny_model("llama", torch.float32)
    input_ids, attention_mask, targets = batch()
    model.logp_chunk_tokens = 3
    head = HeadOutputs(model)
    logps, _ = dpo.sequence_logps(model, input_ids, attention_mask, targets)
    assert head.rows == [3, 3, 3, 2] and head.alive_at_call == [0, 0, 0, 0]
    assert head.alive() == 0  # nothing of the logits is kept between the passes
    logps.sum().backward()
    assert sorted(head.rows[4:]) == [2, 3, 3, 3]  # recomputed in the backward pass
    assert head.alive_at_call == [0] * 8 and head.alive() == 0

    model.logp_chunk_tokens = 0
    head = HeadOutputs(model)
    logps, _ = dpo.sequence_logps(model, input_ids, attention_mask, targets)
    assert head.rows == [11] and head.alive() == 1  # the hook sees what it is meant to: logits kept for backward


def test_train_sets_the_chunk_size_on_its_models(data_dir, toy_model_dir, tmp_path):
    """dpo.py --logp_chunk_tokens 5: every pass of the LM head in training (the policy's forward and recomputation, the
    reference's and the evaluation's no-grad passes) scores at most 5 positions; only the start-up check of the head
    (check_log_probs, 64 positions at most) runs it unchunked."""
    rows, vocab_size = [], AutoConfig.from_pretrained(toy_model_dir).vocab_size
    hook = torch.nn.modules.module.register_module_forward_hook(  # every LM head's output: its rows
        lambda module, inputs, output: rows.append(len(output)) if isinstance(module, torch.nn.Linear)
        and module.out_features == vocab_size else None)
    try:
        dpo.train(dpo.Args(**{**SHORT_RUN, "max_steps": 1, "save_steps": 0}, logp_chunk_tokens=5, eval_holdout=0,
                           model_name_or_path=str(toy_model_dir), dataset_name=str(data_dir),
                           output_dir=str(tmp_path)))
    finally:
        hook.remove()
    assert len(rows) > 20 and max(rows[2:]) == 5, rows  # rows[:2]: check_log_probs, its way and the model's own
