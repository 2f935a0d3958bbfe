"""Build the embedded toy world deterministically: tokenizer, reference model, data.

    python toy_world/make_toy_world.py            # rewrites toy_world/{model,pairs,...}

Steps:
1. A word-level tokenizer built offline with `tokenizers` (19 tokens), with a
   chat template, saved as an ordinary HF tokenizer.
2. A tiny Llama (3 layers, width 128, ~0.5M parameters), distilled as the
   SFT/reference policy from an explicit answer distribution
   (`world.reference_target_next`) by minimising the exact cross-entropy over
   every answer prefix, so it puts mass on every answer in Y.
3. Data, every split as train.jsonl / test.jsonl that `datasets.load_dataset`
   reads:
   - pairs/             conversational preference pairs (the default)
   - pairs_standard/    the same pairs as plain prompt/chosen/rejected text
   - pairs_implicit/    the same pairs in the hh-rlhf shape (prompt inside chosen/rejected)
   - ranked/            k = 2..4 answers per prompt with their true rewards
   - sft/               prompt/completion SFT data drawn from p_data
   - prompts/           prompt-only data
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
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 0
N_TRAIN_PAIRS, N_TEST_PAIRS = 8192, 512
N_TRAIN_RANKED, N_TEST_RANKED = 2048, 256
N_TRAIN_SFT, N_TEST_SFT = 2048, 256


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


def train_reference(model, tokenizer, rng: np.random.Generator, steps: int = 800, batch_size: int = 256) -> None:
    """SFT on answers sampled from the target (cross-entropy on answer tokens and <|end|>)."""
    bases = [world.prompt_ids(tokenizer, p) for p in world.PROMPTS]
    assert len({len(b) for b in bases}) == 1, "toy prompts are all the same length"
    n = len(bases[0])
    word_ids = np.array(tokenizer.convert_tokens_to_ids(world.WORDS))
    # every answer in Y as token ids followed by <|end|>, right-padded
    answers = np.full((len(world.RESPONSES), world.MAX_WORDS + 1), -100)
    for k in range(world.MAX_WORDS + 1):
        first = sum(len(world.WORDS) ** j for j in range(k))
        seqs = world.prefixes(k)
        answers[first : first + len(seqs), :k] = word_ids[seqs]
        answers[first : first + len(seqs), k] = tokenizer.eos_token_id
    answers = torch.from_numpy(answers)
    bases = torch.tensor(bases)
    target = np.concatenate([reference_target_probs(p) for p in world.PROMPTS]) / len(world.PROMPTS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        rows = torch.from_numpy(rng.choice(len(target), size=batch_size, p=target))
        prompt_rows, answer_rows = rows // len(world.RESPONSES), rows % len(world.RESPONSES)
        labels = torch.cat([torch.full((batch_size, n), -100), answers[answer_rows]], dim=1)
        ids = torch.cat([bases[prompt_rows], answers[answer_rows].clamp(min=tokenizer.pad_token_id)], dim=1)
        logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"reference SFT step {step}: token cross-entropy {loss.item():.4f}")


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
            answers = [world.RESPONSES[i] for i in rng.choice(len(world.RESPONSES), size=int(rng.integers(2, 5)), p=probs[prompt])]
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completions": [[{"role": "assistant", "content": text(y)}] for y in answers],
                         "scores": [world.reward(prompt, y) for y in answers]})
        return rows

    def sft(n):
        rows = []
        for a in rng.integers(len(world.PROMPTS), size=n):
            dist = world.sft_answer_distribution(world.PROMPTS[a])
            y = list(dist)[rng.choice(len(dist), p=list(dist.values()))]
            rows.append({"prompt": [{"role": "user", "content": world.PROMPTS[a]}], "completion": [{"role": "assistant", "content": text(y)}]})
        return rows

    chat = lambda prompt: tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)  # noqa: E731
    for split, n in (("train", N_TRAIN_PAIRS), ("test", N_TEST_PAIRS)):
        rows = pairs(n)
        write_jsonl(os.path.join(HERE, "pairs", f"{split}.jsonl"), [
            {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": text(c)}],
             "rejected": [{"role": "assistant", "content": text(r)}]} for p, c, r in rows])
        write_jsonl(os.path.join(HERE, "pairs_standard", f"{split}.jsonl"), [
            {"prompt": chat(p), "chosen": " " + text(c), "rejected": " " + text(r)} for p, c, r in rows])
        write_jsonl(os.path.join(HERE, "pairs_implicit", f"{split}.jsonl"), [
            {"chosen": chat(p) + " " + text(c), "rejected": chat(p) + " " + text(r)} for p, c, r in rows])
    for split, n in (("train", N_TRAIN_RANKED), ("test", N_TEST_RANKED)):
        write_jsonl(os.path.join(HERE, "ranked", f"{split}.jsonl"), ranked(n))
    for split, n in (("train", N_TRAIN_SFT), ("test", N_TEST_SFT)):
        write_jsonl(os.path.join(HERE, "sft", f"{split}.jsonl"), sft(n))
    for split in ("train", "test"):
        write_jsonl(os.path.join(HERE, "prompts", f"{split}.jsonl"), [{"prompt": [{"role": "user", "content": p}]} for p in world.PROMPTS])
    print(f"toy world written to {HERE} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
