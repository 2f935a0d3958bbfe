"""Build the embedded toy world deterministically: tokenizer, reference model, data.

    python toy_world/make_toy_world.py            # rewrites toy_world/{model,pairs,...}
    python toy_world/make_toy_world.py --only unpaired safety_pairs   # only those files, from the committed model

Steps:
1. A word-level tokenizer built offline with `tokenizers` (19 tokens), with a
   chat template, saved as an ordinary HF tokenizer.
2. A tiny Llama (3 layers, width 128, ~0.5M parameters), distilled as the
   SFT/reference policy from an explicit answer distribution
   (`world.reference_target_next`) with soft next-word targets, so it puts
   mass on every answer in Y.
3. Data, every split as train.jsonl / test.jsonl that `datasets.load_dataset`
   reads:
   - pairs/             conversational preference pairs (the default)
   - pairs_standard/    the same pairs as plain prompt/chosen/rejected text (first 2,048 train pairs)
   - pairs_implicit/    the same in the hh-rlhf shape (prompt inside chosen/rejected)
   - ranked/            k = 2..4 answers per prompt with their true rewards
   - sft/               prompt/completion SFT data drawn from p_data
   - prompts/           prompt-only data
   - unpaired/          prompt/completion/label rows for kto.py: answers from the reference, each labelled
                        desirable with probability sigmoid(r - 2) (P_DESIRABLE); about 46% are
   - unpaired_imbalanced/  the same kind of draw with desirable rows kept with probability KEEP_DESIRABLE,
                        chosen so that desirable:undesirable is 1:4 in expectation
   - safety_pairs/      pairs drawn as pairs/ are, labelled by Bradley-Terry on the safety g (world.safety):
                        P(y1 > y2) = sigmoid(g1 - g2), for sacpo.py's safety step
   - relevance_model/   a tiny BERT encoder (3 layers, width 64) for ppo_rlhf.py --reward r3: mean-pooled,
                        M(x) . M(y) is fitted to world.relevance_target
   - r3_prompts/        the prompts with a reference answer and a query type (open_ended or constrained)
   Answers are sampled from the reference model's exact distribution over Y,
   and pairs are labelled by Bradley-Terry from the true reward:
   P(y1 > y2) = sigmoid(r(y1) - r(y2)).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
N_TRAIN_PAIRS, N_TEST_PAIRS = 16384, 512
N_FORMAT_TRAIN_PAIRS = 2048  # the plain-text and hh-rlhf copies hold the first train pairs only: they test parsing
N_TRAIN_RANKED, N_TEST_RANKED = 2048, 256
N_TRAIN_SFT, N_TEST_SFT = 2048, 256
N_TRAIN_UNPAIRED, N_TEST_UNPAIRED = 16384, 512  # draws; the imbalanced files keep fewer rows
UNPAIRED_SEED = SEED + 1  # its own stream: adding the unpaired files left every other file byte-identical
SAFETY_SEED = SEED + 2  # the same for the safety pairs
RELEVANCE_SEED = SEED + 3  # and for R3's relevance encoder and its prompts
DESIRABLE_TO_UNDESIRABLE = 1 / 4  # the imbalanced variant's expected ratio


def p_desirable(prompt: str, words: tuple[str, ...]) -> float:
    """P(label = desirable | x, y) = sigmoid(r(x, y) - 2): a thumbs-up from a rater who compares the answer with a
    neutral one (r = 2) by Bradley-Terry. So a desirable and an undesirable answer to the same prompt, paired, are a
    Bradley-Terry pair in r: P(y1 labelled good, y2 bad | {y1, y2}) = sigmoid(r1 - r2)."""
    return float(1 / (1 + np.exp(-(world.reward(prompt, words) - 2.0))))


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(world.SPECIAL_TOKENS + world.WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    hf.chat_template = world.CHAT_TEMPLATE
    return hf


def build_model(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def reference_target_probs(prompt: str) -> np.ndarray:
    """The target's exact probability of every answer in Y (it sums to 1: the target never leaves Y)."""
    parts = []
    for k in range(world.MAX_WORDS + 1):
        seqs = world.prefixes(k)
        p = np.full(len(seqs), world.reference_target_next(prompt, k)["<|end|>"])
        for j in range(k):
            nxt = world.reference_target_next(prompt, j)
            p *= np.array([nxt[w] for w in world.WORDS])[seqs[:, j]]
        parts.append(p)
    return np.concatenate(parts)


def train_reference(model, tokenizer, rng: np.random.Generator, steps: int = 300, batch_size: int = 128) -> None:
    """SFT against the target's soft next-word distributions.

    The target's next-word distribution depends on the prompt and the word
    position only, not on the earlier words, so every position of a sampled
    four-word string is a valid training prefix: position k (k words in) is
    trained toward `reference_target_next(prompt, k)`, and position 4 toward
    <|end|>. Soft targets instead of sampled next tokens cut the gradient
    noise, which is what lets 300 small steps replace 800 large ones.
    """
    bases = torch.tensor([world.prompt_ids(tokenizer, p) for p in world.PROMPTS])  # (P, n): all the same length
    n = bases.shape[1]
    word_ids = torch.tensor(tokenizer.convert_tokens_to_ids(world.WORDS))
    target = torch.zeros(len(world.PROMPTS), world.MAX_WORDS + 1, len(tokenizer))  # (P, 5, V)
    for a, prompt in enumerate(world.PROMPTS):
        for k in range(world.MAX_WORDS + 1):
            for token, q in world.reference_target_next(prompt, k).items():
                target[a, k, tokenizer.convert_tokens_to_ids(token)] = q
    word_probs = target[:, : world.MAX_WORDS, word_ids]
    word_cdf = (word_probs / word_probs.sum(-1, keepdim=True)).double().cumsum(-1)  # (P, 4, 14)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        rows = torch.from_numpy(rng.integers(len(world.PROMPTS), size=batch_size))
        u = torch.from_numpy(rng.random((batch_size, world.MAX_WORDS)))
        words = (u[..., None] > word_cdf[rows]).sum(-1).clamp(max=len(word_ids) - 1)  # (B, 4) inverse-CDF draws
        ids = torch.cat([bases[rows], word_ids[words]], dim=1)  # (B, n + 4)
        logits = model(input_ids=ids).logits[:, n - 1 :].float()  # (B, 5, V): after 0..4 answer words
        loss = -(target[rows] * torch.log_softmax(logits, -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"reference SFT step {step}: soft cross-entropy {loss.item():.4f}")


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def text(words: tuple[str, ...]) -> str:
    return " ".join(words)


def main() -> None:
    t0 = time.time()
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    print(f"model parameters: {sum(p.numel() for p in model.parameters()):,}")
    train_reference(model, tokenizer, rng)
    print(f"reference trained in {time.time() - t0:.1f}s")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(os.path.join(HERE, "model"))
    tokenizer.save_pretrained(os.path.join(HERE, "model"))

    # exact reference distributions over Y (BOTTOM excluded when sampling data)
    probs = {}
    for prompt in world.PROMPTS:
        logp = world.response_logprobs(model, tokenizer, prompt)
        print(f"{prompt!r}: reference mass outside Y {np.exp(logp[-1]):.2e}")
        p = np.exp(logp[:-1])
        probs[prompt] = p / p.sum()
    print(f"exact reference distributions at {time.time() - t0:.1f}s")

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        """n prompt indices, and for each an answer index drawn from the reference's exact distribution."""
        prompts = rng.integers(len(world.PROMPTS), size=n)
        answers = np.empty(n, dtype=np.int64)
        for a, prompt in enumerate(world.PROMPTS):
            answers[prompts == a] = rng.choice(len(world.RESPONSES), size=int((prompts == a).sum()), p=probs[prompt])
        return prompts, answers

    def pairs(n):
        prompts, y1 = sample(2 * n)
        _, y2 = sample(2 * n)  # second answer for the same prompt: resample below
        for a, prompt in enumerate(world.PROMPTS):
            y2[prompts == a] = rng.choice(len(world.RESPONSES), size=int((prompts == a).sum()), p=probs[prompt])
        keep = np.flatnonzero(y1 != y2)[:n]  # pairs of two identical answers carry no preference
        rows = []
        for a, i, j in zip(prompts[keep], y1[keep], y2[keep]):
            prompt, a1, a2 = world.PROMPTS[a], world.RESPONSES[i], world.RESPONSES[j]
            p1 = 1 / (1 + np.exp(-(world.reward(prompt, a1) - world.reward(prompt, a2))))  # Bradley-Terry
            rows.append((prompt, a1, a2) if rng.random() < p1 else (prompt, a2, a1))
        return rows

    def ranked(n):
        rows = []
        prompts, _ = sample(n)
        for a in prompts:
            prompt = world.PROMPTS[a]
            draws = rng.choice(len(world.RESPONSES), size=int(rng.integers(2, 5)), p=probs[prompt])
            answers = [world.RESPONSES[i] for i in draws]
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completions": [[{"role": "assistant", "content": text(y)}] for y in answers],
                         "scores": [world.reward(prompt, y) for y in answers]})
        return rows

    def sft(n):
        rows = []
        for a in rng.integers(len(world.PROMPTS), size=n):
            dist = world.sft_answer_distribution(world.PROMPTS[a])
            y = list(dist)[rng.choice(len(dist), p=list(dist.values()))]
            rows.append({"prompt": [{"role": "user", "content": world.PROMPTS[a]}],
                         "completion": [{"role": "assistant", "content": text(y)}]})
        return rows

    chat = lambda prompt: tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    for split, n in (("train", N_TRAIN_PAIRS), ("test", N_TEST_PAIRS)):
        rows = pairs(n)
        write_jsonl(os.path.join(HERE, "pairs", f"{split}.jsonl"), [
            {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": text(c)}],
             "rejected": [{"role": "assistant", "content": text(r)}]} for p, c, r in rows])
        head = rows[:N_FORMAT_TRAIN_PAIRS] if split == "train" else rows
        write_jsonl(os.path.join(HERE, "pairs_standard", f"{split}.jsonl"), [
            {"prompt": chat(p), "chosen": " " + text(c), "rejected": " " + text(r)} for p, c, r in head])
        write_jsonl(os.path.join(HERE, "pairs_implicit", f"{split}.jsonl"), [
            {"chosen": chat(p) + " " + text(c), "rejected": chat(p) + " " + text(r)} for p, c, r in head])
    for split, n in (("train", N_TRAIN_RANKED), ("test", N_TEST_RANKED)):
        write_jsonl(os.path.join(HERE, "ranked", f"{split}.jsonl"), ranked(n))
    for split, n in (("train", N_TRAIN_SFT), ("test", N_TEST_SFT)):
        write_jsonl(os.path.join(HERE, "sft", f"{split}.jsonl"), sft(n))
    for split in ("train", "test"):
        write_jsonl(os.path.join(HERE, "prompts", f"{split}.jsonl"),
                    [{"prompt": [{"role": "user", "content": p}]} for p in world.PROMPTS])
    write_unpaired(probs)
    write_safety_pairs(probs)
    write_relevance()
    print(f"toy world written to {HERE} in {time.time() - t0:.1f}s")


def keep_desirable(probs: dict[str, np.ndarray]) -> float:
    """The probability of keeping a desirable row that makes desirable:undesirable DESIRABLE_TO_UNDESIRABLE in
    expectation, over uniform prompts and reference answers."""
    s = np.mean([probs[p] @ np.array([p_desirable(p, y) for y in world.RESPONSES]) for p in world.PROMPTS])
    return DESIRABLE_TO_UNDESIRABLE * (1 - s) / s


def write_unpaired(probs: dict[str, np.ndarray]) -> None:
    """unpaired/ and unpaired_imbalanced/: a uniform prompt, an answer from the reference's exact distribution over
    Y, and a label drawn with probability p_desirable, each row stating that probability; the imbalanced files drop
    each desirable row with probability 1 - keep_desirable."""
    rng = np.random.default_rng(UNPAIRED_SEED)
    keep = keep_desirable(probs)

    def rows(n: int, keep_good: float) -> list[dict]:
        out = []
        for a in rng.integers(len(world.PROMPTS), size=n):
            prompt = world.PROMPTS[a]
            y = world.RESPONSES[rng.choice(len(world.RESPONSES), p=probs[prompt])]
            p = p_desirable(prompt, y)
            label = bool(rng.random() < p)
            if label and rng.random() >= keep_good:
                continue
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "completion": [{"role": "assistant", "content": text(y)}], "label": label,
                        "p_desirable": round(p, 6)})
        return out

    for folder, keep_good in (("unpaired", 1.0), ("unpaired_imbalanced", keep)):
        for split, n in (("train", N_TRAIN_UNPAIRED), ("test", N_TEST_UNPAIRED)):
            data = rows(n, keep_good)
            write_jsonl(os.path.join(HERE, folder, f"{split}.jsonl"), data)
            good = sum(r["label"] for r in data)
            print(f"{folder}/{split}: {len(data)} rows, {good} desirable, {len(data) - good} undesirable")
    print(f"imbalanced: desirable rows kept with probability {keep:.6f}")


def write_safety_pairs(probs: dict[str, np.ndarray]) -> None:
    """safety_pairs/: a uniform prompt and two different answers drawn i.i.d. from the reference's exact distribution
    over Y, ordered by Bradley-Terry on the safety g (conversational, as pairs/)."""
    rng = np.random.default_rng(SAFETY_SEED)
    for split, n in (("train", N_TRAIN_PAIRS), ("test", N_TEST_PAIRS)):
        rows = []
        while len(rows) < n:
            prompt = world.PROMPTS[rng.integers(len(world.PROMPTS))]
            i, j = rng.choice(len(world.RESPONSES), size=2, p=probs[prompt])
            if i == j:  # two identical answers carry no preference
                continue
            a1, a2 = world.RESPONSES[i], world.RESPONSES[j]
            p1 = 1 / (1 + np.exp(-(world.safety(prompt, a1) - world.safety(prompt, a2))))
            chosen, rejected = (a1, a2) if rng.random() < p1 else (a2, a1)
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": text(chosen)}],
                         "rejected": [{"role": "assistant", "content": text(rejected)}]})
        write_jsonl(os.path.join(HERE, "safety_pairs", f"{split}.jsonl"), rows)
        print(f"safety_pairs/{split}: {len(rows)} pairs")


def write_relevance(probs=None) -> None:
    """relevance_model/ and r3_prompts/: the toy Contriever and the prompts R3 scores with it (probs is unused).

    The encoder is a 3-layer BERT of width 64 on the toy tokenizer, read as Contriever is read: the mean of the last
    hidden state over the tokens, and a dot product. It is fitted by least squares so that M(q) . M(y) matches
    world.relevance_target for 16 queries (the 8 prompts and their 8 reference answers) and answers of one to five
    words (five: a response that runs out ppo_rlhf.py's budget without <|end|>, which is scored too) drawn two ways,
    half each: uniformly by length, and from the query's own words (where the copies and spans are).
    """
    rng = np.random.default_rng(RELEVANCE_SEED)
    torch.manual_seed(RELEVANCE_SEED)
    tokenizer = build_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=16, type_vocab_size=1,
                        pad_token_id=tokenizer.pad_token_id, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertModel(config)  # its pooler is unused (Contriever reads the mean); saved so that AutoModel loads it
    queries = world.PROMPTS + [world.reference_answer(p) for p in world.PROMPTS]

    def embed(rows: list[list[str]]) -> torch.Tensor:
        """Mean-pooled last hidden states of word sequences, right-padded (as tokenizing their text would give)."""
        width = max(len(r) for r in rows)
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(r) + [tokenizer.pad_token_id] * (width - len(r))
                            for r in rows])
        mask = ids != tokenizer.pad_token_id
        hidden = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def draw(query: str) -> tuple[str, ...]:
        k = int(rng.integers(1, world.MAX_WORDS + 2))  # up to five: a response that runs out the budget is scored too
        words = query.split() if rng.random() < 0.5 else world.WORDS
        return tuple(words[i] for i in rng.integers(len(words), size=k))

    steps, batch_size = 6000, 512
    query_words = [q.split() for q in queries]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        which = rng.integers(len(queries), size=batch_size)
        answers = [draw(queries[q]) for q in which]
        target = torch.tensor([world.relevance_target(queries[q], y) for q, y in zip(which, answers)])
        scores = (embed(query_words)[torch.from_numpy(which)] * embed(answers)).sum(-1)
        loss = ((scores - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"relevance encoder step {step}: mean squared error {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        answers = world.RESPONSES[1:]
        y = torch.cat([embed(answers[i : i + 8192]) for i in range(0, len(answers), 8192)])
        errors = (embed(query_words) @ y.T).numpy() - np.array([[world.relevance_target(q, a) for a in answers]
                                                                for q in queries])
    print(f"relevance encoder over Y: |error| mean {np.abs(errors).mean():.4f}, max {np.abs(errors).max():.4f}")
    model.save_pretrained(os.path.join(HERE, "relevance_model"))
    tokenizer.save_pretrained(os.path.join(HERE, "relevance_model"))
    for split in ("train", "test"):
        write_jsonl(os.path.join(HERE, "r3_prompts", f"{split}.jsonl"), [
            {"prompt": [{"role": "user", "content": p}], "reference": world.reference_answer(p),
             "query_type": world.query_type(p)} for p in world.PROMPTS])


WRITERS = {"unpaired": write_unpaired, "safety_pairs": write_safety_pairs, "relevance": write_relevance}


def write_only(names: list[str]) -> None:
    """Write the named files (WRITERS) from the committed reference model, leaving every other file alone."""
    unknown = [name for name in names if name not in WRITERS]
    if unknown or not names:
        raise SystemExit(f"--only takes one or more of {sorted(WRITERS)}, got {names}")
    model = LlamaForCausalLM.from_pretrained(os.path.join(HERE, "model")).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(os.path.join(HERE, "model"))
    probs = {}
    for prompt in world.PROMPTS:
        p = np.exp(world.response_logprobs(model, tokenizer, prompt)[:-1])
        probs[prompt] = p / p.sum()
    for name in names:
        WRITERS[name](probs)


if __name__ == "__main__":
    write_only(sys.argv[2:]) if sys.argv[1:2] == ["--only"] else main()
