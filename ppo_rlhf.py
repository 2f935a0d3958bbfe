"""RLHF with PPO in one file, with an RLOO (REINFORCE leave-one-out) option.

Papers: Ouyang et al. 2022, "Training language models to follow instructions
with human feedback" (InstructGPT), https://arxiv.org/abs/2203.02155;
Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
https://arxiv.org/abs/1707.06347; Ahmadian et al. 2024, "Back to Basics:
Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
LLMs", https://arxiv.org/abs/2402.14740

Objective (InstructGPT Eq. 2, without the pretraining term):

    max_pi  E_{x, y ~ pi}[ r_phi(x, y) ] - beta * KL[ pi(.|x) || pi_ref(.|x) ]

whose maximiser is pi*(y|x) = pi_ref(y|x) exp(r_phi(x,y)/beta) / Z(x), with
r_phi the reward model's score. Each response token t earns the reward
-beta * kl_t (kl_t = log pi(y_t) - log pi_ref(y_t), the k1 estimator), and the
last token (the EOS) also earns the score. Advantages come from GAE(gamma,
lambda) with a learned value model, are whitened, and train the clipped
surrogate (PPO Eq. 7) for several epochs per rollout; the value loss is
clipped too.

Conventions and deviations
- The value model is a separate network initialised from the reward model
  (InstructGPT); `--value_model_init policy` starts it from the policy with a
  new scalar head.
- `--kl_estimator k3` uses kl_t = (rho - 1) - log rho, rho = pi_ref/pi
  (http://joschu.net/blog/kl-approx.html), as TRL offers. Its mean is the KL
  too, but as a reward its score-function gradient is not the KL's: a token
  with pi < pi_ref is penalised by about beta * pi_ref/pi and so pushed further
  down. The fixed point is not pi*; on a 6-armed bandit PPO with k3 drives two
  arms that pi* keeps (one with 52% of its mass) to 0 (tests/test_ppo_bandit.py).
  k1, the default, has pi* as its fixed point.
- Losses are token means over each minibatch (every response token weighs
  the same), as in TRL and summarize_from_feedback_details.
- `--advantage_estimator rloo`: no value model. Each prompt gets `--rloo_k`
  responses; a response's return is its summed per-token reward
  (score - beta * sum_t kl_t) and its advantage is that return minus the mean
  of the other k-1 (Ahmadian et al. Sec. 3; Kool et al. 2019), given to every one of its tokens.
  These advantages are whitened too by default (Ahmadian et al. do not
  normalise them; `--whiten_advantages False` undoes it). With that, one epoch
  and one minibatch, the loss is REINFORCE-LOO up to the token-mean scale;
  more epochs add PPO's clipping.
- Responses are cut after the first EOS; one that has none within
  `--max_new_tokens` is scored at its last token, minus `--missing_eos_penalty`
  (0 by default), and its end is treated as terminal (V = 0), as in TRL.
- Sampling uses `--temperature`; the policy and reference log-probs use the
  same temperature (as TRL), so the policy being optimised is the one sampled.
  Each token is drawn by inverting the softmax's CDF at the row's own uniform
  number (seeded per rollout), not by torch.multinomial on the batch: the same
  distribution, and a row's sample no longer depends on its batch or on the
  number of processes.
- The reward model must share the policy's tokenizer; it is a
  *ForSequenceClassification model with one label (reward_model.py makes
  one), read where its own forward reads it: the last non-padding token, the
  EOS. The value model's head is read at every position that predicts a
  response token: V of the state before that token.
- The reference, reward and value models run in float32 like the policy,
  under the same bf16 autocast on CUDA, so kl_t = 0 exactly at the start.
- Dropout is switched off in every model: PPO's ratio compares two passes of
  the same function.

Usage
    python reward_model.py && python ppo_rlhf.py   # the embedded toy world: a reward model (runs/reward_model), then PPO against it; any CPU, 1-2 minutes each
    python reward_model.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --dataset_name trl-lib/tldr-preference --eval_split validation --learning_rate 1e-5 \
        --num_train_epochs 1 --output_dir runs/rm-tldr            # a TL;DR reward model, then:
    python ppo_rlhf.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
        --reward_model_path runs/rm-tldr --dataset_name trl-lib/tldr \
        --max_prompt_length 512 --max_new_tokens 53 --missing_eos_penalty 1.0 \
        --beta 0.05 --learning_rate 3e-6 --num_rollouts 1000 --rollout_batch_size 64 \
        --per_device_train_batch_size 16 --gradient_accumulation_steps 4 --forward_batch_size 64 \
        --eval_steps 50 --save_steps 200 --gradient_checkpointing --output_dir runs/ppo-qwen
    python ppo_rlhf.py --advantage_estimator rloo --rloo_k 4 --rollout_batch_size 16   # RLOO: 16 prompts x 4 answers
    python ppo_rlhf.py --resume_from runs/ppo/checkpoint-100     # continue a run exactly
The real-model recipe has not been run (no GPU and no downloads where this was written).

Several GPUs (torchrun; a plain `python ppo_rlhf.py` needs none of it)
    torchrun --nproc_per_node 4 ppo_rlhf.py <the flags above> --rollout_batch_size 16 --forward_batch_size 16
        # DDP: each process generates rollout_batch_size prompts' responses; the rollout is then shared, so
        # whitening and minibatches (per_device_train_batch_size x 4 x gradient_accumulation_steps responses)
        # are global, and the run is the one-process run with the same global sizes (tested on CPU)
    torchrun --nproc_per_node 8 ppo_rlhf.py <the flags above> --fsdp   # FSDP2: all four models sharded per decoder layer

Each rollout (one "step" below): generate, cut after EOS, score, take the
policy, reference and value passes (one no-grad pass each), build per-token
rewards and advantages, then num_ppo_epochs passes over minibatches of
per_device_train_batch_size * processes * gradient_accumulation_steps
responses, one optimizer step each.

Logged metrics (one dict per rollout; printed every --logging_steps, and to wandb with --track)
    objective/kl                mean over responses of sum_t kl_t (the estimator in use): KL(pi || pi_ref) estimate
    objective/score             mean reward-model score (after the missing-EOS penalty)
    objective/rlhf_reward       objective/score - beta * objective/kl: the quantity maximised
    objective/entropy           mean over responses of the summed per-token entropy of pi
    policy/approxkl             0.5 * mean (log pi_new - log pi_old)^2 over update tokens
    policy/clipfrac             fraction of update tokens where the clipped surrogate is active
    loss/policy, loss/value     clipped policy loss and clipped value loss (token means)
    val/error                   mean squared error of the value predictions against the returns
    val/clipfrac                fraction of tokens where the clipped value loss is active
    val/grad_norm               value-model gradient norm before clipping
                                (policy/, loss/, val/ and train/grad_norm: means over the rollout's optimizer steps)
    rollout/length              mean response length in tokens (EOS included)
    rollout/no_eos              fraction of responses with no EOS within max_new_tokens
    train/lr, train/grad_norm   learning rate, and the policy's gradient norm before clipping
    train/episodes              responses generated so far
    perf/tokens_per_sec         non-padding prompt + response tokens of the rollout per second of the whole step
    perf/generated_tokens_per_sec  response tokens per second of generation
    time/{generate,score,policy_forward,ref_forward,value_forward,update,step}  seconds in each phase
    eval/score                  mean score of one sampled response per held-out prompt, every --eval_steps
                                (with a printed table of prompts, responses and scores; a wandb.Table with --track)
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
from typing import Literal, Optional

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
    ref_model_name_or_path: Optional[str] = None
    """frozen reference model pi_ref; None means the starting policy (model_name_or_path)"""
    reward_model_path: str = "runs/reward_model"
    """reward model r_phi: a sequence-classification model with one label sharing the policy's tokenizer
    (the default is where `python reward_model.py` saves its model)"""
    dataset_name: str = "toy_world/prompts"
    """prompts: a hub name, a local directory or a data file with a 'prompt' column (text, or a list of messages)"""
    dataset_config: Optional[str] = None
    """the dataset's configuration name, if it has several"""
    train_split: str = "train"
    """split to draw rollout prompts from"""
    eval_split: str = "test"
    """held-out prompts for evaluation; if the dataset has none, `eval_holdout` rows of the train split are held out"""
    eval_holdout: int = 512
    """rows held out from the train split when the dataset has no `eval_split` (0: no evaluation)"""
    max_prompt_length: int = 256
    """tokens kept from the end of a longer prompt"""
    max_new_tokens: int = 5
    """response budget in tokens, EOS included (the toy world's answers are at most 4 words + EOS)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are taken at the same temperature"""
    # ---- PPO
    beta: float = 0.1
    """beta of InstructGPT Eq. 2: the per-token KL penalty toward pi_ref (smaller moves further)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL in the reward: k1 = log pi - log pi_ref (exact fixed point pi*), k3 = (rho - 1) - log rho"""
    missing_eos_penalty: float = 0.0
    """subtracted from the score of a response with no EOS within max_new_tokens (0 = off)"""
    advantage_estimator: Literal["gae", "rloo"] = "gae"
    """gae: GAE with a value model (PPO); rloo: leave-one-out baseline over rloo_k responses per prompt (no value model)"""
    rloo_k: int = 4
    """responses per prompt with --advantage_estimator rloo"""
    gamma: float = 1.0
    """GAE discount gamma"""
    lam: float = 0.95
    """GAE lambda"""
    whiten_advantages: bool = True
    """normalise advantages to mean 0 and variance 1 over the rollout's response tokens"""
    cliprange: float = 0.2
    """PPO ratio clip epsilon (PPO Eq. 7)"""
    cliprange_value: float = 0.2
    """value predictions move at most this far from the rollout's values before the value loss is clipped"""
    value_model_init: Literal["reward_model", "policy"] = "reward_model"
    """initialise the value model from the reward model (InstructGPT) or from the policy with a new head"""
    # ---- optimisation
    learning_rate: float = 3e-4
    """peak AdamW learning rate of the policy and the value model (the toy world's; about 3e-6 suits a real 0.5-7B model)"""
    num_rollouts: int = 100
    """rollouts (generate, then num_ppo_epochs of updates) in the run"""
    rollout_batch_size: int = 64
    """prompts per rollout on each process (each gets rloo_k responses with --advantage_estimator rloo)"""
    num_ppo_epochs: int = 4
    """passes over each rollout"""
    per_device_train_batch_size: int = 32
    """responses per micro-batch in the update, on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step (a PPO minibatch is their union)"""
    forward_batch_size: int = 64
    """responses per batch in generation and in the no-grad passes (log-probs, reference, values, scores)"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warmup; the rest decays linearly to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold (the policy and the value model separately)"""
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
    """print metrics every this many rollouts"""
    eval_steps: int = 100
    """answer held-out prompts and print a sample table every this many rollouts (0 = only at the end)"""
    num_eval_prompts: int = 64
    """held-out prompts answered at each evaluation (the first ones of the split)"""
    num_printed_samples: int = 8
    """rows of the printed sample table (wandb gets them all)"""
    save_steps: int = 0
    """save a resumable checkpoint every this many rollouts (0 = only the final model)"""
    output_dir: str = "runs/ppo"
    """where the final model (and value_model/) and checkpoints go"""
    resume_from: Optional[str] = None
    """a checkpoint directory written by this script (output_dir/checkpoint-N) to continue from"""
    seed: int = 1
    """seed for python, numpy and torch, the prompt order, sampling and the held-out split"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "single-file-alignment"
    """wandb project"""
    run_name: Optional[str] = None
    """wandb run name"""


# --------------------------------------------------------------------------- the method
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the entries where mask is true; x and mask of the same shape."""
    return (x * mask).sum() / mask.sum()


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs, all (B, R).

    k1 = log pi - log pi_ref; k3 = (rho - 1) - log rho with rho = pi_ref / pi,
    non-negative and of lower variance (http://joschu.net/blog/kl-approx.html).
    """
    log_ratio = logps - ref_logps  # (B, R)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown kl estimator {estimator!r}")


def penalised_scores(scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_penalty: float) -> torch.Tensor:
    """scores (B,) minus missing_eos_penalty where has_eos (B,) is False."""
    return torch.where(has_eos, scores, scores - missing_eos_penalty)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, has_eos: torch.Tensor, beta: float,
                  missing_eos_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * kl_t at every response token, plus the score at the last one (InstructGPT Eq. 2).

    scores (B,) reward-model scores; kl (B, R) per-token KL estimates; mask (B, R)
    response tokens (a prefix of each row, EOS included); has_eos (B,) bool.
    Returns rewards (B, R), zero outside the mask, and the scores after the
    missing-EOS penalty (B,). rewards.sum(-1) is each response's RLHF reward.
    """
    scores = penalised_scores(scores, has_eos, missing_eos_penalty)  # (B,)
    rewards = -beta * kl * mask  # (B, R)
    last = mask.sum(-1).long() - 1  # (B,) index of the last response token: the EOS, or where the budget ran out
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards, scores


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438 Eq. 16).

    rewards, values, mask: (B, R); mask is a prefix of each row. values[:, t] is
    V of the state before response token t; the state after the last token is
    terminal (V = 0). Returns advantages (B, R) and returns = advantages + values
    (B, R), both zero outside the mask.
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019).

    returns (B,), B = n * k, the k responses of each prompt contiguous. Each
    response's baseline is the mean return of the other k - 1: returns (B,).
    """
    r = returns.view(-1, k)  # (n, k)
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).view(-1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over the masked entries (std with Bessel's correction), zero outside the mask; same shape."""
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (mask.sum() - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    cliprange: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss per token (PPO Eq. 7, negated to be minimised).

    logps (B, R) log-probs of the sampled tokens under the policy being trained;
    old_logps (B, R) under the policy that sampled them; advantages (B, R).
    Returns losses (B, R) = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),
    and, detached, clipped (B, R) (the clipped term is the larger) and
    approxkl (B, R) = (log ratio)^2 / 2.
    """
    log_ratio = logps - old_logps  # (B, R)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach(), (0.5 * log_ratio**2).detach()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss per token (as in OpenAI baselines' ppo2 and InstructGPT's PPO).

    values (B, R) predictions being trained; old_values (B, R) the rollout's;
    returns (B, R) targets. Returns losses (B, R) =
    max((v - G)^2, (v_old + clip(v - v_old, -c, c) - G)^2) / 2 and clipped (B, R), detached.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each sampled response after its first EOS.

    responses (B, R) sampled ids. Returns the responses with every token after
    the first EOS replaced by pad_id (B, R), the mask of kept tokens (B, R, EOS
    included) and has_eos (B,).
    """
    is_eos = responses == eos_id
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return responses.masked_fill(after, pad_id), ~after, is_eos.any(-1)


# --------------------------------------------------------------------------- data
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


def tokenize_prompts(dataset, tokenizer, max_prompt_length: int, desc: str) -> list[list[int]]:
    """Token ids of every prompt: message lists through the chat template (with the generation prompt), text as is."""
    if "prompt" not in dataset.column_names:
        raise ValueError(f"the {desc} split has no column 'prompt' (columns: {sorted(dataset.column_names)}); "
                         "it should hold text, or a list of {'role', 'content'} messages")
    prompts, truncated, skipped = [], 0, 0
    for i, prompt in enumerate(dataset["prompt"]):
        if not prompt:
            skipped += 1
            continue
        if is_conversation(prompt):
            if tokenizer.chat_template is None:
                raise ValueError("conversational prompts need a tokenizer with a chat template; this tokenizer has none")
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own bos
        elif isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
        else:
            raise ValueError(f"row {i}: 'prompt' should be a string or a list of {{'role', 'content'}} messages, got {type(prompt).__name__}")
        truncated += len(ids) > max_prompt_length
        prompts.append(ids[-max_prompt_length:])  # keep the end: the question next to the answer
    print(f"{desc}: {len(prompts)} prompts kept of {len(dataset)}; {truncated} truncated to their last {max_prompt_length} tokens; {skipped} empty skipped")
    if not prompts:
        raise ValueError(f"no usable prompts in the {desc} split")
    return prompts


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """One epoch's order of the n prompts, a pure function of (seed, epoch) so a resumed run replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 3 * epoch)).tolist()


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, P): prompts left-padded so that every response starts at column P."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


def pad_right(x: torch.Tensor, width: int, value) -> torch.Tensor:
    """(B, W) -> (B, width), filled with value."""
    return torch.cat([x, x.new_full((len(x), width - x.shape[1]), value)], dim=1)


# --------------------------------------------------------------------------- generation and forward passes
def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits from final hidden states (..., H) -> (..., V), as the model's own forward makes them."""
    logits = model.get_output_embeddings()(hidden).float()
    config = model.config.get_text_config()
    if getattr(config, "logits_scaling", None):  # Granite divides them
        logits = logits / config.logits_scaling
    if getattr(config, "logit_scale", None):  # Cohere multiplies them
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3 soft-cap them
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def generate(model, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float, eos_id: int,
             uniforms: torch.Tensor) -> torch.Tensor:
    """Sample up to max_new_tokens after each left-padded query (B, P) with the KV cache; returns ids (B, R).

    Token t of row b is drawn by inverting the CDF at uniforms[b, t] (B, max_new_tokens), so a row's sample depends on
    its own draws only, not on the rows it is batched with or on the number of processes. Stops once every row (on
    every rank) has sampled an EOS; what a row samples after its EOS is cut by truncate_after_eos.
    """
    position_ids = (query_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding must not shift positions
    out = model(input_ids=query, attention_mask=query_mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    attention_mask, position = query_mask, position_ids[:, -1:]
    tokens, done = [], torch.zeros(len(query), dtype=torch.bool, device=query.device)
    while True:
        cdf = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1).cumsum(-1)  # (B, V)
        u = uniforms[:, len(tokens), None].to(cdf.device) * cdf[:, -1:]  # (B, 1), below the total mass despite rounding
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1): the first token with cdf > u
        tokens.append(token)
        done |= token[:, 0] == eos_id
        finished = done.all().int()
        if dist.is_initialized():  # every rank stops at the same step: FSDP2 gathers each layer with all ranks at once
            dist.all_reduce(finished, op=dist.ReduceOp.MIN)
        if finished or len(tokens) == max_new_tokens:
            return torch.cat(tokens, dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        position = position + 1
        out = model(input_ids=token, attention_mask=attention_mask, position_ids=position, past_key_values=out.past_key_values,
                    use_cache=True)


def cut_left_padding(query: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a left-padded chunk, (B, P) -> (B, P' <= P)."""
    first = int(query_mask.any(0).long().argmax())
    return query[:, first:], query_mask[:, first:]


def forward_hidden(model, query, query_mask, response, response_mask) -> tuple[torch.Tensor, int]:
    """Final hidden states (B, T, H) of query + response, and the query width P (response token t sits at P + t).

    Columns that are padding in every row are cut first (the left of the
    queries, the right of the responses), so T <= P + R.
    """
    query, query_mask = cut_left_padding(query, query_mask)
    width = int(response_mask.sum(-1).max())
    input_ids = torch.cat([query, response[:, :width]], dim=1)
    attention_mask = torch.cat([query_mask, response_mask[:, :width].long()], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state  # a cache would hold every layer's K/V to no use
    return hidden, query.shape[1]


def response_logps(model, query, query_mask, response, response_mask, temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(y_t | x, y_<t) of every response token (B, R), zero outside the mask, and optionally the entropy (B, R).

    The LM head and a float32 log-softmax run only at the positions that
    predict a response token, so no (B, T, V) logits tensor is ever built.
    """
    hidden, p = forward_hidden(model, query, query_mask, response, response_mask)
    width = hidden.shape[1] - p
    mask = response_mask[:, :width]  # (B, W)
    logits = lm_logits(model, hidden[:, p - 1 : p - 1 + width][mask]) / temperature  # (M, V), M = response tokens
    lse = torch.logsumexp(logits, dim=-1)  # (M,)
    logps = torch.zeros(response.shape, device=logits.device)
    logps[:, :width][mask] = logits.gather(-1, response[:, :width][mask][:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logps, None
    entropy = torch.zeros(response.shape, device=logits.device)
    entropy[:, :width][mask] = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logps, entropy


def value_predictions(model, query, query_mask, response, response_mask) -> torch.Tensor:
    """V of the state before each response token (B, R), float32, zero outside the mask."""
    hidden, p = forward_hidden(model, query, query_mask, response, response_mask)
    width = hidden.shape[1] - p
    values = torch.zeros(response.shape, device=hidden.device)
    values[:, :width] = model.score(hidden[:, p - 1 : p - 1 + width]).squeeze(-1).float() * response_mask[:, :width]
    return values


def reward_scores(model, query, query_mask, response, response_mask) -> torch.Tensor:
    """The reward model's score of each (prompt, response) (B,), float32.

    Read where the model's own forward reads it (and reward_model.py trains
    it): at the rightmost token that is not padding, i.e. the EOS, or the
    token before it where pad and eos are one token.
    """
    hidden, p = forward_hidden(model, query, query_mask, response, response_mask)
    width = hidden.shape[1] - p
    ids = torch.cat([query[:, -p:], response[:, :width]], dim=1)  # (B, T), as forward_hidden cut them
    real = torch.cat([query_mask[:, -p:].bool(), response_mask[:, :width]], dim=1)
    if model.config.pad_token_id is not None:
        real &= ids != model.config.pad_token_id
    last = (torch.arange(ids.shape[1], device=ids.device) * real).argmax(-1)  # (B,)
    return model.score(hidden[torch.arange(len(hidden), device=hidden.device), last]).squeeze(-1).float()


def gather_rollout(batch: dict, pad_id: int, device) -> dict:
    """Every rank's rollout tensors joined in rank order, each padded as its kind is (unchanged on one process).

    Queries are left-padded, so they gain columns on the left; responses and
    everything per response token gain them on the right.
    """
    if not dist.is_initialized():
        return batch
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: v.cpu() for k, v in batch.items()})
    out = {}
    for k, v in batch.items():
        pieces = [p[k] for p in parts]
        if v.dim() == 2:
            width = max(t.shape[1] for t in pieces)
            fill = pad_id if k in ("query", "response") else 0
            pieces = [torch.cat([t.new_full((len(t), width - t.shape[1]), fill), t] if k in ("query", "query_mask")
                                else [t, t.new_full((len(t), width - t.shape[1]), fill)], dim=1) for t in pieces]
        out[k] = torch.cat(pieces).to(device)
    return out


# --------------------------------------------------------------------------- training
def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU per process
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def disable_dropout(model) -> None:
    """PPO compares log-probs of the same tokens from two passes; dropout would make them differ at ratio 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # attention modules' functional dropout
            module.attention_dropout = 0.0


def enable_gradient_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def sample_table(tokenizer, query, query_mask, response, response_mask, scores) -> list[list]:
    """[prompt, response, score] rows, as text."""
    rows = []
    for q, qm, r, rm, s in zip(query, query_mask, response, response_mask, scores):
        rows.append([tokenizer.decode(q[qm.bool()], skip_special_tokens=True).strip(),
                     tokenizer.decode(r[rm.bool()], skip_special_tokens=True).strip(), round(float(s), 4)])
    return rows


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
    rloo = args.advantage_estimator == "rloo"
    if rloo and args.rloo_k < 2:
        raise ValueError(f"--advantage_estimator rloo needs rloo_k >= 2 responses per prompt, got {args.rloo_k}")
    if args.temperature <= 0 or args.max_new_tokens < 1:
        raise ValueError("PPO samples its responses: temperature must be > 0 and max_new_tokens >= 1")
    rank, world = init_distributed()
    if args.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp shards the models across processes: launch with torchrun --nproc_per_node N")
    seed_everything(args.seed)  # the same on every rank while the models load (a new value head is drawn from it)
    device = pick_device(args.device)
    use_bf16 = args.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    def clock() -> float:  # phase timings need the GPU's queued work to have finished
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    # ---- models and tokenizer: policy, reference, reward model, value model (gae only)
    policy_path = resolve_path(args.resume_from or args.model_name_or_path)
    ref_path = resolve_path(args.ref_model_name_or_path or args.model_name_or_path)
    rm_path = resolve_path(args.reward_model_path)
    if args.reward_model_path == Args.reward_model_path and not os.path.isdir(rm_path):
        raise FileNotFoundError(f"no reward model at {rm_path!r}: train one first with `python reward_model.py` (it saves to "
                                f"runs/reward_model), or pass --reward_model_path")
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {policy_path!r} has no eos token; responses need one")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id  # padding is masked
    if os.path.isfile(os.path.join(rm_path, "tokenizer_config.json")):
        if AutoTokenizer.from_pretrained(rm_path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"the reward model {rm_path!r} has another tokenizer than the policy; it must score the policy's tokens")
    state = None
    if args.resume_from:
        state_file = os.path.join(policy_path, "training_state.pt")
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"--resume_from needs a checkpoint directory written with --save_steps (output_dir/checkpoint-N); "
                                    f"{policy_path!r} has no training_state.pt")
        state = torch.load(state_file, weights_only=False)
    policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).to(device)
    ref_model = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32).to(device)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).to(device)
    if reward_model.config.num_labels != 1:
        raise ValueError(f"the reward model {rm_path!r} has {reward_model.config.num_labels} labels; a scalar reward needs 1")
    for frozen in (ref_model, reward_model):
        frozen.eval().requires_grad_(False)
    value_model = None
    if not rloo:
        if args.resume_from:
            value_path = os.path.join(policy_path, "value_model")
        else:
            value_path = rm_path if args.value_model_init == "reward_model" else policy_path
        value_model = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, dtype=torch.float32).to(device)
    for model in (policy, value_model, ref_model, reward_model):
        if model is not None:
            disable_dropout(model)
    if args.gradient_checkpointing:
        for model in (policy, value_model):
            if model is not None:
                enable_gradient_checkpointing(model)
    # every call below goes through Forward: DDP for the two trained models on several ranks, FSDP2 for all four with --fsdp
    policy, value_model = (wrap(m, world, args.fsdp, use_bf16, trained=True) if m is not None else None for m in (policy, value_model))
    ref_model, reward_model = (wrap(m, world, args.fsdp, use_bf16, trained=False) for m in (ref_model, reward_model))
    trained = torch.nn.ModuleList([m for m in (policy, value_model) if m is not None])

    # ---- data
    train_data, eval_data = load_splits(args.dataset_name, args.dataset_config, args.train_split, args.eval_split, args.eval_holdout, args.seed)
    train_prompts = tokenize_prompts(train_data, tokenizer, args.max_prompt_length, "train")
    eval_prompts = []
    if eval_data is not None:
        eval_prompts = tokenize_prompts(eval_data.select(range(min(args.num_eval_prompts, len(eval_data)))), tokenizer,
                                        args.max_prompt_length, "eval")
    samples_per_prompt = args.rloo_k if rloo else 1
    batch_size = args.rollout_batch_size * samples_per_prompt * world  # responses per rollout, over all ranks
    micro_size = args.per_device_train_batch_size * world  # one micro-batch over all ranks
    minibatch_size = micro_size * args.gradient_accumulation_steps
    minibatches_per_epoch = math.ceil(batch_size / minibatch_size)
    total_steps = args.num_rollouts * args.num_ppo_epochs * minibatches_per_epoch  # optimizer steps

    orders: dict[int, list[int]] = {}

    def rollout_prompts(rollout: int) -> list[list[int]]:
        """This rank's prompts of rollout `rollout`: its block of consecutive slots of the epoch orders, each repeated per sample."""
        picked = []
        first = (rollout * world + rank) * args.rollout_batch_size
        for slot in range(first, first + args.rollout_batch_size):
            epoch, i = divmod(slot, len(train_prompts))
            if epoch not in orders:
                orders[epoch] = prompt_order(len(train_prompts), args.seed, epoch)
            picked += [train_prompts[orders[epoch][i]]] * samples_per_prompt  # rloo: the k samples are contiguous
        return picked

    @torch.no_grad()
    def sample_and_score(prompts: list[list[int]], uniforms: torch.Tensor, timings: Counter) -> dict:
        """Steps 1-3 of a rollout, in chunks of forward_batch_size, on one left-padded batch; uniforms (B, R) are the rows' draws."""
        query, query_mask = (t.to(device) for t in left_pad(prompts, pad_id))
        chunks = []
        for s in range(0, len(prompts), args.forward_batch_size):
            q, qm = query[s : s + args.forward_batch_size], query_mask[s : s + args.forward_batch_size]
            t0 = clock()
            # 1. generate
            with autocast():
                raw = policy(generate, *cut_left_padding(q, qm), args.max_new_tokens, args.temperature, eos_id,
                             uniforms[s : s + args.forward_batch_size].to(device))
            t1 = clock()
            # 2. truncate after EOS
            response, mask, has_eos = truncate_after_eos(raw, eos_id, pad_id)
            # 3. score with the reward model, at the EOS token
            with autocast():
                scores = reward_model(reward_scores, q, qm, response, mask)
            timings["generate"] += t1 - t0
            timings["score"] += clock() - t1
            chunks.append((response, mask, has_eos, scores))
        width = max(c[0].shape[1] for c in chunks)  # chunks stop generating at different lengths
        return {"query": query, "query_mask": query_mask,
                "response": torch.cat([pad_right(c[0], width, pad_id) for c in chunks]),
                "mask": torch.cat([pad_right(c[1], width, False) for c in chunks]),
                "has_eos": torch.cat([c[2] for c in chunks]), "scores": torch.cat([c[3] for c in chunks])}

    @torch.no_grad()
    def no_grad_pass(fn, model, batch: dict) -> torch.Tensor:
        """fn over the whole rollout in chunks of forward_batch_size: one pass of one model."""
        outs = []
        for s in range(0, len(batch["query"]), args.forward_batch_size):
            part = [batch[k][s : s + args.forward_batch_size] for k in ("query", "query_mask", "response", "mask")]
            with autocast():
                outs.append(model(fn, *part))
        return torch.cat(outs) if isinstance(outs[0], torch.Tensor) else [torch.cat(o) for o in zip(*outs)]

    # ---- optimizer and schedule: linear warmup, then linear decay to 0; one AdamW, one parameter group per model
    optimizer = torch.optim.AdamW([{"params": m.parameters()} for m in trained], lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = int(args.warmup_ratio * total_steps)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start = 0
    if state is not None:
        load_optimizer_state(trained, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
        else:
            print(f"the checkpoint has RNG states for {len(state['rng'])} processes, not {world}: they are not restored")
        start = state["step"]
        print(f"resumed from {args.resume_from} at rollout {start}")

    run = None
    if args.track and rank == 0:
        import wandb  # imported here so that importing this file stays silent and fast

        run = wandb.init(project=args.wandb_project, name=args.run_name, config=asdict(args))

    def evaluate(done: int) -> dict:
        """One sampled response per held-out prompt (the same sampling seed every time); print a sample table."""
        policy.eval()
        uniforms = torch.rand(len(eval_prompts), args.max_new_tokens, generator=torch.Generator().manual_seed(args.seed))
        share, n = rank_share(list(range(len(eval_prompts))), rank, world)
        batch = sample_and_score([eval_prompts[i] for i in share], uniforms[share], Counter())
        batch["scores"] = penalised_scores(batch["scores"], batch["has_eos"], args.missing_eos_penalty)
        total = all_sum({"score": batch["scores"][:n].sum().item(), "count": n}, device)
        rows = sample_table(tokenizer, *(batch[k][:n] for k in ("query", "query_mask", "response", "mask", "scores")))
        tqdm.write(f"samples after rollout {done} (prompt | response | score):\n"
                   + "\n".join(f"  {p!r} | {r!r} | {s:.3f}" for p, r, s in rows[: args.num_printed_samples]))
        if run is not None:
            run.log({"eval/samples": wandb.Table(columns=["prompt", "response", "score"], data=rows)}, step=done)
        return {"eval/score": total["score"] / total["count"]}

    # ---- the loop: one rollout, then num_ppo_epochs of minibatch updates on it
    metrics: dict = {}
    last_good = args.resume_from
    progress = tqdm(range(start, args.num_rollouts), desc="ppo" if not rloo else "rloo", initial=start, total=args.num_rollouts)
    for rollout in progress:
        t_start, timings = clock(), Counter()
        for model in trained:
            model.eval()
        # sampling replays on resume; prompt order, sampling and minibatch shuffles are three streams (3k, 3k + 1, 3k + 2).
        # Every rank draws the whole rollout's uniforms and uses its own rows, so samples do not depend on the rank count.
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 3 * rollout + 1)
        uniforms = torch.rand(batch_size, args.max_new_tokens, generator=generator)  # (B, R) over all ranks
        local = batch_size // world
        batch = sample_and_score(rollout_prompts(rollout), uniforms[rank * local : (rank + 1) * local], timings)  # steps 1-3
        mask = batch["mask"]
        # 4. old policy log-probs (and entropy), reference log-probs and values: one no-grad pass each
        t0 = clock()
        logps, entropy = no_grad_pass(lambda m, *b: response_logps(m, *b, args.temperature, with_entropy=True), policy, batch)
        t1 = clock()
        ref_logps = no_grad_pass(lambda m, *b: response_logps(m, *b, args.temperature)[0], ref_model, batch)
        t2 = clock()
        values = no_grad_pass(value_predictions, value_model, batch) if value_model is not None else None
        timings.update({"policy_forward": t1 - t0, "ref_forward": t2 - t1, "value_forward": clock() - t2})
        # every rank gets the whole rollout, so steps 5-7 (whitening, shuffles, minibatches) see the global batch
        batch.update({"logps": logps, "entropy": entropy, "ref_logps": ref_logps, **({"values": values} if values is not None else {})})
        batch = gather_rollout(batch, pad_id, device)
        mask, logps, entropy, ref_logps, values = batch["mask"], batch["logps"], batch["entropy"], batch["ref_logps"], batch.get("values")
        # 5. per-token rewards: -beta * kl_t everywhere, the score at the EOS
        kl = kl_per_token(logps, ref_logps, args.kl_estimator)
        rewards, scores = token_rewards(batch["scores"], kl, mask, batch["has_eos"], args.beta, args.missing_eos_penalty)
        # 6. advantages: GAE with the value model, or the leave-one-out baseline; then whitening
        if rloo:
            advantages = rloo_advantages(rewards.sum(-1), args.rloo_k)[:, None] * mask  # every token gets its response's
            returns = None
        else:
            advantages, returns = gae_advantages(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = whiten(advantages, mask)

        # 7. PPO epochs: shuffled minibatches, each one optimizer step over its micro-batches
        t_update, stats, norms_seen = clock(), Counter(), Counter()
        for model in trained:
            model.train()
        shuffle = torch.Generator().manual_seed(args.seed * 1_000_003 + 3 * rollout + 2)
        for epoch in range(args.num_ppo_epochs):
            order = torch.randperm(len(mask), generator=shuffle).to(device)
            for m in range(minibatches_per_epoch):
                minibatch = order[m * minibatch_size : (m + 1) * minibatch_size]
                n_tokens = mask[minibatch].sum()  # losses are token means over the minibatch, however it is split
                micro_starts = range(0, len(minibatch), micro_size)
                for s in micro_starts:
                    rows, n = rank_share(minibatch[s : s + micro_size].tolist(), rank, world)  # this rank's part of the micro-batch
                    idx = torch.tensor(rows, device=device)
                    part = [batch[k][idx] for k in ("query", "query_mask", "response", "mask")]
                    mb_mask = mask[idx] & (torch.arange(len(idx), device=device) < n)[:, None]  # stand-in rows weigh 0
                    with contextlib.ExitStack() as no_sync:  # gradients are reduced on the minibatch's last micro-batch only
                        for model in trained:
                            no_sync.enter_context(sync_gradients(model, s == micro_starts[-1]))
                        with autocast():
                            new_logps, _ = policy(response_logps, *part, args.temperature)
                        pg_losses, clipped, approxkl = ppo_policy_loss(new_logps, logps[idx], advantages[idx], args.cliprange)
                        loss = (pg_losses * mb_mask).sum() / n_tokens
                        stats.update({"loss/policy": loss.item(), "policy/clipfrac": ((clipped * mb_mask).sum() / n_tokens).item(),
                                      "policy/approxkl": ((approxkl * mb_mask).sum() / n_tokens).item()})
                        if value_model is not None:
                            with autocast():
                                new_values = value_model(value_predictions, *part)
                            vf_losses, vf_clipped = ppo_value_loss(new_values, values[idx], returns[idx], args.cliprange_value)
                            value_loss = (vf_losses * mb_mask).sum() / n_tokens
                            loss = loss + value_loss
                            stats.update({"loss/value": value_loss.item(), "val/clipfrac": ((vf_clipped * mb_mask).sum() / n_tokens).item(),
                                          "val/error": (((new_values - returns[idx]) ** 2 * mb_mask).sum() / n_tokens).item()})
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"loss is {loss.item()} at rollout {rollout}; stopping. Last good checkpoint: {last_good or 'none saved'}")
                        (loss * world).backward()  # DDP averages the ranks' gradients; each rank's part of the token mean is a sum
                norms = [clip_gradients(model, args.max_grad_norm) for model in trained]
                if not all(torch.isfinite(n) for n in norms):
                    raise FloatingPointError(f"gradient norm is {[n.item() for n in norms]} at rollout {rollout}; stopping. "
                                             f"Last good checkpoint: {last_good or 'none saved'}")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                norms_seen.update({"train/grad_norm": norms[0].item(), **({"val/grad_norm": norms[1].item()} if len(norms) > 1 else {})})
        timings["update"] = clock() - t_update
        timings["step"] = clock() - t_start

        n_updates = args.num_ppo_epochs * minibatches_per_epoch
        seq_kl = (kl * mask).sum(-1)  # (B,)
        lengths = mask.sum(-1).float()
        stats = all_sum(stats, device)  # each rank's part of every token mean, summed; the gradient norms are global already
        metrics = {k: v / n_updates for k, v in (stats | norms_seen).items()}
        metrics.update({
            "objective/kl": seq_kl.mean().item(), "objective/score": scores.mean().item(),
            "objective/rlhf_reward": rewards.sum(-1).mean().item(),  # score - beta * seq_kl
            "objective/entropy": (entropy * mask).sum(-1).mean().item(),
            "rollout/length": lengths.mean().item(), "rollout/no_eos": (~batch["has_eos"]).float().mean().item(),
            "train/lr": scheduler.get_last_lr()[0], "train/episodes": (rollout + 1) * batch_size,
            "perf/tokens_per_sec": (batch["query_mask"].sum() + mask.sum()).item() / timings["step"],
            "perf/generated_tokens_per_sec": mask.sum().item() / timings["generate"],
            **{f"time/{k}": v for k, v in timings.items()},
        })
        done = rollout + 1
        if eval_prompts and ((args.eval_steps and done % args.eval_steps == 0) or done == args.num_rollouts):
            metrics.update(evaluate(done))
        progress.set_postfix(score=f"{metrics['objective/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
        if done % args.logging_steps == 0 or done == args.num_rollouts:
            tqdm.write(f"rollout {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if run is not None:
            run.log(metrics, step=done)
        if args.save_steps and done % args.save_steps == 0 and done < args.num_rollouts:
            last_good = os.path.join(args.output_dir, f"checkpoint-{done}")
            save(last_good, policy, tokenizer, args, {"step": done, "optimizer": optimizer_state(trained, optimizer),
                                                      "scheduler": scheduler.state_dict(), "rng": rank_rng_states(world)})
            if value_model is not None:
                save_model(os.path.join(last_good, "value_model"), value_model)
    save(args.output_dir, policy, tokenizer, args)
    if value_model is not None:
        save_model(os.path.join(args.output_dir, "value_model"), value_model)
    if run is not None:
        run.finish()
    return metrics


if __name__ == "__main__":
    train(tyro.cli(Args, use_underscores=True))
