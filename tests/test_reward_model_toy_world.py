"""reward_model.py end to end on the toy world: its default run, then the saved model measured against the true reward.

What a reward model can reach here. The held-out pairs are labelled by Bradley-Terry from the true reward r, so r itself
gets a share of them "wrong": its accuracy on these very labels (ties counted as half right) is the ceiling, and its
Bradley-Terry loss on them the floor. A reward model is identified only up to a per-prompt constant
(test_reward_model_optimum.py), so its agreement with r over the answer space is measured per prompt.
"""

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import toy
from conftest import MEASURED

# needs the session's toy_reward_model (2 epochs of 16k pairs) and scores the toy world's answers
pytestmark = pytest.mark.slow


world = toy.world
LOSS_ABOVE_TRUE = 0.07  # from the spread over seeds: test_held_out_accuracy_approaches_the_true_reward
N_ANSWERS = 2048  # answers per prompt for the correlation: a seeded uniform sample of Y (41,371), shared by all prompts


@pytest.fixture(scope="module")
def default_run(toy_reward_model):
    """The default run (conftest's toy_reward_model), loaded as a later script loads it.

    It trains on one thread (conftest's setting): on 2 cores shared with other jobs, 2 threads spin against them
    (measured: 526 s for this run with 2 threads on a busy machine, 86 s with 1)."""
    run = toy_reward_model
    model = AutoModelForSequenceClassification.from_pretrained(run.path).eval()
    return SimpleNamespace(metrics=run.metrics, seconds=run.seconds, model=model,
                           tokenizer=AutoTokenizer.from_pretrained(run.path),
                           test=[json.loads(line) for line in (run.data_dir / "test.jsonl").read_text().splitlines()])


@torch.no_grad()
def scores(model, tokenizer, sequences: list[list[int]], batch_size: int = 1024) -> np.ndarray:
    """model(**inputs).logits[:, 0] on right-padded batches: the plain HF call a user of the saved model makes."""
    out = []
    for s in range(0, len(sequences), batch_size):
        chunk = sequences[s : s + batch_size]
        ids = torch.full((len(chunk), max(map(len, chunk))), tokenizer.pad_token_id)
        for i, seq in enumerate(chunk):
            ids[i, : len(seq)] = torch.tensor(seq)
        out.append(model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits[:, 0])
    return torch.cat(out).double().numpy()


def answer_ids(tokenizer, prompt: str, words: tuple[str, ...]) -> list[int]:
    return world.prompt_ids(tokenizer, prompt) + tokenizer.convert_tokens_to_ids(list(words)) + [tokenizer.eos_token_id]


def test_held_out_accuracy_approaches_the_true_reward(default_run):
    """On the 512 held-out Bradley-Terry labels, the reward model's pairwise accuracy comes within 5 points of the true
    reward's own, its loss within LOSS_ABOVE_TRUE of the true reward's, and it orders at least 90% of the pairs r does
    not tie as r does. Measured, the default run (seed 1): accuracy 0.707 vs 0.722, loss 0.5788 vs 0.5373.

    The loss bound comes from the run-to-run spread: the default run with --seed 1, 2, 3, 4 (which draws the score head
    and the batch order) ends 0.0415, 0.0287, 0.0166, 0.0221 above the true reward's loss (mean 0.027, sd 0.011), with
    accuracies 0.707, 0.713, 0.703, 0.705 against 0.722. The bound is the worst seed plus the seeds' range, 0.0415 +
    0.0249, rounded up to 0.07: for 3-4 seeds about mean + 3 sd. It stays far from a constant reward model, which
    scores log 2 = 0.693, 0.156 above the true reward. The accuracy gap is paired, both on the same labels; its
    sampling noise is about 1.5 points. All of it is recomputed here from the saved model through the plain HF call,
    and agrees with the run's own evaluation."""
    run, tok = default_run, default_run.tokenizer
    seqs, gaps = [], []
    for row in run.test:
        prompt = row["prompt"][0]["content"]
        chosen, rejected = (tuple(row[k][0]["content"].split()) for k in ("chosen", "rejected"))
        seqs += [answer_ids(tok, prompt, chosen), answer_ids(tok, prompt, rejected)]
        gaps.append(world.reward(prompt, chosen) - world.reward(prompt, rejected))
    # the sequences are what the chat template makes of the conversation, as in training
    row = run.test[0]
    assert seqs[0] == tok(tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False),
                          add_special_tokens=False)["input_ids"]
    s = scores(run.model, tok, seqs)
    margin, gaps = s[0::2] - s[1::2], np.array(gaps)
    accuracy = float(np.mean(margin > 0))
    ceiling = float(np.mean((gaps > 0) + 0.5 * (gaps == 0)))  # a tie is a coin flip for r
    expected_ceiling = float(np.mean(1 / (1 + np.exp(-np.abs(gaps)))))  # r's accuracy averaged over label draws
    loss, true_loss = float(np.mean(np.logaddexp(0, -margin))), float(np.mean(np.logaddexp(0, -gaps)))
    agreement = float(np.mean(((margin > 0) == (gaps > 0))[gaps != 0]))  # against r's order, where r has one
    MEASURED.append(
        f"python reward_model.py (defaults, {run.seconds:.0f} s on 1 thread): "
        f"held-out accuracy {accuracy:.3f} vs the true reward's {ceiling:.3f} on the same {len(gaps)} labels "
        f"({expected_ceiling:.3f} expected over label draws); BT loss {loss:.4f} vs the true reward's {true_loss:.4f}; "
        f"orders {agreement:.1%} of the untied pairs as r does")
    assert abs(accuracy - run.metrics["eval/rewards/accuracy"]) <= 1 / len(gaps)  # one pair may flip on float rounding
    assert loss == pytest.approx(run.metrics["eval/loss"], abs=1e-4)
    assert accuracy >= ceiling - 0.05
    assert loss <= true_loss + LOSS_ABOVE_TRUE
    assert agreement >= 0.9


def test_scores_correlate_with_the_true_reward_over_the_answer_space(default_run):
    """Per prompt, the Pearson correlation between the learned score and r over a seeded uniform sample of all 41,371
    answers is at least 0.75 on every prompt (measured: 0.849-0.883, mean 0.871; on the earlier 8k-pair world, other
    learning rates and epoch counts 0.73-0.86 at worst). Most of Y is never seen in training (16,384 pairs drawn from
    pi_ref), so this measures generalisation, not fit. With 2,048 answers the sampling error of each correlation is
    about 0.006 ((1 - rho^2)/sqrt(n)); on an earlier toy model a 4,096-answer sample was 0.001 off the full
    enumeration's mean."""
    run, tok = default_run, default_run.tokenizer
    sample = sorted(random.Random(0).sample(range(len(world.RESPONSES)), N_ANSWERS))
    correlations = []
    for prompt in world.PROMPTS:
        s = scores(run.model, tok, [answer_ids(tok, prompt, world.RESPONSES[i]) for i in sample])
        r = np.array([world.reward(prompt, world.RESPONSES[i]) for i in sample])
        correlations.append(float(np.corrcoef(s, r)[0, 1]))
    MEASURED.append(f"python reward_model.py (defaults): Pearson(score, r) per prompt over {N_ANSWERS} answers "
                    f"{min(correlations):.3f}-{max(correlations):.3f}, mean {np.mean(correlations):.3f}")
    assert min(correlations) >= 0.75
