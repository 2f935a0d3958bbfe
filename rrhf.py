"""RRHF: Rank Responses to align language models with Human Feedback, in one file.

Paper: Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with
Human Feedback without tears", https://arxiv.org/abs/2304.05302

Objective (Eqs. 1-4): each prompt x comes with k >= 2 responses y_i scored r_i.
With the length-normalised log-probability p_i = log pi(y_i|x) / |y_i|,

    L_rank = sum_{r_i < r_j} max(0, p_i - p_j)      (every pair the scores order)
    L_ft   = -p_best,  best = argmax_i r_i          (cross-entropy on the best response, a token mean)
    L      = w * L_rank + L_ft

The hinge asks the policy to rank each better-scored response at least as
likely (per token) as each worse one, and stops once it does; the SFT term
pulls all remaining probability toward the best response. Nothing ties the
policy to its start: there is no reference model and no KL term.

Conventions and deviations
- Groups of different k are batched together, several prompts per step; the
  official code takes one prompt per device. The loss of a batch is the mean
  over its groups of each group's w * L_rank + L_ft (L_rank summed over the
  group's pairs, as in the paper).
- |y_i| counts response tokens, its <eos> included. The official code's
  --length_penalty exponent is fixed at 1.
- Tied scores make no pair. If several responses share the top score, the
  SFT term takes the first of them. Rows whose scores are all tied, that have
  fewer than 2 responses, or whose responses and scores do not line up
  (different lengths) are skipped, counted and reported.
- The SFT term is a token mean over the best response's tokens (METHODS.md);
  the official code averages over the padded width instead.
- Pairwise data (prompt/chosen/rejected in any of dpo.py's formats) is read
  as k = 2 with scores (1, 0).
- `--reward_model_path` rescores every response with a reward model (a
  *ForSequenceClassification with one label, as reward_model.py saves),
  which is the paper's setting; the dataset's scores, if any, are then only
  compared with it. The responses themselves come from the dataset: sample
  them offline (the toy world's ranked data are reference samples).
- The data formats, <eos> handling, truncation and counted skips are
  dpo.py's machinery; every response in a group is truncated by dpo.py's rule.

Usage
    python rrhf.py                                   # the embedded toy world (k = 2-4 reference samples, true scores), any CPU, under a minute
    python reward_model.py && python rrhf.py --reward_model_path runs/reward_model   # the same, scored by a learned reward model
    python rrhf.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name my_org/ranked_responses --learning_rate 2e-5 \\
        --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \\
        --max_length 1024 --num_train_epochs 3 --eval_steps 200 --save_steps 500 \\
        --gradient_checkpointing --output_dir runs/rrhf-qwen
    python rrhf.py --resume_from runs/rrhf/checkpoint-100   # continue a run exactly

Data (one row per prompt)
    ranked:    prompt, completions (list of k responses), scores (list of k numbers);
               strings, or a message list for the prompt and one per response
    pairwise:  any format dpo.py reads (prompt/chosen/rejected, conversational or not, or implicit prompt)

Several GPUs (torchrun; a plain `python rrhf.py` needs none of it)
    torchrun --nproc_per_node 4 rrhf.py <the flags above> --per_device_train_batch_size 2
        # DDP: an optimizer step sees per_device_train_batch_size x 4 processes x gradient_accumulation_steps
        # groups, and the run is the one-process run with that global batch (tested on CPU to float rounding)
    torchrun --nproc_per_node 8 rrhf.py <the flags above> --fsdp   # FSDP2: every model sharded per decoder layer

Logged metrics (one dict per optimizer step; printed every --logging_steps, and to wandb with --track)
    train/loss                  mean over groups of w * L_rank + L_ft
    train/rank                  mean L_rank, the hinge summed over each group's ordered pairs
    train/sft                   mean L_ft = -p_best
    train/p/best                p of the best response (length-normalised log-prob: summed log-prob / tokens)
    train/p/mean                mean p of a group's responses, mean over groups
    train/p/pair_accuracy       fraction of a group's pairs with r_i < r_j that have p_i < p_j, mean over groups
    train/p/kendall_tau         Kendall's tau between p and the scores over each group's untied pairs, mean over groups
    train/lr, train/grad_norm   learning rate, and the gradient norm before clipping
    train/epoch                 fractional epoch
    perf/tokens_per_sec         non-padding tokens through the policy per second of wall time
    eval/...                    the same quantities on the held-out split, every --eval_steps
"""

import atexit
import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import tyro
from datasets import DatasetDict, load_dataset
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    # ---- model and data
    model_name_or_path: str = "toy_world/model"
    """policy to train: a hub name or a local directory (a relative path is also looked up next to this file)"""
    dataset_name: str = "toy_world/ranked"
    """ranked or pairwise data: a hub name, a local directory, or a .json/.jsonl/.parquet/.csv file"""
    dataset_config: Optional[str] = None
    """the dataset's configuration name, if it has several"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """held-out split; if the dataset has none, `eval_holdout` rows of the train split are held out"""
    eval_holdout: int = 512
    """rows held out from the train split when the dataset has no `eval_split` (0: no evaluation)"""
    max_length: int = 512
    """longest prompt + response in tokens"""
    max_prompt_length: int = 256
    """tokens kept from the end of a prompt when a row is longer than max_length"""
    responses_column: str = "completions"
    """column with each prompt's list of k responses (ranked data)"""
    scores_column: str = "scores"
    """column with each prompt's list of k scores, higher is better (ranked data)"""
    reward_model_path: Optional[str] = None
    """score every response with this reward model (one-label *ForSequenceClassification, e.g. from reward_model.py) instead of the data's scores"""
    per_device_reward_batch_size: int = 64
    """sequences per reward-model forward when scoring"""
    # ---- RRHF
    rank_weight: float = 1.0
    """w, the weight of the ranking hinge L_rank against the SFT term L_ft (Eq. 4; the official recipe's rrhf_weight is 1)"""
    # ---- optimisation
    learning_rate: float = 3e-4
    """peak AdamW learning rate (the toy world's; the paper trains 7B models at 2e-5)"""
    num_train_epochs: int = 2
    """passes over the training groups"""
    max_steps: int = -1
    """if > 0, the number of optimizer steps, overriding num_train_epochs"""
    per_device_train_batch_size: int = 8
    """groups (prompts, each with its k responses) per micro-batch on each process (a step sees this x processes x
    gradient_accumulation_steps)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    per_device_eval_batch_size: int = 32
    """groups per evaluation batch"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warmup; the rest decays linearly to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold"""
    group_by_length: bool = True
    """batch rows of similar length (within shuffled mega-batches) to cut padding"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    bf16: bool = True
    """autocast to bfloat16 on CUDA (weights and log-softmax stay float32); ignored on CPU and MPS"""
    device: str = "auto"
    """'auto' picks cuda, then mps, then cpu (under torchrun, each process's own GPU)"""
    fsdp: bool = False
    """under torchrun, shard the models per decoder layer with FSDP2 instead of replicating them with DDP"""
    # ---- logging, evaluation, saving
    logging_steps: int = 10
    """print metrics every this many optimizer steps"""
    eval_steps: int = 100
    """evaluate on the held-out split every this many steps (0 = only at the end)"""
    save_steps: int = 0
    """save a resumable checkpoint every this many steps (0 = only the final model)"""
    output_dir: str = "runs/rrhf"
    """where the final model and checkpoints go"""
    resume_from: Optional[str] = None
    """a checkpoint directory written by this script (output_dir/checkpoint-N) to continue from"""
    seed: int = 1
    """seed for python, numpy and torch, the data order and the held-out split"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "single-file-alignment"
    """wandb project"""
    run_name: Optional[str] = None
    """wandb run name"""


# --------------------------------------------------------------------------- the method
def rrhf_loss(
    policy_logps: torch.Tensor,
    lengths: torch.Tensor,
    scores: torch.Tensor,
    valid: torch.Tensor,
    rank_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RRHF loss per group over a padded batch of G groups of up to K responses (arXiv:2304.05302, Eqs. 1-4).

    policy_logps (G, K) summed response log-probs, lengths (G, K) response
    token counts, scores (G, K) float, valid (G, K) bool (False marks the
    padding of groups with fewer than K responses; their entries are ignored).
    Returns losses (G,), and detached: rank (G,) the summed hinge, sft (G,)
    = -p_best, and p (G, K) the length-normalised log-probs (0 where invalid).
    """
    p = torch.where(valid, policy_logps / lengths.clamp(min=1), torch.zeros_like(policy_logps))  # (G, K), Eq. 1
    ordered = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] < scores[:, None, :])  # (G, K, K): r_i < r_j
    rank = (torch.relu(p[:, :, None] - p[:, None, :]) * ordered).sum((1, 2))  # (G,) Eq. 2, ties make no pair
    best = torch.where(valid, scores, torch.full_like(scores, -torch.inf)).argmax(-1)  # (G,) the first top-scored response
    sft = -p.gather(1, best[:, None]).squeeze(1)  # (G,) Eq. 3, the token-mean cross-entropy of the best response
    losses = rank_weight * rank + sft  # (G,) Eq. 4
    return losses, rank.detach(), sft.detach(), p.detach()


# --------------------------------------------------------------------------- data
FORMATS = (
    "accepted preference formats:\n"
    "  standard:        prompt, chosen, rejected as strings\n"
    "  conversational:  prompt, chosen, rejected as lists of {'role', 'content'} messages\n"
    "  implicit prompt: chosen, rejected only (strings or message lists), sharing the prompt as a prefix"
)
RANKED_FORMAT = (
    "accepted ranked format (one row per prompt):\n"
    "  prompt (a string or a message list), a list of k responses (strings, or one message list each) and a list of k scores;\n"
    "  the column names are --responses_column and --scores_column. Pairwise data is read as k = 2:\n"
)


def resolve_path(name: str) -> str:
    """A local path as given, else relative to this file (so the toy-world defaults work from any cwd), else a hub name."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    return name if os.path.exists(name) or not os.path.exists(here) else here


def load_splits(name: str, config: Optional[str], train_split: str, eval_split: str, holdout: int, seed: int):
    """(train, eval) datasets from a hub name, a local directory or a data file."""
    path = resolve_path(name)
    if os.path.isfile(path):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(path)[1])
        if kind is None:
            raise ValueError(f"don't know how to read {path!r}: use .json, .jsonl, .parquet or .csv")
        data = DatasetDict({"train": load_dataset(kind, data_files=path, split="train")})
    else:
        data = load_dataset(path, config)
    if train_split not in data:
        raise ValueError(f"split {train_split!r} not in {name!r}; it has {list(data)}")
    if eval_split in data:
        return data[train_split], data[eval_split]
    if holdout == 0:
        print(f"no {eval_split!r} split in {name!r} and eval_holdout=0: no evaluation")
        return data[train_split], None
    print(f"no {eval_split!r} split in {name!r}: holding out {holdout} rows of {train_split!r} for evaluation")
    parts = data[train_split].train_test_split(test_size=holdout, seed=seed)
    return parts["train"], parts["test"]


def is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def data_kind(dataset, name: str, responses_column: str, scores_column: str, need_scores: bool) -> str:
    """'ranked' or 'pairwise', whichever the columns are; stop early, naming the problem, if neither."""
    cols = set(dataset.column_names)
    if responses_column in cols:
        missing = [c for c in ("prompt", scores_column if need_scores else None) if c and c not in cols]
        if missing:
            raise ValueError(f"dataset {name!r} has a {responses_column!r} column but no {missing[0]!r} column (columns: {sorted(cols)}).\n"
                             f"{RANKED_FORMAT}{FORMATS}")
        return "ranked"
    if {"chosen", "rejected"} <= cols:
        return "pairwise"
    raise ValueError(f"dataset {name!r} has neither a {responses_column!r} column nor 'chosen' and 'rejected' (columns: {sorted(cols)}).\n"
                     f"{RANKED_FORMAT}{FORMATS}")


def row_texts(row: dict, index: int, tokenizer) -> Optional[tuple[str, str, str, bool]]:
    """(prompt, chosen, rejected, templated) as text, whichever format the row is in; None if a part is empty."""
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    chat = is_conversation(chosen)
    for col, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is None and col == "prompt":
            continue
        if not (is_conversation(value) if chat else isinstance(value, str)):
            kind = "a list of {'role', 'content'} messages" if chat else "a string"
            raise ValueError(f"row {index}: column {col!r} should be {kind} like 'chosen', got {type(value).__name__}: {str(value)[:80]!r}\n{FORMATS}")
    if prompt is None:  # implicit prompt: the shared prefix of chosen and rejected
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    if not prompt or (chat and not (chosen and rejected)):  # an empty text answer is kept: it is scored as its <eos>
        return None
    if not chat:
        return prompt, chosen, rejected, False
    if tokenizer.chat_template is None:
        raise ValueError("conversational rows need a tokenizer with a chat template; this tokenizer has none")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for response in (chosen, rejected):
        full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(f"row {index}: the chat template renders the conversation without the prompt as its prefix; cannot separate the response")
        # what follows the turn's end token is template layout (Qwen's "<|im_end|>\n"): drop it, so the <eos> is last
        texts.append(full[len(prompt_text) :].rstrip())
    return prompt_text, texts[0], texts[1], True


def split_implicit_prompt(chosen, rejected):
    """The longest shared prefix is the prompt: whole messages for conversations, whole words for text."""
    n = 0
    if isinstance(chosen, list):  # keep at least the last message as the response
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = max(chosen.rfind(" ", 0, n), 0)  # back up to a word boundary: "Assistant: I like" vs "... I hate"
    return chosen[:cut], chosen[cut:], rejected[cut:]


def group_texts(row: dict, index: int, tokenizer, kind: str, responses_column: str) -> Optional[tuple[str, list[str], bool]]:
    """(prompt, responses, templated) as text; None if the prompt or a response is empty. Pairwise rows give [chosen, rejected]."""
    if kind == "pairwise":
        texts = row_texts(row, index, tokenizer)
        return None if texts is None else (texts[0], [texts[1], texts[2]], texts[3])
    prompt, responses = row["prompt"], row[responses_column]
    chat = is_conversation(prompt)
    if not isinstance(responses, list) or not all(is_conversation(y) if chat else isinstance(y, str) for y in responses):
        kind_ = "a list of message lists (the prompt is one)" if chat else "a list of strings (the prompt is one)"
        raise ValueError(f"row {index}: column {responses_column!r} should be {kind_}, got {str(responses)[:80]!r}\n{RANKED_FORMAT}")
    if not (chat or isinstance(prompt, str)):
        raise ValueError(f"row {index}: column 'prompt' should be a string or a message list, got {type(prompt).__name__}: {str(prompt)[:80]!r}")
    if not prompt or (chat and not all(responses)):  # an empty text answer is kept: it is scored as its <eos>
        return None
    if not chat:
        return prompt, list(responses), False
    if tokenizer.chat_template is None:
        raise ValueError("conversational rows need a tokenizer with a chat template; this tokenizer has none")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for response in responses:
        full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError(f"row {index}: the chat template renders the conversation without the prompt as its prefix; cannot separate the response")
        texts.append(full[len(prompt_text) :].rstrip())  # as row_texts: the <eos> is last
    return prompt_text, texts, True


def tokenize_response(tokenizer, prompt: str, response: str, templated: bool) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) with prompt_ids + response_ids == tokenize(prompt + response) (+ eos).

    A merge across the boundary changes the prompt's last tokens; the tokens
    from the first difference on are the response (TRL does the same).
    """
    add_special = not templated  # a chat template already writes its own bos
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    full_ids = tokenizer(prompt + response, add_special_tokens=add_special)["input_ids"]
    n = 0
    while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
        n += 1
    response_ids = full_ids[n:]
    if not response_ids or response_ids[-1] != tokenizer.eos_token_id:  # an empty answer is its <eos> alone
        response_ids = response_ids + [tokenizer.eos_token_id]
    return full_ids[:n], response_ids


def check_scores(scores, index: int, scores_column: str) -> list[float]:
    if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        raise ValueError(f"row {index}: column {scores_column!r} should be a list of finite numbers, got {str(scores)[:80]!r}")
    return [float(s) for s in scores]


def tokenize_groups(dataset, tokenizer, max_length: int, max_prompt_length: int, desc: str, kind: str, responses_column: str,
                    scores_column: str, override: Optional[list] = None) -> list[dict]:
    """Each usable row as a group: its k sequences (prompt + response ids), where each response starts, and its k scores.

    Scores come from `override` (a reward model's, one list per row) if given,
    else from the scores column, else (pairwise rows) are (1, 0). Each
    response is truncated by dpo.py's rule: the prompt keeps its end, then the
    response its start.
    """
    rows, skipped, truncated, empty = [], Counter(), 0, 0
    for i, row in enumerate(tqdm(dataset, desc=f"tokenizing {desc}", leave=False)):
        texts = group_texts(row, i, tokenizer, kind, responses_column)
        if texts is None:
            skipped["empty prompt or response"] += 1
            continue
        prompt, responses, templated = texts
        if override is not None:
            scores = override[i]
        elif kind == "ranked":
            scores = check_scores(row[scores_column], i, scores_column)
        else:
            scores = [1.0, 0.0]
        if len(scores) != len(responses):
            skipped["responses and scores do not line up"] += 1
            continue
        if len(responses) < 2:
            skipped["fewer than 2 responses"] += 1
            continue
        if min(scores) == max(scores):
            skipped["all scores tied"] += 1
            continue
        seqs, starts = [], []
        for response in responses:
            p, r = tokenize_response(tokenizer, prompt, response, templated)
            if not p:  # the whole prompt merged into the response: nothing to condition on
                break
            if len(p) + len(r) > max_length:
                truncated += 1
                p = p[-max_prompt_length:]
                r = r[: max_length - len(p)]
            empty += r == [tokenizer.eos_token_id]
            seqs.append(p + r)
            starts.append(len(p))
        if len(seqs) < len(responses):
            skipped["empty prompt or response"] += 1
            continue
        rows.append({"seqs": seqs, "starts": starts, "scores": scores, "index": len(rows)})
    report = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    k = Counter(len(r["seqs"]) for r in rows)
    print(f"{desc}: {len(rows)} groups kept of {len(dataset)} (k: " + ", ".join(f"{n} x{c}" for n, c in sorted(k.items()))
          + f"; {empty} empty responses scored as <eos> alone); {truncated} responses truncated to {max_length} tokens; skipped: {report}")
    if not rows:
        raise ValueError(f"no usable groups in the {desc} split")
    return rows


def reward_model_scores(dataset, reward_model, tokenizer, max_length: int, max_prompt_length: int, desc: str, kind: str,
                        responses_column: str, batch_size: int, rank: int, world: int) -> list[Optional[list[float]]]:
    """The reward model's score of every response, one list per row (None where the row is unusable).

    Each text is tokenized with the reward model's own tokenizer and chat
    template, and read where its forward reads it: the last token that is not
    padding (how reward_model.py trains it). The ranks split the texts.
    """
    device = next(reward_model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs, owner = [], []  # every (prompt + response) sequence, and its (row, slot)
    for i, row in enumerate(dataset):
        texts = group_texts(row, i, tokenizer, kind, responses_column)
        for j, response in enumerate(texts[1] if texts is not None else []):
            p, r = tokenize_response(tokenizer, texts[0], response, texts[2])
            if len(p) + len(r) > max_length:
                p = p[-max_prompt_length:]
                r = r[: max_length - len(p)]
            seqs.append(p + r)
            owner.append((i, j))
    counts = Counter(i for i, _ in owner)
    scores: list[Optional[list[float]]] = [[0.0] * counts[i] if i in counts else None for i in range(len(dataset))]
    order = sorted(range(len(seqs)), key=lambda s: len(seqs[s]))  # similar lengths together: less padding
    flat = torch.zeros(len(seqs), device=device)
    with torch.no_grad():
        for s in tqdm(range(0, len(order), batch_size * world), desc=f"scoring {desc} with the reward model", leave=False):
            chunk, n = rank_share(order[s : s + batch_size * world], rank, world)
            width = max(len(seqs[c]) for c in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, c in enumerate(chunk):
                input_ids[b, : len(seqs[c])] = torch.tensor(seqs[c])
                attention_mask[b, : len(seqs[c])] = 1
            logits = reward_model(lambda m, **inputs: m(**inputs).logits, input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
            flat[torch.tensor(chunk[:n], dtype=torch.long, device=device)] = logits[:n, 0].float()
    if world > 1:
        dist.all_reduce(flat)  # each text was scored on one rank, and is 0 on the others
    for c, v in enumerate(flat.tolist()):
        i, j = owner[c]
        scores[i][j] = v
    return scores


def pair_agreement(a: list[list[float]], b: list[list[float]]) -> float:
    """Fraction of the response pairs that both a and b order strictly on which they agree (a reward model against the data's scores)."""
    agree = total = 0
    for x, y in zip(a, b):
        for i in range(len(x)):
            for j in range(i + 1, len(x)):
                if x[i] != x[j] and y[i] != y[j]:
                    total += 1
                    agree += (x[i] < x[j]) == (y[i] < y[j])
    return agree / max(total, 1)


def group_order(rows: list[dict], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """One epoch of batches of groups (row indices), a pure function of (seed, epoch) so a resumed run replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(rows), generator=g).tolist()
    if group_by_length:  # sort within mega-batches of 64 batches by total tokens, then shuffle the batches
        mega = 64 * batch_size
        size = lambda i: sum(len(s) for s in rows[i]["seqs"])  # noqa: E731
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=size, reverse=True)]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def collate_groups(rows: list[dict], pad_id: int) -> dict:
    """Every response of every group in one right-padded batch of N = sum_g k_g rows, with where each belongs.

    `targets` holds the next token at each position and -100 where it is not
    a response token, so log-probs are gathered at response positions only.
    `group`, `slot` (N,) place each row in the (G, K) grid; `scores` (G, K)
    and `valid` (G, K) are that grid, padded for groups with fewer than K.
    """
    seqs = [s for r in rows for s in r["seqs"]]
    starts = [s for r in rows for s in r["starts"]]
    width, k = max(len(s) for s in seqs), max(len(r["seqs"]) for r in rows)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), width), -100, dtype=torch.long)
    for b, (seq, start) in enumerate(zip(seqs, starts)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        targets[b, start - 1 : len(seq) - 1] = torch.tensor(seq[start:])  # position t predicts token t+1
    scores = torch.zeros((len(rows), k))
    valid = torch.zeros((len(rows), k), dtype=torch.bool)
    for g, r in enumerate(rows):
        scores[g, : len(r["scores"])] = torch.tensor(r["scores"])
        valid[g, : len(r["scores"])] = True
    group = torch.tensor([g for g, r in enumerate(rows) for _ in r["seqs"]])
    slot = torch.tensor([j for r in rows for j in range(len(r["seqs"]))])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets, "group": group, "slot": slot,
            "scores": scores, "valid": valid, "index": torch.tensor([r["index"] for r in rows])}


# --------------------------------------------------------------------------- log-probs
def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens of each row, and their counts.

    The transformer body runs on the whole batch (N, T); the LM head and a
    float32 log-softmax run only at the positions that predict a response
    token, so no (N, T, V) logits tensor is ever built.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
    mask = targets != -100  # (N, T)
    logits = model.get_output_embeddings()(hidden[mask]).float()  # (M, V), M = response tokens in the batch
    config = model.config.get_text_config()  # what each model's forward does to its logits after the LM head:
    if getattr(config, "logits_scaling", None):  # Granite divides them
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):  # Cohere multiplies them
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3 soft-cap them
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    token_logps = logits.gather(-1, targets[mask][:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (M,)
    row = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(mask)[mask]  # (M,) row of each token
    sums = torch.zeros(len(input_ids), device=input_ids.device).index_add_(0, row, token_logps)  # (N,)
    return sums, mask.sum(-1)


def group_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of every response, each (G, K) (0 where a group has no K-th response), from one forward."""
    sums, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["targets"])  # (N,), (N,)
    logps = torch.zeros(batch["valid"].shape, device=sums.device, dtype=sums.dtype)
    lengths = torch.zeros(batch["valid"].shape, device=sums.device, dtype=counts.dtype)
    logps = logps.index_put((batch["group"], batch["slot"]), sums)  # out of place, so gradients flow
    lengths[batch["group"], batch["slot"]] = counts
    return logps, lengths


# --------------------------------------------------------------------------- training
def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU per process
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rrhf_metrics(prefix: str, losses, rank, sft, p, scores, valid) -> dict:
    """Step metrics of a batch of groups, each a mean over its groups, so that batches and ranks combine by group counts."""
    ordered = valid[:, :, None] & valid[:, None, :] & (scores[:, :, None] < scores[:, None, :])  # (G, K, K): r_i < r_j
    right = ordered & (p[:, :, None] < p[:, None, :])
    untied = ordered.sum((1, 2))  # (G,) no group is all tied
    tau = (2 * right.sum((1, 2)) - untied) / untied.clamp(min=1)  # (concordant - discordant) / untied pairs
    return {
        f"{prefix}/loss": losses.mean().item(),
        f"{prefix}/rank": rank.mean().item(),
        f"{prefix}/sft": sft.mean().item(),
        f"{prefix}/p/best": (-sft).mean().item(),
        f"{prefix}/p/mean": ((p * valid).sum(-1) / valid.sum(-1)).mean().item(),
        f"{prefix}/p/pair_accuracy": (right.sum((1, 2)) / untied.clamp(min=1)).mean().item(),
        f"{prefix}/p/kendall_tau": tau.mean().item(),
    }


def enable_gradient_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --------------------------------------------------------------------------- several processes: torchrun, DDP, FSDP2
def init_distributed() -> tuple[int, int]:
    """(rank, world_size). torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python X.py` is rank 0 of 1.

    Ranks other than 0 print nothing and draw no progress bars; their errors still reach stderr.
    """
    if "RANK" not in os.environ:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)  # one group for the process, however many runs it trains
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
        tqdm.__init__ = functools.partialmethod(tqdm.__init__, disable=True)
    return dist.get_rank(), dist.get_world_size()


class Forward(torch.nn.Module):
    """Runs fn(model, ...) as this module's forward.

    DDP syncs gradients, and FSDP2 gathers sharded weights, only around a
    module's forward (they hook __call__), while the log-prob code calls the
    model's body and LM head separately and generation calls it token by
    token. So every call on a model goes through this module; on one process
    it changes nothing.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def wrap(model, world: int, fsdp: bool, bf16: bool, trained: bool):
    """model inside Forward: sharded per decoder layer with FSDP2 (--fsdp), else under DDP if trained on several ranks."""
    wrapped = Forward(model)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 compute on CUDA; the sharded master weights, the optimizer and the gradient reduction stay float32
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
            fully_shard(layer, mp_policy=mixed)
        # the rest (embeddings, final norm, heads; tied weights stay together). reshard_after_forward=True: by default the
        # root keeps its weights gathered after a forward, for the backward; after a no-grad forward (evaluation,
        # generation, a frozen model) no backward comes, and the optimizer and the state dict would then see the
        # gathered copies instead of the shards
        fully_shard(wrapped, mp_policy=mixed, reshard_after_forward=True)
    elif world > 1 and trained:
        device = next(model.parameters()).device
        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


def unwrap(model):
    """The Hugging Face model inside Forward (and DDP)."""
    return (model.module if isinstance(model, DDP) else model).model


def rank_share(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's contiguous part of a global batch, and how many of its items are real.

    Every rank gets the same number of items, because DDP and FSDP2 need
    every rank in every forward and backward: a short part is filled with
    stand-ins (the batch's first item), which the caller weights 0.
    """
    size = -(-len(items) // world)
    share = items[rank * size : (rank + 1) * size]
    return share + items[:1] * (size - len(share)), len(share)


def all_sum(values: dict, device) -> dict:
    """Each value summed over the ranks, in one all-reduce (unchanged on one process)."""
    if not dist.is_initialized():
        return dict(values)
    keys = list(values)  # the same order on every rank: the same code filled it
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dict(zip(keys, total.tolist()))


def sync_gradients(model, sync: bool):
    """Context for one micro-batch: gradients are reduced across ranks only on the last of an optimizer step."""
    if isinstance(model, DDP):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_, returning the norm before clipping as a plain tensor (FSDP2 returns a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_state_dict(model) -> Optional[dict]:
    """Under FSDP2, the inner model's whole state dict gathered on CPU (every rank must call this); else None."""
    if not hasattr(model, "reshard"):  # not an FSDP2 module: the model holds its full weights
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = unwrap(model)
    tied = dict(inner.named_parameters(remove_duplicate=False)).keys() - dict(inner.named_parameters()).keys()
    return {k.removeprefix("model."): v for k, v in weights.items() if k.removeprefix("model.") not in tied}  # as save_pretrained writes them


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state for a checkpoint; under FSDP2 gathered whole, keyed by parameter name (every rank calls this)."""
    if not any(hasattr(m, "reshard") for m in model.modules()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """The inverse of optimizer_state: each rank takes its own shards from the whole state."""
    if not any(hasattr(m, "reshard") for m in model.modules()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def rank_rng_states(world: int) -> list:
    """Every rank's RNG states, gathered so that rank 0 can save them (every rank must call this)."""
    states = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    return states


def save_model(path: str, model) -> None:
    """The inner model as a Hugging Face directory; FSDP2 shards are gathered first. Every rank calls it, rank 0 writes."""
    weights = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        unwrap(model).save_pretrained(path, state_dict=weights)


def save(path: str, model, tokenizer, args: Args, state: Optional[dict] = None) -> None:
    """An HF model directory (safetensors + tokenizer + args.json); with `state`, also what resuming needs.

    Every rank calls it (FSDP2 gathers the shards); rank 0 writes.
    """
    save_model(path, model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tokenizer.save_pretrained(path)
        with open(os.path.join(path, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        if state is not None:
            torch.save(state, os.path.join(path, "training_state.pt"))
    if dist.is_initialized():
        dist.barrier()  # nobody reads a checkpoint before it is written


def train(args: Args) -> dict:
    if not 0 < args.max_prompt_length < args.max_length:  # 0 would keep the whole prompt: pc[-0:] == pc
        raise ValueError(f"max_prompt_length ({args.max_prompt_length}) must be positive and below max_length ({args.max_length}) to leave room for a response")
    rank, world = init_distributed()
    if args.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp shards the models across processes: launch with torchrun --nproc_per_node N")
    seed_everything(args.seed)  # the same on every rank while the models load
    device = pick_device(args.device)
    use_bf16 = args.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    # ---- the policy and tokenizer: no reference model
    policy_path = resolve_path(args.resume_from or args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {policy_path!r} has no eos token; responses need one")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id  # padding is masked
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).to(device)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.config.use_cache = False
    policy = wrap(model, world, args.fsdp, use_bf16, trained=True)
    state = None
    if args.resume_from:
        state_file = os.path.join(policy_path, "training_state.pt")
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"--resume_from needs a checkpoint directory written with --save_steps (output_dir/checkpoint-N); "
                                    f"{policy_path!r} has no training_state.pt")
        state = torch.load(state_file, weights_only=False)
    if world > 1:
        seed_everything(args.seed + 100_003 * rank)  # each rank its own stream (dropout)

    # ---- data, and the reward model's scores where it replaces the data's
    train_data, eval_data = load_splits(args.dataset_name, args.dataset_config, args.train_split, args.eval_split, args.eval_holdout, args.seed)
    splits = [("train", train_data)] + ([("eval", eval_data)] if eval_data is not None else [])
    kinds = {desc: data_kind(data, args.dataset_name, args.responses_column, args.scores_column, args.reward_model_path is None)
             for desc, data in splits}
    overrides = {desc: None for desc, _ in splits}
    if args.reward_model_path:
        rm_path = resolve_path(args.reward_model_path)
        scorer = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).to(device)
        if scorer.config.num_labels != 1:
            raise ValueError(f"the reward model {rm_path!r} has {scorer.config.num_labels} labels; a scalar reward needs 1")
        reward_model = wrap(scorer.eval().requires_grad_(False), world, args.fsdp, use_bf16, trained=False)
        rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
        for desc, data in splits:
            with autocast():
                overrides[desc] = reward_model_scores(data, reward_model, rm_tokenizer, args.max_length, args.max_prompt_length, desc,
                                                      kinds[desc], args.responses_column, args.per_device_reward_batch_size, rank, world)
            given = [(o, row[args.scores_column] if kinds[desc] == "ranked" else [1.0, 0.0]) for o, row in zip(overrides[desc], data)
                     if o is not None and (kinds[desc] == "pairwise" or args.scores_column in data.column_names)]
            if given:
                print(f"{desc}: the reward model orders {pair_agreement(*zip(*given)):.1%} of the data's strictly ordered pairs as the data does")
        del reward_model, scorer
    train_rows = tokenize_groups(train_data, tokenizer, args.max_length, args.max_prompt_length, "train", kinds["train"],
                                 args.responses_column, args.scores_column, overrides["train"])
    eval_rows = []
    if eval_data is not None:
        eval_rows = tokenize_groups(eval_data, tokenizer, args.max_length, args.max_prompt_length, "eval", kinds["eval"],
                                    args.responses_column, args.scores_column, overrides["eval"])
    batch_size = args.per_device_train_batch_size * world  # one micro-batch over all ranks
    batches_per_epoch = math.ceil(len(train_rows) / batch_size)
    if batches_per_epoch < args.gradient_accumulation_steps:
        raise ValueError(f"{len(train_rows)} training groups make {batches_per_epoch} micro-batches of {batch_size}, "
                         f"fewer than gradient_accumulation_steps={args.gradient_accumulation_steps}")
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs

    def batch_losses(batch: dict, split: str, n: int) -> tuple[torch.Tensor, dict]:
        """RRHF losses of one batch of groups, and the step metrics of its n real groups (of its stand-in if n = 0)."""
        with autocast():
            logps, lengths = policy(group_logps, batch)
        losses, hinge, sft, p = rrhf_loss(logps, lengths, batch["scores"], batch["valid"], args.rank_weight)
        real = slice(max(n, 1))
        return losses, rrhf_metrics(split, *(x[real] for x in (losses, hinge, sft, p, batch["scores"], batch["valid"])))

    @torch.no_grad()
    def evaluate() -> dict:
        policy.eval()
        totals = Counter()
        eval_batch = args.per_device_eval_batch_size * world
        for s in range(0, len(eval_rows), eval_batch):
            rows, n = rank_share(eval_rows[s : s + eval_batch], rank, world)
            batch = to_device(collate_groups(rows, pad_id), device)
            losses, metrics = batch_losses(batch, "eval", n)
            totals.update({k: v * n for k, v in metrics.items()})
            totals["count"] += n
        policy.train()
        totals = all_sum(totals, device)
        return {k: v / totals["count"] for k, v in totals.items() if k != "count"}

    # ---- optimizer and schedule: linear warmup, then linear decay to 0
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = int(args.warmup_ratio * total_steps)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_step = 0
    if state is not None:
        load_optimizer_state(policy, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
        else:
            print(f"the checkpoint has RNG states for {len(state['rng'])} processes, not {world}: they are not restored")
        start_step = state["step"]
        print(f"resumed from {args.resume_from} at step {start_step}")

    run = None
    if args.track and rank == 0:
        import wandb  # imported here so that importing this file stays silent and fast

        run = wandb.init(project=args.wandb_project, name=args.run_name, config=asdict(args))

    # ---- the loop
    orders: dict[int, list[list[int]]] = {}

    def micro_batches(step: int):
        """This rank's part of each micro-batch of optimizer step `step`, wherever the epoch boundaries fall."""
        per_epoch = steps_per_epoch * args.gradient_accumulation_steps
        for m in range(args.gradient_accumulation_steps):
            epoch, i = divmod(step * args.gradient_accumulation_steps + m, per_epoch)
            if epoch not in orders:  # one order for every rank: it depends on the seed and the global batch only
                orders[epoch] = group_order(train_rows, batch_size, args.seed, epoch, args.group_by_length)
            rows = [train_rows[j] for j in orders[epoch][i]]
            yield m, epoch + i / per_epoch, len(rows), *rank_share(rows, rank, world)

    policy.train()
    metrics: dict = {}
    last_good = args.resume_from
    progress = tqdm(range(start_step, total_steps), desc="rrhf", initial=start_step, total=total_steps)
    for step in progress:
        t0, sums = time.perf_counter(), Counter()
        for m, epoch, global_n, rows, n in micro_batches(step):
            batch = to_device(collate_groups(rows, pad_id), device)
            with sync_gradients(policy, m == args.gradient_accumulation_steps - 1):
                losses, batch_metrics = batch_losses(batch, "train", n)
                if not torch.isfinite(losses).all():
                    raise FloatingPointError(f"loss is {losses.mean().item()} at step {step}; stopping. Last good checkpoint: {last_good or 'none saved'}")
                # the mean over the global micro-batch: DDP averages the ranks' gradients, so each rank's sum is scaled by world
                (losses[:n].sum() * world / (global_n * args.gradient_accumulation_steps)).backward()
            sums.update({k: v * n for k, v in batch_metrics.items()})
            sums.update({"count": n, "tokens": int(batch["attention_mask"][batch["group"] < n].sum())})
        grad_norm = clip_gradients(policy, args.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"gradient norm is {grad_norm.item()} at step {step}; stopping. Last good checkpoint: {last_good or 'none saved'}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sums = all_sum(sums, device)
        metrics = {k: v / sums["count"] for k, v in sums.items() if k not in ("count", "tokens")}
        metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item(), "train/epoch": epoch,
                        "perf/tokens_per_sec": sums["tokens"] / (time.perf_counter() - t0)})
        done = step + 1
        if eval_rows and ((args.eval_steps and done % args.eval_steps == 0) or done == total_steps):
            metrics.update(evaluate())
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/p/pair_accuracy']:.2f}")
        if done % args.logging_steps == 0 or done == total_steps:
            tqdm.write(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if run is not None:
            run.log(metrics, step=done)
        if args.save_steps and done % args.save_steps == 0 and done < total_steps:
            last_good = os.path.join(args.output_dir, f"checkpoint-{done}")
            save(last_good, policy, tokenizer, args, {"step": done, "optimizer": optimizer_state(policy, optimizer), "scheduler": scheduler.state_dict(),
                                                      "rng": rank_rng_states(world)})
    save(args.output_dir, policy, tokenizer, args)
    if run is not None:
        run.finish()
    return metrics


if __name__ == "__main__":
    train(tyro.cli(Args, use_underscores=True))
