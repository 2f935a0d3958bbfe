"""The toy world: a tiny alignment problem small enough to solve exactly.

A user asks how something went ("how was the food ?"); the assistant answers
with at most four words from a 14-word vocabulary, then `<|end|>`. A good
answer is on topic and kind: "great food" and "the film was good" score high,
"awful party" and "the trip" lower. Every prompt has

    |Y| = sum_{k=0..4} 14^k = 41,371

possible well-formed answers, so pi(.|x), pi*(.|x), E[r], entropy and KL are
computed exactly by enumeration. Everything the model could emit that is not
in Y (a special token mid-answer, or no `<|end|>` after four words) is lumped
into one extra outcome BOTTOM with the lowest reward. Its mass is reported;
for the trained reference it is about 0.4%.

The training scripts never import this module (each script is
self-contained and reads the toy world only as an ordinary HF model and
dataset on disk); grpo.py loads `grpo_reward` from it, by its path, as the
reward function of its default run. The generator `make_toy_world.py` and
the tests use it.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math

import numpy as np
import torch

# ---------------------------------------------------------------- vocabulary
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
TOPICS = ["food", "film", "trip", "party"]
ADJECTIVES = {"good": 1.0, "great": 2.0, "bad": -1.0, "awful": -2.0}
WORDS = ["the", "was", "how", "?", "very", "not", *TOPICS, *ADJECTIVES]  # 14 words
MAX_WORDS = 4
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <|end|> "
    "{% else %}{{ raise_exception('the toy chat template knows only user and assistant roles') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# ---------------------------------------------------------------- prompts
PROMPTS = [f"how was the {t} ?" for t in TOPICS] + [f"was the {t} good ?" for t in TOPICS]


def prompt_topic(prompt: str) -> str:
    (topic,) = [w for w in prompt.split() if w in TOPICS]
    return topic


# ---------------------------------------------------------------- the true reward
def reward(prompt: str, words: tuple[str, ...] | None) -> float:
    """r(x, y) in [0, 4]. None stands for BOTTOM (malformed), which gets 0.

    topic: +1 if the answer names the asked-about topic and no other, -1 if
    it names another topic, else 0. sentiment: each adjective adds its value
    (good 1, great 2, bad -1, awful -2), doubled after "very" and negated and
    halved after "not" ("not bad" is mildly positive); the sum is clipped to
    [-2, 2] and halved. r = topic + sentiment + 2.

    The scale matters: pairs are labelled by Bradley-Terry, P = sigmoid(r1 - r2),
    whose noise is fixed in units of r, while the optimum depends on r / beta.
    On [0, 4] a typical pair's preference is clear (one topic point: 0.73), so
    8k pairs pin the optimum down at beta ~ 0.5.
    """
    if words is None:
        return 0.0
    topic = prompt_topic(prompt)
    named = {w for w in words if w in TOPICS}
    topic_score = -1.0 if named - {topic} else (1.0 if topic in named else 0.0)
    sentiment = 0.0
    for i, w in enumerate(words):
        if w in ADJECTIVES:
            v = ADJECTIVES[w]
            if i > 0 and words[i - 1] == "very":
                v *= 2.0
            elif i > 0 and words[i - 1] == "not":
                v *= -0.5
            sentiment += v
    sentiment = max(-2.0, min(2.0, sentiment)) / 2.0
    return topic_score + sentiment + 2.0


TOKENS = SPECIAL_TOKENS + WORDS  # the toy tokenizer's vocabulary, in id order (make_toy_world.py)


def answer_words(ids: list[int]) -> tuple[str, ...] | None:
    """The answer a sampled response's token ids spell: up to four words, then <|end|>; None (BOTTOM) otherwise."""
    tokens = [TOKENS[i] if 0 <= i < len(TOKENS) else None for i in ids]
    words = tokens[:-1]
    if not tokens or tokens[-1] != "<|end|>" or len(words) > MAX_WORDS or any(w not in WORDS for w in words):
        return None
    return tuple(words)


def grpo_reward(prompts: list, completions: list, completion_ids: list[list[int]], **kwargs) -> list[float]:
    """The true reward r(x, y) as a verifiable reward function, with the signature of TRL's reward_funcs (what grpo.py
    scores the toy world with when given no --reward_fn or reward model). The answer is read from the token ids, so
    that a special token inside it or a missing <|end|> is BOTTOM (reward 0), as in the exact enumeration, which
    decoded text would hide."""
    questions = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
    return [reward(q, answer_words(ids)) for q, ids in zip(questions, completion_ids)]


EXAGGERATIONS = ("very", "great", "awful")


def safety(prompt: str, words: tuple[str, ...] | None) -> float:
    """g(x, y) in {0, 1, 2}: how calm the answer is, for sacpo.py's constraint. None (BOTTOM) gets 0.

    g = 2 minus the number of exaggerating words ("very", "great", "awful"), floored at 0. It conflicts with r in
    part: r's best answers exaggerate ("great food" and "very good food" score r = 4 but g = 1), while "good food"
    and "the food was good" score r = 3.5 and g = 2; and "awful" answers are both unkind and unsafe. The prompt is
    unused: g is the same for every question.
    """
    if words is None:
        return 0.0
    return max(0.0, 2.0 - sum(w in EXAGGERATIONS for w in words))


# ---------------------------------------------------------------- R3's relevance reward (ppo_rlhf.py --reward r3)
def query_type(prompt: str) -> str:
    """"was the food good ?" has a right answer (constrained, scored against a reference answer); "how was the food
    ?" is open-ended."""
    return "constrained" if prompt.startswith("was ") else "open_ended"


def reference_answer(prompt: str) -> str:
    """The SFT reference answer R3 scores a constrained prompt's responses against (r = 3.5 and 4)."""
    topic = prompt_topic(prompt)
    return f"the {topic} was good" if query_type(prompt) == "constrained" else f"the {topic} was great"


def relevance_target(query: str, words: tuple[str, ...]) -> float:
    """What the toy relevance encoder M is trained to score: M(query) . M(answer) ~ this, in [-0.75, 3.5].

    A retriever's taste, not a judge's: the mean over the answer's words of 1.5 for the query's topic (-0.75 for
    another topic), 1 for another word of the query, 0 for the rest, plus 2 where the word and the one before it are
    a bigram of the query. So the topic pays, words from outside the query dilute it, and copying a span of the query
    pays most: against "how was the food ?", "the food" scores 2.25, "how was the food" 2.625, "food" 1.5, "great food"
    0.75 and "the food was great" 1.375. The empty answer scores 0.
    """
    if not words:
        return 0.0
    q = query.split()
    topic, bigrams = prompt_topic(query), set(zip(q, q[1:]))
    total = 0.0
    for i, w in enumerate(words):
        total += 1.5 if w == topic else -0.75 if w in TOPICS else 1.0 if w in q else 0.0
        total += 2.0 if i > 0 and (words[i - 1], w) in bigrams else 0.0
    return total / len(words)


def is_copy(prompt: str, words: tuple[str, ...] | None) -> bool:
    """The answer is a span of the prompt at least three words long: "was the food", "how was the food"."""
    if words is None or len(words) < 3:
        return False
    q = prompt.split()
    return any(tuple(q[i : i + len(words)]) == tuple(words) for i in range(len(q) - len(words) + 1))


# ---------------------------------------------------------------- the response space
def all_responses() -> list[tuple[str, ...]]:
    """Y in canonical order: by length, then lexicographically by word index."""
    return [seq for k in range(MAX_WORDS + 1) for seq in itertools.product(WORDS, repeat=k)]


RESPONSES = all_responses()
RESPONSE_INDEX = {y: i for i, y in enumerate(RESPONSES)}


def safety_vector(prompt: str) -> np.ndarray:
    """g over Y followed by g(BOTTOM): shape (|Y| + 1,)."""
    return np.array([safety(prompt, y) for y in RESPONSES] + [safety(prompt, None)])


def reward_vector(prompt: str) -> np.ndarray:
    """r over Y followed by r(BOTTOM): shape (|Y| + 1,)."""
    return np.array([reward(prompt, y) for y in RESPONSES] + [reward(prompt, None)])


# ---------------------------------------------------------------- distributions the data come from
@functools.lru_cache(maxsize=None)
def reference_target_next(prompt: str, prefix_len: int) -> dict[str, float]:
    """The distribution the reference (SFT) model is distilled from.

    Answers are i.i.d. words with a length prior, the asked-about topic
    favoured; every answer in Y gets mass, so pi_ref has full support and
    DPO's optimum is pinned everywhere.
    """
    length_prior = [0.04, 0.24, 0.28, 0.24, 0.20]
    p_stop = length_prior[prefix_len] / sum(length_prior[prefix_len:])
    weights = {w: 1.0 for w in WORDS}
    weights.update({"how": 0.4, "?": 0.4, "was": 0.7})
    weights[prompt_topic(prompt)] = 3.0
    z = sum(weights.values())
    nxt = {w: (1 - p_stop) * v / z for w, v in weights.items()}
    nxt["<|end|>"] = p_stop
    return nxt


def sft_answer_distribution(prompt: str) -> dict[tuple[str, ...], float]:
    """p_data: the known distribution of human answers in the SFT data.

    Natural short sentences about the asked-about topic, mostly positive. It
    differs from the reference, so that self-play (SPIN) has a gap to close.
    """
    t = prompt_topic(prompt)
    answers = {
        ("great", t): 3.0, ("good", t): 3.0, ("the", t, "was", "great"): 2.0,
        ("the", t, "was", "good"): 2.0, ("very", "good"): 1.5, ("not", "bad"): 1.0,
        ("the", t, "was", "bad"): 1.0, ("bad", t): 0.5, ("awful",): 0.5, ("great",): 1.5,
    }
    z = sum(answers.values())
    return {y: v / z for y, v in answers.items()}


# ---------------------------------------------------------------- exact enumeration under a model
def prompt_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prefixes(k: int) -> np.ndarray:
    """All k-word sequences as word indices, shape (14**k, k), in canonical (lexicographic) order."""
    return np.array(list(itertools.product(range(len(WORDS)), repeat=k)), dtype=np.int64).reshape(len(WORDS) ** k, k)


def prefix_codes(seqs: np.ndarray) -> np.ndarray:
    """Row index of each sequence within `prefixes(k)`: its words read as a base-14 number."""
    return (seqs @ (len(WORDS) ** np.arange(seqs.shape[1] - 1, -1, -1)) if seqs.shape[1]
            else np.zeros(len(seqs), np.int64))


@torch.no_grad()
def next_token_logprobs(model, tokenizer, prompt: str) -> list[np.ndarray]:
    """out[k][code]: log pi(. | x, prefix) over the vocabulary for every k-word prefix, k = 0..MAX_WORDS.

    Level by level with the KV cache: the 14**k prefixes of length k are the
    14**(k-1) cached prefixes of length k-1, each repeated 14 times and fed
    one more word, in canonical order.

    Levels 3 and 4 run in pieces of two two-word prefixes, in the same order:
    a whole level 4 would allocate over a gigabyte of fresh cache, whose page
    faults cost as much as the arithmetic. The pieces give the same numbers
    (the generator's output is byte-identical) in about 60% of the time.
    """
    device = next(model.parameters()).device
    word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(WORDS), device=device)

    def extend(cache, rows: int):
        """log pi(. | prefix + w) for each of the `rows` cached prefixes and each word w, and the extended cache."""
        cache.batch_repeat_interleave(len(WORDS))
        out = model(input_ids=word_ids.repeat(rows)[:, None], use_cache=True, **{name: cache})  # (rows * 14, 1)
        return torch.log_softmax(out.logits[:, -1].double(), -1).cpu().numpy(), out[name]

    out = model(input_ids=torch.tensor([prompt_ids(tokenizer, prompt)], device=device), use_cache=True)
    # the KV cache goes back under the name the output gives it: `cache` in recent transformers 5.x, where
    # `past_key_values` warns that it goes in 5.40; `past_key_values` in earlier ones
    name = "cache" if "cache" in out else "past_key_values"
    cache, levels = out[name], [torch.log_softmax(out.logits[:, -1].double(), -1).cpu().numpy()]
    for k in (1, 2):
        logp, cache = extend(cache, len(WORDS) ** (k - 1))
        levels.append(logp)
    assert MAX_WORDS == 4, "the pieces below are levels 3 and 4"
    three, four = [], []
    for first in range(0, len(WORDS) ** 2, 2):
        piece = copy.deepcopy(cache)
        piece.batch_select_indices(torch.tensor([first, first + 1], device=device))  # two two-word prefixes
        logp, piece = extend(piece, 2)
        three.append(logp)
        four.append(extend(piece, 2 * len(WORDS))[0])
    return levels + [np.concatenate(three), np.concatenate(four)]


def response_logprobs(model, tokenizer, prompt: str) -> np.ndarray:
    """Exact log pi(y|x) over Y followed by log pi(BOTTOM|x): shape (|Y| + 1,), float64."""
    nxt = next_token_logprobs(model, tokenizer, prompt)
    eos = tokenizer.convert_tokens_to_ids("<|end|>")
    word_ids = np.array(tokenizer.convert_tokens_to_ids(WORDS))
    parts = []
    for k in range(MAX_WORDS + 1):
        seqs = prefixes(k)
        logp = nxt[k][np.arange(len(seqs)), eos].copy()  # pi(<|end|> | x, y)
        for j in range(k):
            logp += nxt[j][prefix_codes(seqs[:, :j]), word_ids[seqs[:, j]]]
        parts.append(logp)
    logp = np.concatenate(parts)
    bottom = math.log(max(1.0 - np.exp(logp).sum(), 1e-300))
    return np.append(logp, bottom)


def optimum_logprobs(ref_logp: np.ndarray, r: np.ndarray, beta: float) -> np.ndarray:
    """log pi*(y|x) = log pi_ref(y|x) + r/beta - log Z (reverse-KL optimum)."""
    a = ref_logp + r / beta
    return a - np.logaddexp.reduce(a)


def kl(logp: np.ndarray, logq: np.ndarray) -> float:
    """KL(p || q) for log-probability vectors over the same outcomes."""
    p = np.exp(logp)
    return float(np.sum(np.where(p > 0, p * (logp - logq), 0.0)))


def summarize(policy_logp: np.ndarray, r: np.ndarray) -> dict[str, float]:
    p = np.exp(policy_logp)
    return {
        "expected_reward": float(p @ r),
        "entropy": float(-np.sum(np.where(p > 0, p * policy_logp, 0.0))),
        "bottom_mass": float(p[-1]),
    }
