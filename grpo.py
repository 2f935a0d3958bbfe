"""GRPO in one file: group-relative advantages, no value model, and the loss normalisations of Dr. GRPO and DAPO.

Papers: Shao et al. 2024 (DeepSeekMath, GRPO), https://arxiv.org/abs/2402.03300; Liu et al. 2025 (Dr. GRPO),
https://arxiv.org/abs/2503.20783; Yu et al. 2025 (DAPO), https://arxiv.org/abs/2503.14476

Each prompt gets G = --num_generations responses o_1..o_G, scored by a reward function or a reward model. Every token
of o_i gets the advantage A_i = (r_i - mean(r)) / std(r) over its group (DeepSeekMath Sec. 4.1.2), and the loss is
the clipped surrogate plus beta times the k3 estimate of the KL to pi_ref at each token (Eqs. 3-4):

    l_it = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) + beta k3_it,  rho_it = pi(o_it)/pi_old(o_it)
    k3_it = pi_ref(o_it)/pi(o_it) - log(pi_ref(o_it)/pi(o_it)) - 1

--loss_type says how the l_it of a batch of N responses are summed (TRL's names):
    grpo     (1/N) sum_i (1/|o_i|) sum_t l_it     DeepSeekMath: each response weighs the same
    dr_grpo  (1/(N L)) sum_i sum_t l_it           Dr. GRPO: L = --max_new_tokens, a constant; with --scale_rewards none
    dapo     (1 / sum_i |o_i|) sum_i sum_t l_it   DAPO Eq. 12: each token weighs the same; with --epsilon_high 0.28
Fixed points (exact: docs/grpo.md). With the KL in the loss none is pi* = pi_ref exp(r/beta) / Z, the optimum of E[r]
- beta KL[pi || pi_ref]: k3's gradient is a forward KL's (one token, no std: argmax E[r] - beta G/(G-1) KL[pi_ref ||
pi]), and std scaling weighs r by 1/std against beta. `--kl_in reward` puts beta sum_t k1_t (k1 = log pi/pi_ref) in
each reward instead, as PPO does: pi* is then every variant's fixed point. Normalisers span a step's responses (TRL).

Deviations and options
- `--filter_groups` drops groups whose rewards are all equal from the loss (DAPO's dynamic sampling, Sec. 3.2, without
  refilling the batch). `--mask_truncated_completions`: no loss on responses with no EOS (DAPO's overlong filtering).
- std: unbiased, plus 1e-4 (TRL); `--scale_rewards batch`: the rollout's. `--num_iterations` (mu) passes a rollout;
  with 1 (DeepSeekMath's, TRL's) and one step a rollout, rho = 1 up to rounding: the clip never acts.

Rewards: `--reward_fn file.py:name` or `module:name`, called as TRL calls reward_funcs (without trainer_state):
name(prompts=..., completions=..., completion_ids=..., **the dataset's other columns) -> a float per completion, a
text or [{"role": "assistant", "content": text}]. `--reward_model_path`: a one-label *ForSequenceClassification on
the policy's tokenizer. Both: their sum. Neither: the toy world's true reward, toy_world/world.py:grpo_reward.

Usage (real-model recipes: docs/real_models.md)
    python grpo.py                                    # the embedded toy world, scored by its true reward
    python grpo.py --loss_type dr_grpo --scale_rewards none --beta 0      # Dr. GRPO
    python grpo.py --loss_type dapo --epsilon_high 0.28 --beta 0 --filter_groups --mask_truncated_completions  # DAPO

Logged metrics (one dict per rollout; printed every --logging_steps, and to wandb with --track)
    objective/score, objective/score_std       mean score (after --missing_eos_penalty; no KL), its std in a group
    objective/kl, objective/entropy            mean sum_t k1_t (KL to pi_ref; with beta > 0) and entropy per response
    objective/zero_std_groups                  fraction of groups whose rewards are all equal (no advantage)
    loss/policy, policy/approxkl, policy/clipfrac_low, policy/clipfrac_high    the loss and the ratio's clipping
    rollout/length, rollout/no_eos, train/lr, train/grad_norm, train/episodes, perf/*tokens_per_sec, time/*
    eval/score                                 mean reward of one sampled response per held-out prompt, with a table
"""

import atexit
import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import tyro
from datasets import DatasetDict, load_dataset
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import cached_file


@dataclass
class Args:
    # ---- model and data
    model_name_or_path: str = "toy_world/model"
    """policy to train: a hub name or a local directory (a relative path is also looked up next to this file)"""
    ref_model_name_or_path: Optional[str] = None
    """frozen reference model pi_ref; None means the starting policy (model_name_or_path)"""
    reward_fn: Optional[str] = None
    """reward function 'file.py:name' or 'module:name' (TRL's reward_funcs signature); None, with no reward model:
    the toy world's true reward, toy_world/world.py:grpo_reward"""
    reward_model_path: Optional[str] = None
    """reward model: a one-label sequence classifier with the policy's tokenizer (`python reward_model.py`'s)"""
    dataset_name: str = "toy_world/prompts"
    """prompts: a hub name, a local directory or a data file with a 'prompt' column (text, or a list of messages);
    its other columns go to the reward function"""
    dataset_config: Optional[str] = None
    """the dataset's configuration name, if it has several"""
    train_split: str = "train"
    """split to draw rollout prompts from"""
    eval_split: str = "test"
    """held-out prompts for evaluation; if the dataset has none, `eval_holdout` rows of the train split are held out"""
    eval_holdout: int = 512
    """rows held out from the train split when the dataset has no `eval_split`, at most a tenth (0: no evaluation)"""
    max_prompt_length: int = 256
    """tokens kept from the end of a longer prompt"""
    max_new_tokens: int = 5
    """response budget L in tokens, EOS included (the toy world's answers are at most 4 words + EOS)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are taken at the same temperature"""
    # ---- the method
    num_generations: int = 8
    """G: responses per prompt, whose rewards make each other's baseline"""
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    """how per-token losses are summed: per-response means (grpo), / (N L) (dr_grpo), / all tokens (dapo)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide each advantage by the std of its group's rewards (GRPO), of the rollout's (batch), or not (Dr. GRPO)"""
    beta: float = 0.04
    """beta: weight of the KL to pi_ref (DeepSeekMath's 0.04; 0 loads no reference, as Dr. GRPO and DAPO run)"""
    kl_in: Literal["loss", "reward"] = "loss"
    """loss: beta * k3 at each token of the loss (GRPO Eq. 3); reward: beta * sum_t k1_t off each response's reward"""
    epsilon: float = 0.2
    """eps_low: the ratio is clipped below at 1 - epsilon"""
    epsilon_high: Optional[float] = None
    """eps_high: the ratio is clipped above at 1 + epsilon_high (None: epsilon; DAPO's clip-higher uses 0.28)"""
    filter_groups: bool = False
    """drop from the loss the groups whose rewards are all equal (DAPO's dynamic sampling, without refilling); with
    --kl_in reward the rewards carry the KL, so they are seldom equal"""
    mask_truncated_completions: bool = False
    """give no loss to a response with no EOS within max_new_tokens (DAPO's overlong filtering)"""
    missing_eos_penalty: float = 0.0
    """subtracted from the reward of a response with no EOS within max_new_tokens (0 = off)"""
    # ---- optimisation
    learning_rate: float = 3e-4
    """peak AdamW learning rate (the toy world's; about 1e-6 suits a real 0.5-7B model, as in the papers)"""
    num_rollouts: int = 100
    """rollouts (generate, then num_iterations passes of updates) in the run"""
    rollout_batch_size: int = 8
    """prompts per rollout on each process, each with num_generations responses"""
    num_iterations: int = 1
    """mu: passes over each rollout (1: one on-policy pass, as DeepSeekMath and TRL)"""
    per_device_train_batch_size: int = 64
    """responses per micro-batch in the update, on each process"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    forward_batch_size: int = 64
    """responses per batch in generation and in the no-grad passes (log-probs, reference, scores)"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warmup; the rest decays linearly to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping threshold"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    logp_chunk_tokens: int = 4096
    """LM-head chunk, in response positions (recomputed in backward; 2.5 GB of logits at a 152k vocab); 0: no chunks"""
    attn_implementation: Optional[str] = None
    """attention kernel for from_pretrained (sdpa, eager, flash_attention_2, ...); None: sdpa where the model has it"""
    bf16: bool = True
    """autocast to bfloat16 on CUDA (weights and log-softmax stay float32); ignored on CPU and MPS"""
    device: str = "auto"
    """'auto' picks cuda, then mps, then cpu (under torchrun, each process's own GPU)"""
    fsdp: bool = False
    """under torchrun, shard the models per decoder layer with FSDP2 instead of replicating them with DDP"""
    lora_r: int = 0
    """LoRA rank: train a float32 adapter on a frozen base, the reference if none is named (0: train all weights)"""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapter's output is scaled by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input (the rest of every model has none)"""
    lora_target_modules: str = "all-linear"
    """layers that get an adapter: 'all-linear' (every linear layer but the output head), or names joined by commas"""
    merge_lora: bool = False
    """with --lora_r, also save the adapter merged into a float32 copy of the base, in output_dir/merged"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of frozen weights (a reference or reward model, a LoRA base); trained weights stay float32"""
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
    output_dir: str = "runs/grpo"
    """where the final model and checkpoints go"""
    resume_from: Optional[str] = None
    """a checkpoint (output_dir/checkpoint-N) to continue from; `latest`: output_dir's newest, or a new run if none"""
    seed: int = 1
    """seed for python, numpy and torch, the prompt order, sampling and the held-out split"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "single-file-alignment"
    """wandb project"""
    run_name: Optional[str] = None
    """wandb run name"""

    def __post_init__(self):  # a bad value stops the run before any work, naming the flag
        if self.num_generations < 2:
            raise UsageError(f"--num_generations must be >= 2 for a group baseline, got {self.num_generations}")
        if self.temperature <= 0 or self.max_new_tokens < 1:
            raise UsageError("GRPO samples its responses: temperature must be > 0 and max_new_tokens >= 1")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high or 0) < 0:
            raise UsageError("--beta, --epsilon and --epsilon_high must be >= 0")
        if self.num_iterations < 1:
            raise UsageError(f"--num_iterations must be >= 1, got {self.num_iterations}")


# --------------------------------------------------------------------------- the method
def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str) -> torch.Tensor:
    """A_i = r_i - mean of its group, divided by the std of the group ('group', DeepSeekMath Sec. 4.1.2), of all the
    rewards ('batch') or by nothing ('none', Dr. GRPO Sec. 3.2).

    rewards (B,), B = n * group_size, each group's responses contiguous. Returns (B,). The std is the unbiased one,
    plus 1e-4 (as TRL), so a group whose rewards are all equal gets advantages 0 under every scaling.
    """
    grouped = rewards.view(-1, group_size)  # (n, G)
    advantages = (grouped - grouped.mean(1, keepdim=True)).view(-1)
    if scale_rewards == "none":
        return advantages
    if scale_rewards == "group":
        return advantages / (grouped.std(1).repeat_interleave(group_size) + 1e-4)
    if scale_rewards == "batch":
        return advantages / (rewards.std() + 1e-4)
    raise ValueError(f"unknown scale_rewards {scale_rewards!r}")


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(n,) True for each group of rewards (B,) = (n * group_size,) whose rewards are all equal."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(1) == grouped.amin(1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = pi_ref/pi - log(pi_ref/pi) - 1 per token (DeepSeekMath Eq. 4; http://joschu.net/blog/kl-approx.html),
    from the sampled tokens' log-probs (B, R) under pi and pi_ref; >= 0, with the gradient of pi's log-probs."""
    log_ratio = ref_logps - logps  # (B, R)
    return torch.expm1(log_ratio) - log_ratio


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float, beta: float = 0.0, ref_logps: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta k3_t (DeepSeekMath Eq. 3, DAPO Eq. 10).

    logps (B, R) log-probs of the sampled tokens under the policy being trained; old_logps (B, R) under the policy
    that sampled them; advantages (B,), one per response; ref_logps (B, R) under pi_ref, needed when beta > 0.
    Returns the per-token losses (B, R) and, detached, where the ratio was clipped below with A < 0 and above with
    A > 0 (B, R): the tokens whose gradient the clip removes.
    """
    ratio = torch.exp(logps - old_logps)  # (B, R)
    advantages = advantages[:, None]  # (B, 1): every token of a response gets its advantage
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    losses = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    if beta:
        losses = losses + beta * k3_kl(logps, ref_logps)
    low = ((ratio < 1.0 - epsilon_low) & (advantages < 0)).detach()
    high = ((ratio > 1.0 + epsilon_high) & (advantages > 0)).detach()
    return losses, low, high


def loss_weights(mask: torch.Tensor, loss_type: str, max_completion_length: int,
                 counted: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each token's weight in a batch's loss, sum_it w_it l_it (B, R); mask (B, R) the tokens that get a loss.

    grpo: 1 / (N |o_i|); dr_grpo: 1 / (N L), L = max_completion_length; dapo: 1 / sum_i |o_i|. N is the number of
    responses that count (B,), by default those with a token in the mask; as in TRL, a truncated response whose tokens
    are masked still counts, a dropped group does not. A batch cut into micro-batches gets the same loss from the whole
    batch's weights.
    """
    mask = mask.float()
    lengths = mask.sum(-1, keepdim=True)  # (B, 1) |o_i|
    responses = (lengths[:, 0] > 0 if counted is None else counted).sum().clamp(min=1)  # N
    if loss_type == "grpo":
        return mask / lengths.clamp(min=1) / responses
    if loss_type == "dr_grpo":
        return mask / (responses * max_completion_length)
    if loss_type == "dapo":
        return mask / lengths.sum().clamp(min=1)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def penalised_scores(scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_penalty: float) -> torch.Tensor:
    """scores (B,) minus missing_eos_penalty where has_eos (B,) is False."""
    return torch.where(has_eos, scores, scores - missing_eos_penalty)


# --------------------------------------------------------------------------- the method's own scoring and log-prob code
TOY_REWARD = "toy_world/world.py:grpo_reward"  # the reward with no --reward_fn and no --reward_model_path


def load_reward_function(spec: str):
    """The function a --reward_fn names: 'path/to/file.py:name' (a relative path is also looked up next to this file)
    or 'package.module:name' (importable from the working directory)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(f"--reward_fn {spec!r}: expected 'file.py:function' or 'module:function'")
    if where.endswith(".py"):
        path = resolve_path(where)
        if not os.path.isfile(path):
            raise UsageError(f"--reward_fn {spec!r}: no file {path!r}")
        module_name = f"reward_fn_{os.path.splitext(os.path.basename(path))[0]}_{len(sys.modules)}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        sys.modules[module_name] = module = importlib.util.module_from_spec(module_spec)  # as imports are, for pickling
        sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # its own imports find the files beside it
        module_spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as error:
            raise UsageError(f"--reward_fn {spec!r}: cannot import {where!r} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UsageError(f"--reward_fn {spec!r}: {where!r} has no function {name!r}")
    return function


def function_rewards(reward_fn, rows: list[dict], texts: list[str], ids: list[list[int]]) -> torch.Tensor:
    """reward_fn's reward of each completion (B,) float32, called as TRL calls reward_funcs: prompts as the dataset
    holds them, completions as text (as a one-message assistant turn after a conversational prompt), completion_ids
    (EOS included), and every other column of the prompts' rows as a keyword argument of lists."""
    prompts = [row["prompt"] for row in rows]
    completions = [[{"role": "assistant", "content": text}] if is_conversation(prompt) else text
                   for prompt, text in zip(prompts, texts)]
    skip = ("prompt", "completion", "completions", "completion_ids")
    columns = {k: [row[k] for row in rows] for k in rows[0] if k not in skip}
    values = reward_fn(prompts=prompts, completions=completions, completion_ids=ids, **columns)
    name = getattr(reward_fn, "__name__", "the reward function")
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or len(values) != len(texts):
        size = f" of {len(values)}" if hasattr(values, "__len__") else ""
        raise UsageError(f"{name} should return a list of {len(texts)} floats, one per completion; it returned "
                         f"{type(values).__name__}{size}")
    rewards = []
    for i, value in enumerate(values):
        try:
            rewards.append(float(value))  # a float, int, bool, numpy scalar or one-element tensor
        except (TypeError, ValueError):
            rewards.append(math.nan)
        if not math.isfinite(rewards[-1]):
            raise UsageError(f"{name} returned {value!r} for completion {i} ({texts[i]!r}); every completion needs a "
                             "finite reward (TRL counts None as 0, with a warning: return 0.0 where that is meant)")
    return torch.tensor(rewards, dtype=torch.float32)


def response_logps(model, query, query_mask, response, response_mask, temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log pi(y_t | x, y_<t) of every response token (B, R), zero outside the mask, and optionally the entropy (B, R).

    The LM head and a float32 log-softmax run only at response positions, model.logp_chunk_tokens at a time.
    """
    def token_stats(model, hidden, tokens):  # (m, H), (m,) -> (m, 1) log-probs, or (m, 2) with the entropies
        logits = lm_logits(model, hidden) / temperature  # (m, V)
        lse = torch.logsumexp(logits, dim=-1)  # (m,)
        logps = logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
        if not with_entropy:
            return logps[:, None]
        return torch.stack([logps, lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)], dim=-1)

    hidden, p = forward_hidden(model, query, query_mask, response, response_mask)
    width = hidden.shape[1] - p
    mask = response_mask[:, :width]  # (B, W)
    stats = in_chunks(token_stats, model, hidden[:, p - 1 : p - 1 + width][mask], response[:, :width][mask])  # (M, .)
    out = torch.zeros(*response.shape, stats.shape[1], device=hidden.device)  # (B, R, 1 or 2)
    out[:, :width][mask] = stats
    return out[..., 0], (out[..., 1] if with_entropy else None)


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


# ---------------------------------------------------------------------------------------------------------- training
def train(args: Args) -> dict:
    runtime = setup(args)  # torchrun's process group (or none), the seeds, the device, bf16 autocast on CUDA
    group_size, epsilon_high = args.num_generations, args.epsilon if args.epsilon_high is None else args.epsilon_high
    if not (args.reward_fn or args.reward_model_path or args.dataset_name == Args.dataset_name):
        raise UsageError(f"--dataset_name {args.dataset_name!r} needs --reward_fn or --reward_model_path (the toy "
                         "world's reward only scores the toy world's prompts)")

    # ---- models: the policy, the frozen reference (none when beta = 0), the reward function and/or reward model
    policy_path = resolve_path(args.resume_from or args.model_name_or_path)
    tokenizer, pad_id = load_tokenizer(policy_path)
    state = load_training_state(args.resume_from, policy_path)  # None for a new run
    policy = load_model(policy_path, args, runtime, trained=True)
    ref_model = load_reference(args, runtime, policy) if args.beta else None
    reward_model = load_reward_model(args, runtime, tokenizer)[0] if args.reward_model_path else None
    use_fn = args.reward_fn or not args.reward_model_path
    reward_fn = load_reward_function(args.reward_fn or TOY_REWARD) if use_fn else None
    eos_ids = eos_token_ids(policy, tokenizer)  # the tokenizer's eos and the model's own (a chat model's turn end)

    # ---- data: prompts, tokenized once; each rollout draws the next ones, G times each, with uniforms to sample from
    train_prompts, eval_prompts, train_rows, eval_rows = load_prompts(args, tokenizer)
    train_rows, eval_rows = list(train_rows), list(eval_rows)  # dicts: what the reward function gets
    check_log_probs(policy, train_prompts[0], max(1, len(train_prompts[0]) - 64), runtime)  # a known LM head
    rollouts = RolloutPrompts(train_prompts, args, runtime, samples_per_prompt=group_size)
    minibatches = Minibatches(rollouts.batch_size, args.num_iterations, args, runtime)
    total_steps = args.num_rollouts * minibatches.per_rollout  # optimizer steps

    @torch.no_grad()
    def sample_and_score(rows: list[int], prompts: list, prompt_rows: list[dict], uniforms: torch.Tensor,
                         timings: Counter) -> dict:
        """Steps 1-3 of a rollout for prompts[rows], in chunks of forward_batch_size; uniforms (B, R) are the draws."""
        query, query_mask = (t.to(runtime.device) for t in left_pad([prompts[i] for i in rows], pad_id))
        chunks = []
        for s in range(0, len(rows), args.forward_batch_size):
            q, q_mask = query[s : s + args.forward_batch_size], query_mask[s : s + args.forward_batch_size]
            # 1. generate
            with timed(timings, "generate", runtime.device), runtime.autocast():
                raw = policy(generate, *cut_left_padding(q, q_mask), args.max_new_tokens, args.temperature,
                             eos_ids, uniforms[s : s + args.forward_batch_size].to(runtime.device))
            # 2. truncate after EOS
            response, mask, has_eos = truncate_after_eos(raw, eos_ids, pad_id)
            # 3. score: the reward function on the text, the reward model at the EOS token, or their sum
            with timed(timings, "score", runtime.device):
                scores = torch.zeros(len(response), device=runtime.device)
                if reward_model is not None:
                    with runtime.autocast():
                        scores += reward_model(reward_scores, q, q_mask, response, mask)
                if reward_fn is not None:
                    ids = [r[m].tolist() for r, m in zip(response, mask)]
                    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
                    picked = [prompt_rows[i] for i in rows[s : s + args.forward_batch_size]]
                    scores += function_rewards(reward_fn, picked, texts, ids).to(runtime.device)
            chunks.append({"response": response, "mask": mask, "has_eos": has_eos, "scores": scores})
        width = max(c["response"].shape[1] for c in chunks)  # chunks stop generating at different lengths
        fill = {"response": pad_id, "mask": False}
        return {"query": query, "query_mask": query_mask, **{
            k: torch.cat([pad_right(c[k], width, fill[k]) if k in fill else c[k] for c in chunks]) for k in chunks[0]}}

    def evaluate(done: int) -> dict:
        """One sampled response per held-out prompt (the same sampling seed every time); print a sample table."""
        policy.eval()
        generator = torch.Generator().manual_seed(args.seed)
        uniforms = torch.rand(len(eval_prompts), args.max_new_tokens, generator=generator)
        share, n = rank_share(list(range(len(eval_prompts))), runtime.rank, runtime.world)
        batch = sample_and_score(share, eval_prompts, eval_rows, uniforms[share], Counter())
        scores = penalised_scores(batch["scores"], batch["has_eos"], args.missing_eos_penalty)[:n]
        total = all_sum({"score": scores.sum().item(), "count": n}, runtime.device)
        rows = sample_table(tokenizer, *(batch[k][:n] for k in ("query", "query_mask", "response", "mask")), scores)
        tqdm.write(f"samples after rollout {done} (prompt | response | reward):\n" + "\n".join(
            f"  {p!r} | {r!r} | {score:.3f}" for p, r, score in rows[: args.num_printed_samples]))
        if tracker is not None:
            import wandb

            tracker.log({"eval/samples": wandb.Table(columns=["prompt", "response", "reward"], data=rows)}, step=done)
        return {"eval/score": total["score"] / total["count"]}

    # ---- optimizer, learning-rate schedule, a resumed run's state
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = linear_schedule(optimizer, args.warmup_ratio, total_steps)
    start_rollout = restore_training_state(state, policy, optimizer, scheduler, runtime, args.resume_from)
    tracker = init_tracking(args, runtime)

    # ---- the loop: one rollout of G responses per prompt, then num_iterations passes of minibatch updates on it
    metrics, last_checkpoint = {}, args.resume_from
    progress = tqdm(range(start_rollout, args.num_rollouts), desc="grpo", initial=start_rollout,
                    total=args.num_rollouts)
    for rollout in progress:
        step_start, timings = time.perf_counter(), Counter()
        policy.eval()
        rows, uniforms = rollouts.of_rollout(rollout)
        batch = sample_and_score(rows, train_prompts, train_rows, uniforms, timings)  # steps 1-3
        # 4. old policy log-probs (and entropy) and reference log-probs: one no-grad pass each
        logps_of = functools.partial(response_logps, temperature=args.temperature)
        with timed(timings, "policy_forward", runtime.device):
            batch["logps"], batch["entropy"] = no_grad_pass(functools.partial(logps_of, with_entropy=True), policy,
                                                            batch, args.forward_batch_size, runtime)
        with timed(timings, "ref_forward", runtime.device):
            if ref_model is not None:
                batch["ref_logps"] = no_grad_pass(lambda *a: logps_of(*a)[0], ref_model, batch,
                                                  args.forward_batch_size, runtime)
        batch = gather_rollout(batch, pad_id, runtime.device)  # every rank gets the whole rollout, for steps 5-7
        mask, logps, ref_logps = batch["mask"], batch["logps"], batch.get("ref_logps")
        # 5. each response's reward: its score; with --kl_in reward, minus beta * sum_t k1_t, as in PPO
        scores = penalised_scores(batch["scores"], batch["has_eos"], args.missing_eos_penalty)
        kl = (logps - ref_logps) * mask if ref_model is not None else torch.zeros_like(logps)  # (B, R) k1_t
        rewards = scores - args.beta * kl.sum(-1) if args.kl_in == "reward" else scores
        # 6. group-relative advantages, one per response; the tokens that get a loss
        advantages = group_advantages(rewards, group_size, args.scale_rewards)  # (B,)
        uniform = uniform_groups(rewards, group_size)  # (n,) groups with no advantage
        counted = ~uniform.repeat_interleave(group_size) if args.filter_groups else torch.ones_like(batch["has_eos"])
        loss_mask = mask & counted[:, None]  # (B, R)
        if args.mask_truncated_completions:  # no loss, but they still count among the step's responses
            loss_mask &= batch["has_eos"][:, None]
        beta_in_loss = args.beta if args.kl_in == "loss" else 0.0

        # 7. num_iterations passes over the rollout in shuffled minibatches, each one optimizer step
        update_start, stats, norms_seen = time.perf_counter(), Counter(), Counter()
        policy.train()
        for minibatch, micro_batches in minibatches.of_rollout(rollout):
            weights = torch.zeros(mask.shape, device=mask.device)  # each token's weight in the step's loss
            weights[minibatch] = loss_weights(loss_mask[minibatch], args.loss_type, args.max_new_tokens,
                                              counted[minibatch])
            n_tokens = loss_mask[minibatch].sum().clamp(min=1)
            for micro in micro_batches:
                part = [batch[k][micro.rows] for k in ("query", "query_mask", "response", "mask")]
                micro_mask = loss_mask[micro.rows] & micro.real[:, None]  # stand-in rows weigh 0
                with sync_gradients(policy, micro.last):
                    with runtime.autocast():
                        new_logps, _ = policy(response_logps, *part, args.temperature)
                    losses, low, high = grpo_token_losses(
                        new_logps, logps[micro.rows], advantages[micro.rows], args.epsilon, epsilon_high,
                        beta_in_loss, ref_logps[micro.rows] if beta_in_loss else None)
                    loss = (losses * weights[micro.rows] * micro.real[:, None]).sum()
                    log_ratio = (new_logps - logps[micro.rows]).detach()
                    stats.update({"loss/policy": loss.item(),
                                  "policy/clipfrac_low": ((low & micro_mask).sum() / n_tokens).item(),
                                  "policy/clipfrac_high": ((high & micro_mask).sum() / n_tokens).item(),
                                  "policy/approxkl": ((0.5 * log_ratio**2 * micro_mask).sum() / n_tokens).item()})
                    check_finite(loss, "loss", f"rollout {rollout}", last_checkpoint)
                    (loss * runtime.world).backward()  # DDP averages the ranks' gradients; each rank's part is a sum
            norm = clip_gradients(policy, args.max_grad_norm)
            check_finite(norm, "gradient norm", f"rollout {rollout}", last_checkpoint)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            norms_seen["train/grad_norm"] += norm.item()
        timings["update"] = seconds_since(update_start, runtime.device)
        timings["step"] = seconds_since(step_start, runtime.device)

        stats = all_sum(stats, runtime.device)  # each rank's part of every sum, summed; the norms are global
        metrics = {k: v / minibatches.per_rollout for k, v in (stats | norms_seen).items()}
        metrics.update({
            "objective/score": scores.mean().item(),
            "objective/score_std": scores.view(-1, group_size).std(1).mean().item(),
            "objective/zero_std_groups": uniform.float().mean().item(),
            **({"objective/kl": kl.sum(-1).mean().item()} if ref_model is not None else {}),
            "objective/entropy": (batch["entropy"] * mask).sum(-1).mean().item(),
            "rollout/length": mask.sum(-1).float().mean().item(),
            "rollout/no_eos": (~batch["has_eos"]).float().mean().item(),
            "train/lr": scheduler.get_last_lr()[0], "train/episodes": (rollout + 1) * rollouts.batch_size,
            "perf/tokens_per_sec": (batch["query_mask"].sum() + mask.sum()).item() / timings["step"],
            "perf/generated_tokens_per_sec": mask.sum().item() / timings["generate"],
            **{f"time/{k}": v for k, v in timings.items()},
        })
        done = rollout + 1
        if eval_prompts and ((args.eval_steps and done % args.eval_steps == 0) or done == args.num_rollouts):
            metrics.update(evaluate(done))
        progress.set_postfix(score=f"{metrics['objective/score']:.3f}", kl=f"{metrics.get('objective/kl', 0):.3f}")
        log_metrics(metrics, done, args.num_rollouts, args.logging_steps, tracker, label="rollout")
        if args.save_steps and done % args.save_steps == 0 and done < args.num_rollouts:
            last_checkpoint = save_checkpoint(args, done, policy, tokenizer, optimizer, scheduler, runtime)
    save(args.output_dir, policy, tokenizer, args)
    if tracker is not None:
        tracker.finish()
    return metrics


# ======================================================================================================================
# Shared machinery: byte-identical in every script that has it (tests/test_copies_identical.py).
# A reader learning the method can stop here.
#
# The conventions every script follows:
# - Data. --dataset_name is a hub name, a local directory or a .json/.jsonl/.parquet/.csv file. Preference pairs come
#   in three formats: standard (`prompt`, `chosen`, `rejected` strings), conversational (the same columns as lists of
#   {"role", "content"} messages, rendered with the tokenizer's chat template) and implicit prompt (`chosen` and
#   `rejected` only, as in hh-rlhf: the prompt is their longest shared prefix, backed up to a word boundary, or to a
#   whole message). A missing or mistyped column stops the run with an error that names it. Rows that cannot be used
#   (an empty prompt, chosen equal to rejected, identical once tokenized or truncated) are skipped, counted by reason
#   and reported, never dropped silently.
# - Tokens. Every response ends with <eos> (unless the tokenizer or chat template already ended it), so the policy
#   learns when to stop; an empty response is scored as its <eos> alone. Where a tokenizer merges the end of the
#   prompt with the start of the response, the merged token counts as response, as in TRL: the sequence is exactly
#   the tokenizer's prompt + response. log pi(y|x) is summed over response tokens; the LM head and a float32
#   log-softmax run only at the positions that predict them, so no (batch, length, vocabulary) tensor is built, and
#   over --logp_chunk_tokens of them at a time, each chunk recomputed in the backward pass: one chunk's logits exist
#   at once.
# - Truncation. A row longer than --max_length keeps the end of its prompt (--max_prompt_length tokens), then the
#   start of its responses.
# - Numerics. Weights stay float32; on CUDA the forward passes autocast to bf16 (--bf16). Dropout is off in every
#   model, and a reference model runs in the policy's dtype and autocast, so the policy's log-ratio to it is exactly
#   0 at step 0.
# - Several processes. `torchrun --nproc_per_node N X.py` runs DDP, or FSDP2 with --fsdp (sharded per decoder layer);
#   a plain `python X.py` is one process with no distributed set-up. Batch sizes are per process. The data order
#   depends only on the seed and the global batch; each global micro-batch is cut into N equal parts (stand-in rows,
#   weighted 0, fill a short one); losses are scaled so that the gradient is the mean over every row of the optimizer
#   step, whatever the sizes of its micro-batches (an epoch's last one is short unless the batch divides the data; it
#   is trained on, and a step may run across an epoch's end). So N processes run the one-process run with the same
#   global batch. Rank 0 prints, logs and writes.
# - Saving. output_dir receives the final model (save_pretrained: weights, tokenizer, args.json), which loads with
#   from_pretrained. --save_steps N also writes output_dir/checkpoint-N with the optimizer, scheduler and every rank's
#   RNG state, from which --resume_from continues the same trajectory. A non-finite loss or gradient norm stops the
#   run and names the last good checkpoint.
# ======================================================================================================================
@dataclass
class Runtime:
    """This process: its rank among `world` processes (0 of 1 under a plain `python`), its device, and bf16 autocast."""

    rank: int
    world: int
    device: torch.device
    bf16: bool

    def autocast(self):
        """bf16 autocast on CUDA with --bf16 (weights and log-softmax stay float32); otherwise nothing."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def seed_per_rank(self, seed: int) -> None:
        """Once the models have loaded alike on every rank, each rank draws its own random stream."""
        if self.world > 1:
            seed_everything(seed + 100_003 * self.rank)


def setup(args) -> Runtime:
    """torchrun's process group (none under a plain `python`), every RNG seeded alike, and the device."""
    rank, world = init_distributed()
    if args.fsdp and not dist.is_initialized():
        raise UsageError("--fsdp shards the models across processes: launch with torchrun --nproc_per_node N")
    if args.fsdp and args.lora_r:
        raise UsageError("--lora_r runs on one process or under DDP; FSDP2 sharding of LoRA models is not supported")
    seed_everything(args.seed)  # the same on every rank while the models load (a new head is drawn from it)
    if args.resume_from == "latest":  # for preemptible jobs: the same command starts, and then resumes, the run
        args.resume_from = latest_checkpoint(args.output_dir)
    device = pick_device(args.device)
    return Runtime(rank, world, device, args.bf16 and device.type == "cuda")


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The newest checkpoint in output_dir (checkpoint-N, or SPIN's iteration-k), None if it has none. A directory of
    that name is complete: `save` moves it into place only once written."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    numbered = [(int(name.split("-")[1]), name) for name in names if re.fullmatch(r"(checkpoint|iteration)-\d+", name)]
    path = os.path.join(output_dir, max(numbered)[1]) if numbered else None
    print(f"--resume_from latest: {path or f'no checkpoint in {output_dir!r} yet, a new run'}")
    return path


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU per process
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_path(name: str) -> str:
    """A local path as given, else next to this file (so the toy-world defaults work from any cwd), else a hub name."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    return name if os.path.exists(name) or not os.path.exists(here) else here


def load_tokenizer(path: str):
    """(tokenizer, pad_id): the pad token, or the eos token where there is none (padding is masked)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise UsageError(f"tokenizer of {path!r} has no eos token; responses need one")
    return tokenizer, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_same_tokenizer(rm_path: str, tokenizer) -> None:
    """The reward model scores the policy's token ids: where it has its own tokenizer (in a local directory or a hub
    repository), the vocabularies must match."""
    if cached_file(rm_path, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False) is not None:
        if AutoTokenizer.from_pretrained(rm_path).get_vocab() != tokenizer.get_vocab():
            raise UsageError(f"the reward model {rm_path!r} has another tokenizer than the policy; it must score the "
                             "policy's tokens")


def load_model(path: str, args, runtime: Runtime, trained: bool, model_class=AutoModelForCausalLM, **kwargs):
    """A model on this process's device, wrapped for several processes (`wrap`).

    Trained weights are float32, frozen ones --dtype. With --lora_r, a trained model is a float32 LoRA adapter on a
    frozen base in --dtype; a directory that holds an adapter (a checkpoint, a LoRA run's output) gives its base and
    that adapter, to train on (with --lora_r) or merged in. Dropout is off in every model (the adapter's aside), as in
    TRL and the papers' code: with it, two passes over the same tokens differ, so a policy would not start equal to a
    reference copy of itself. A trained model gets gradient checkpointing if asked and no KV cache in its forward
    passes; a frozen one is put in eval mode without gradients.
    """
    lora, adapter = trained and args.lora_r > 0, saved_adapter(path)
    base = adapter["base_model_name_or_path"] if adapter else path
    if adapter and os.path.isfile(os.path.join(path, CLASSIFIER_CONFIG)):  # a classifier's, which its base lacks
        saved = AutoConfig.from_pretrained(os.path.join(path, CLASSIFIER_CONFIG))
        kwargs = {"num_labels": saved.num_labels, "pad_token_id": saved.pad_token_id, **kwargs}
    dtype = torch.float32 if (trained and not lora) or (adapter and not lora) else DTYPES[args.dtype]
    model = model_class.from_pretrained(base, dtype=dtype, attn_implementation=args.attn_implementation,
                                        **kwargs)
    model.logp_chunk_tokens = getattr(args, "logp_chunk_tokens", 0)  # sequence_logps's chunks (in_chunks)
    disable_dropout(model)
    if lora or adapter:
        model = with_adapter(model, path if adapter else None, args, trainable=lora)
    if adapter and not lora:  # merged in float32: trained in full, or frozen in --dtype
        model = model.requires_grad_(True) if trained else model.to(DTYPES[args.dtype])
    model = model.to(runtime.device)
    if runtime.device.type == "cpu":  # weights read from a file keep its offsets; the CPU kernels round by alignment
        for p in model.parameters():
            p.data = p.data.clone()  # so every model gets fresh storage, and a resumed run replays the run exactly
    if trained:
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.config.use_cache = False
    else:
        model.eval().requires_grad_(False)
    return wrap(model, runtime.world, args.fsdp, runtime.bf16, trained=trained)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# a classifier adapter's model config (head size, pad id), saved beside it; not config.json, which would make
# transformers read the directory as a whole model instead of an adapter
CLASSIFIER_CONFIG = "classifier_config.json"


def saved_adapter(path: str) -> Optional[dict]:
    """The LoRA adapter's config (adapter_config.json) a local directory holds, else None."""
    config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        return json.load(f)


def with_adapter(model, adapter_path: Optional[str], args, trainable: bool):
    """`model` with a LoRA adapter (peft, imported only here): a new one from the --lora_* flags, or the one saved at
    adapter_path, kept apart to train (trainable) or merged in, in the base's dtype. An adapter saved for another kind
    of model (a causal LM's for a classifier) is refused, naming the directory."""
    from peft import LoraConfig, PeftModel, get_peft_model

    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    if trainable and task == "SEQ_CLS":  # peft trains a classifier's head whole: float32, as every trained weight
        float32_head(model)
    if adapter_path is None:
        targets = args.lora_target_modules if args.lora_target_modules == "all-linear" else [
            name.strip() for name in args.lora_target_modules.split(",")]
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets, task_type=task)
        return get_peft_model(model, config)  # B = 0: the adapter adds exactly nothing at first
    saved = saved_adapter(adapter_path)
    if saved.get("task_type") not in (None, task):
        raise UsageError(f"{adapter_path!r} holds a {saved['task_type']} adapter, which a {type(model).__name__} "
                         "cannot take: start from its merged copy (a LoRA run's --merge_lora writes output_dir/merged)")
    if trainable and (saved.get("r"), saved.get("lora_alpha")) != (args.lora_r, args.lora_alpha):
        print(f"{adapter_path}: training its adapter on as saved (r={saved.get('r')}, lora_alpha="
              f"{saved.get('lora_alpha')}); --lora_r {args.lora_r} and --lora_alpha {args.lora_alpha} apply to new "
              "adapters only")
    model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
    return model if trainable else model.merge_and_unload()


def disable_dropout(model) -> None:
    """Sets every dropout probability of the model to 0: its nn.Dropout modules and its attention modules' own."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # attention modules' functional dropout
            module.attention_dropout = 0.0


def float32_head(model) -> None:
    """A sequence classifier's head in float32, before LoRA wraps the model: peft trains each module whose name ends in
    "classifier" or "score" as a full copy of it (modules_to_save), which a bf16 base would make bf16, where a small
    update rounds away. Their inputs are cast to float32 to match (autocast does that on CUDA; the CPU runs none)."""
    for name, module in model.named_modules():
        if name.endswith(("classifier", "score")):  # peft's rule for the modules it trains whole
            module.float()
            module.register_forward_pre_hook(lambda _, inputs: tuple(
                x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs))


def enable_gradient_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def wrap(model, world: int, fsdp: bool, bf16: bool, trained: bool):
    """model inside Forward: sharded per decoder layer with FSDP2 (--fsdp), else in DDP if trained on several ranks."""
    wrapped = Forward(model)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mixed = MixedPrecisionPolicy()
        if bf16:  # bf16 compute on CUDA; the shards, the optimizer and the gradient reduction stay float32
            mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])]:
            fully_shard(layer, mp_policy=mixed)
        # the rest (embeddings, final norm, heads; tied weights stay together). reshard_after_forward=True: by default
        # the root keeps its weights gathered after a forward, for the backward; after a no-grad forward (evaluation,
        # generation, a frozen model) no backward comes, and the optimizer and the state dict would then see the
        # gathered copies instead of the shards
        fully_shard(wrapped, mp_policy=mixed, reshard_after_forward=True)
    elif world > 1 and trained:
        device = next(model.parameters()).device
        wrapped = DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return wrapped


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
        return fn(hf_model(self.model), *args, **kwargs)


def hf_model(model):
    """The Hugging Face model itself: inside a peft model, the one its adapter layers were put into."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_reference(args, runtime: Runtime, policy):
    """The frozen reference pi_ref: with --lora_r (and no --ref_model_name_or_path), the policy with its adapter
    switched off, so no second model is held; else a model of its own, in --dtype."""
    if args.lora_r and not args.ref_model_name_or_path:
        if saved_adapter(resolve_path(args.model_name_or_path)):  # its base alone is not the starting policy
            raise UsageError(f"{args.model_name_or_path!r} holds a LoRA adapter: with --lora_r the reference would be "
                             "its base without it. Start from its merged copy (a LoRA run's --merge_lora writes "
                             "output_dir/merged), or name the reference with --ref_model_name_or_path")
        return AdapterOff(policy)
    return load_model(resolve_path(args.ref_model_name_or_path or args.model_name_or_path), args, runtime,
                      trained=False)


def load_reward_model(args, runtime: Runtime, tokenizer):
    """The frozen reward model, a one-label sequence classifier on the policy's tokenizer, and its path."""
    rm_path = resolve_path(args.reward_model_path)
    if args.reward_model_path == Args.reward_model_path and not os.path.isdir(rm_path):
        raise UsageError(f"no reward model at {rm_path!r}: train one first with `python reward_model.py` (it "
                         "saves to runs/reward_model), or pass --reward_model_path")
    check_same_tokenizer(rm_path, tokenizer)
    reward_model = load_model(rm_path, args, runtime, trained=False, model_class=AutoModelForSequenceClassification)
    if unwrap(reward_model).config.num_labels != 1:
        raise UsageError(f"the reward model {rm_path!r} has {unwrap(reward_model).config.num_labels} labels, not 1")
    return reward_model, rm_path


class AdapterOff:
    """A LoRA policy called as its base model: the adapter is switched off for the call, and gives no gradient."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, fn, *args, **kwargs):
        with torch.no_grad(), unwrap(self.policy).disable_adapter():
            return self.policy(fn, *args, **kwargs)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's eos, each id in the model's generation_config.eos_token_id (an
    int or a list), where chat models list the end of their turn (Gemma's <end_of_turn>, Qwen's <|im_end|>), and the
    special tokens its chat template closes an answer with (a base model's SFT copy may list none of them)."""
    listed = getattr(unwrap(model).generation_config, "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return sorted({tokenizer.eos_token_id, *listed, *turn_end_ids(tokenizer)})


def turn_end_ids(tokenizer) -> set[int]:
    """The special tokens a chat template writes after an assistant's answer; none without a template."""
    if tokenizer.chat_template is None:
        return set()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}],
                                         tokenize=False)
    after = tokenizer(text[text.rindex("hi") + 2 :], add_special_tokens=False)["input_ids"]
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(after) & (set(tokenizer.all_special_ids) | added)


def load_training_state(resume_from: Optional[str], path: str) -> Optional[dict]:
    """The optimizer, scheduler, RNG and step a checkpoint holds beside its model; None when not resuming."""
    if not resume_from:
        return None
    state_file = os.path.join(path, "training_state.pt")
    if not os.path.isfile(state_file):
        raise UsageError(f"--resume_from needs a checkpoint directory written with --save_steps "
                                f"(output_dir/checkpoint-N); {path!r} has no training_state.pt")
    return torch.load(state_file, weights_only=True)  # tensors and plain Python only: a checkpoint runs no code


def load_prompts(args, tokenizer) -> tuple[list[list[int]], list[list[int]], list, list]:
    """The train split's prompts and the first --num_eval_prompts of the eval split's, tokenized; and the rows they
    came from (a Dataset, or [] with no eval split), whose other columns a method may read."""
    train_data, eval_data = load_splits(args.dataset_name, args.dataset_config, args.train_split, args.eval_split,
                                        args.eval_holdout, args.seed)
    train_prompts = tokenize_prompts(train_data, tokenizer, args.max_prompt_length, "train")
    if eval_data is None:
        return train_prompts, [], prompt_rows(train_data), []
    eval_data = eval_data.select(range(min(args.num_eval_prompts, len(eval_data))))
    eval_prompts = tokenize_prompts(eval_data, tokenizer, args.max_prompt_length, "eval")
    return train_prompts, eval_prompts, prompt_rows(train_data), prompt_rows(eval_data)


def prompt_rows(data):
    """The rows whose prompts tokenize_prompts keeps: those that are not empty."""
    return data.select([i for i, prompt in enumerate(data["prompt"]) if prompt])


def load_splits(name: str, config: Optional[str], train_split: str, eval_split: str, holdout: int, seed: int):
    """(train, eval) datasets from a hub name, a local directory or a data file."""
    path = resolve_path(name)
    if os.path.isfile(path):
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(os.path.splitext(path)[1])
        if kind is None:
            raise UsageError(f"don't know how to read {path!r}: use .json, .jsonl, .parquet or .csv")
        data = DatasetDict({"train": load_dataset(kind, data_files=path, split="train")})
    else:
        data = load_dataset(path, config)
    if train_split not in data:
        raise UsageError(f"split {train_split!r} not in {name!r}; it has {list(data)}")
    if eval_split in data:
        return data[train_split], data[eval_split]
    rows = len(data[train_split])
    size = min(holdout, rows // 10)  # a small dataset gives at most a tenth of its rows
    if size == 0:
        why = "eval_holdout=0" if holdout == 0 else f"{rows} rows are too few to hold any out"
        print(f"no {eval_split!r} split in {name!r} and {why}: no evaluation")
        return data[train_split], None
    capped = f" (eval_holdout={holdout} capped at a tenth)" if size < holdout else ""
    print(f"no {eval_split!r} split in {name!r}: holding out {size} of its {rows} {train_split!r} rows for "
          f"evaluation{capped}")
    parts = data[train_split].train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def tokenize_prompts(dataset, tokenizer, max_prompt_length: int, desc: str) -> list[list[int]]:
    """Token ids of every prompt: message lists through the chat template (with the generation prompt), text as is."""
    if "prompt" not in dataset.column_names:
        raise UsageError(f"the {desc} split has no column 'prompt' (columns: {sorted(dataset.column_names)}); "
                         "it should hold text, or a list of {'role', 'content'} messages")
    prompts, truncated, skipped = [], 0, 0
    for i, prompt in enumerate(dataset["prompt"]):
        if not prompt:
            skipped += 1
            continue
        if is_conversation(prompt):
            if tokenizer.chat_template is None:
                raise UsageError("conversational prompts need a tokenizer with a chat template; this one has none")
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own bos
        elif isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=not bos_written(tokenizer, prompt))["input_ids"]
        else:
            raise UsageError(f"row {i}: 'prompt' should be a string or a list of {{'role', 'content'}} messages, got "
                             f"{type(prompt).__name__}")
        truncated += len(ids) > max_prompt_length
        prompts.append(ids[-max_prompt_length:])  # keep the end: the question next to the answer
    print(f"{desc}: {len(prompts)} prompts kept of {len(dataset)}; {truncated} truncated to their last "
          f"{max_prompt_length} tokens; {skipped} empty skipped")
    if not prompts:
        raise UsageError(f"no usable prompts in the {desc} split")
    return prompts


def bos_written(tokenizer, text: str) -> bool:
    """Whether text begins with the tokenizer's bos written out (a chat template's rendering stored as a string): the
    tokenizer must not add a second one."""
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


class RolloutPrompts:
    """This rank's prompts of each rollout, and the uniform numbers its responses are sampled from.

    Rollout k takes the next rollout_batch_size x processes prompts of an epoch order (a pure function of the seed and
    the epoch), each repeated samples_per_prompt times (a prompt's samples are contiguous). The uniforms are drawn for
    the whole rollout from a generator seeded by (seed, k), so a resumed run replays them and a row's sample does not
    depend on the number of processes. Prompt orders, sampling and minibatch shuffles draw from three streams,
    seeded by 3 x epoch, 3k + 1 and 3k + 2.
    """

    def __init__(self, prompts: list[list[int]], args, runtime: Runtime, samples_per_prompt: int):
        self.prompts, self.args, self.runtime, self.samples_per_prompt = prompts, args, runtime, samples_per_prompt
        self.batch_size = args.rollout_batch_size * samples_per_prompt * runtime.world  # responses, over all ranks
        self.orders: dict[int, list[int]] = {}

    def of_rollout(self, rollout: int) -> tuple[list[int], torch.Tensor]:
        """(indices into prompts, uniforms (B, max_new_tokens)) of this rank's responses in rollout `rollout`."""
        picked, args, runtime = [], self.args, self.runtime
        first = (rollout * runtime.world + runtime.rank) * args.rollout_batch_size  # this rank's block of slots
        for slot in range(first, first + args.rollout_batch_size):
            epoch, i = divmod(slot, len(self.prompts))
            if epoch not in self.orders:
                self.orders[epoch] = prompt_order(len(self.prompts), args.seed, epoch)
            picked += [self.orders[epoch][i]] * self.samples_per_prompt
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + 3 * rollout + 1)
        uniforms = torch.rand(self.batch_size, args.max_new_tokens, generator=generator)  # (B, R) over all ranks
        local = self.batch_size // runtime.world
        return picked, uniforms[runtime.rank * local : (runtime.rank + 1) * local]


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """One epoch's order of the n prompts, a pure function of (seed, epoch) so a resumed run replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 3 * epoch)).tolist()


@dataclass
class UpdateBatch:
    """This rank's part of one micro-batch of a PPO minibatch: rows of the rollout, of which the first n are real."""

    rows: torch.Tensor  # (b,) indices into the rollout
    real: torch.Tensor  # (b,) False for stand-in rows, which weigh 0
    last: bool  # the minibatch's last micro-batch, after which the ranks' gradients are reduced


class Minibatches:
    """The minibatches of each rollout: `epochs` shuffles of the rollout (a generator seeded by the seed and the
    rollout), each cut into minibatches of per_device_train_batch_size x processes x gradient_accumulation_steps
    responses, one optimizer step each; every micro-batch of a minibatch is cut into equal parts, one per rank."""

    def __init__(self, rollout_size: int, epochs: int, args, runtime: Runtime):
        self.args, self.runtime, self.rollout_size, self.epochs = args, runtime, rollout_size, epochs
        self.micro_size = args.per_device_train_batch_size * runtime.world  # one micro-batch over all ranks
        self.size = self.micro_size * args.gradient_accumulation_steps
        self.per_epoch = math.ceil(rollout_size / self.size)
        self.per_rollout = epochs * self.per_epoch

    def of_rollout(self, rollout: int):
        """(the minibatch's rows, [this rank's UpdateBatch of each of its micro-batches]) of every update."""
        device, rank, world = self.runtime.device, self.runtime.rank, self.runtime.world
        shuffle = torch.Generator().manual_seed(self.args.seed * 1_000_003 + 3 * rollout + 2)
        for _ in range(self.epochs):
            order = torch.randperm(self.rollout_size, generator=shuffle).to(device)
            for m in range(self.per_epoch):
                minibatch = order[m * self.size : (m + 1) * self.size]
                starts = range(0, len(minibatch), self.micro_size)
                parts = []
                for s in starts:
                    rows, n = rank_share(minibatch[s : s + self.micro_size].tolist(), rank, world)
                    real = torch.arange(len(rows), device=device) < n
                    parts.append(UpdateBatch(torch.tensor(rows, device=device), real, s == starts[-1]))
                yield minibatch, parts


def rank_share(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's contiguous part of a global batch, and how many of its items are real.

    Every rank gets the same number of items, because DDP and FSDP2 need
    every rank in every forward and backward: a short part is filled with
    stand-ins (the batch's first item), which the caller weights 0.
    """
    size = -(-len(items) // world)
    share = items[rank * size : (rank + 1) * size]
    return share + items[:1] * (size - len(share)), len(share)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (B, P): prompts left-padded so that every response starts at column P."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate(model, query: torch.Tensor, query_mask: torch.Tensor, max_new_tokens: int, temperature: float,
             eos_ids: list[int], uniforms: torch.Tensor) -> torch.Tensor:
    """Sample up to max_new_tokens after each left-padded query (B, P) with the KV cache; returns ids (B, R).

    Token t of row b is drawn by inverting the CDF at uniforms[b, t] (B, max_new_tokens), so a row's sample depends on
    its own draws only, not on the rows it is batched with or on the number of processes. Stops once every row (on
    every rank) has sampled one of eos_ids; what a row samples after it is cut by truncate_after_eos.
    """
    position_ids = (query_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding must not shift positions
    out = model.base_model(input_ids=query, attention_mask=query_mask, position_ids=position_ids, use_cache=True)
    attention_mask, position = query_mask, position_ids[:, -1:]
    eos = torch.tensor(eos_ids, device=query.device)
    tokens, done = [], torch.zeros(len(query), dtype=torch.bool, device=query.device)
    while True:
        logits = lm_logits(model, out.last_hidden_state[:, -1])  # (B, V), as the log-probs trained on are made
        token = sample_tokens(logits, temperature, uniforms[:, len(tokens)])  # (B, 1)
        tokens.append(token)
        done |= torch.isin(token[:, 0], eos)
        finished = done.all().int()
        if dist.is_initialized():  # every rank stops at the same step: FSDP2 gathers each layer with all ranks at once
            dist.all_reduce(finished, op=dist.ReduceOp.MIN)
        if finished or len(tokens) == max_new_tokens:
            return torch.cat(tokens, dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
        position = position + 1
        # the model's own KV cache, passed back under the name its output gives it: `cache` in recent transformers 5.x
        # (where `past_key_values` warns that it goes in 5.40), `past_key_values` in earlier ones
        cache_name = "cache" if "cache" in out else "past_key_values"
        out = model.base_model(input_ids=token, attention_mask=attention_mask, position_ids=position, use_cache=True,
                               **{cache_name: out[cache_name]})


def sample_tokens(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor) -> torch.Tensor:
    """Tokens (B, 1) drawn from softmax(logits / temperature), logits (B, V), by inverting the CDF at uniforms (B,).

    The softmax and its CDF are float64, so that the cumulative sum's rounding stays below a rare token's
    probability (docs/real_models.md). MPS has no float64, so there they are computed on the CPU.
    """
    device = logits.device
    logits = logits.cpu() if device.type == "mps" else logits
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)  # (B, V)
    u = uniforms[:, None].to(cdf) * cdf[:, -1:]  # (B, 1), below the total mass despite rounding
    token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1): the first with cdf > u
    return token.to(device)


def cut_left_padding(query: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a left-padded chunk, (B, P) -> (B, P' <= P)."""
    first = int(query_mask.any(0).long().argmax())
    return query[:, first:], query_mask[:, first:]


def truncate_after_eos(responses: torch.Tensor, eos_ids: list[int],
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each sampled response after its first EOS, any of eos_ids.

    responses (B, R) sampled ids. Returns the responses with every token after
    the first EOS replaced by pad_id (B, R), the mask of kept tokens (B, R, EOS
    included) and has_eos (B,).
    """
    is_eos = torch.isin(responses, torch.tensor(eos_ids, device=responses.device))
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return responses.masked_fill(after, pad_id), ~after, is_eos.any(-1)


def pad_right(x: torch.Tensor, width: int, value) -> torch.Tensor:
    """(B, W) -> (B, width), filled with value."""
    return torch.cat([x, x.new_full((len(x), width - x.shape[1]), value)], dim=1)


@contextlib.contextmanager
def timed(timings: Counter, name: str, device: torch.device):
    """Adds the block's wall time to timings[name], measured between points where the device has no work queued."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    timings[name] += seconds_since(start, device)


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


@torch.no_grad()
def no_grad_pass(fn, model, batch: dict, batch_size: int, runtime: Runtime):
    """fn(model, query, query_mask, response, mask) over the whole rollout in chunks of batch_size: one pass of one
    model, its outputs joined along the batch (a tuple of outputs, each joined)."""
    outputs = []
    for s in range(0, len(batch["query"]), batch_size):
        part = [batch[k][s : s + batch_size] for k in ("query", "query_mask", "response", "mask")]
        with runtime.autocast():
            outputs.append(model(fn, *part))
    return torch.cat(outputs) if isinstance(outputs[0], torch.Tensor) else [torch.cat(o) for o in zip(*outputs)]


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


def in_chunks(fn, model, *rows: torch.Tensor) -> torch.Tensor:
    """fn(model, *rows), computed model.logp_chunk_tokens rows at a time (all at once if 0 or unset), concatenated.

    For the LM head: a chunk's (rows, V) logits are freed once its outputs are computed, and made again in the
    backward pass (non-reentrant activation checkpointing), so only one chunk's logits exist at once in either pass,
    at the cost of one more LM-head forward. The values are those of one call on all the rows, up to float rounding.
    Rows that fit in one chunk are computed directly, with no recomputation.
    """
    chunk_tokens = getattr(model, "logp_chunk_tokens", 0)  # set by load_model from --logp_chunk_tokens
    if not chunk_tokens or len(rows[0]) <= chunk_tokens:
        return fn(model, *rows)
    from torch.utils.checkpoint import checkpoint

    chunks = zip(*(r.split(chunk_tokens) for r in rows))
    return torch.cat([checkpoint(fn, model, *chunk, use_reentrant=False) for chunk in chunks])


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits from final hidden states, (..., H) -> (..., V), as the model's own forward makes them.

    Every log-prob in these scripts goes through here, so each model family's treatment of its logits is applied once;
    check_log_probs stops a run whose model family does something else.
    """
    logits = model.get_output_embeddings()(hidden).float()
    config = model.config.get_text_config()
    if getattr(config, "logits_scaling", None) and "hyperclovax" in config.model_type:  # HyperCLOVA X multiplies them
        logits = logits * config.logits_scaling
    elif getattr(config, "logits_scaling", None):  # Granite divides them
        logits = logits / config.logits_scaling
    if getattr(config, "lm_head_multiplier", None):  # Falcon-H1 multiplies them
        logits = logits * config.lm_head_multiplier
    if getattr(config, "logit_scale", None):  # Cohere multiplies them
        logits = logits * config.logit_scale
    if getattr(config, "final_logit_softcapping", None):  # Gemma 2/3 soft-cap them
        cap = config.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def check_log_probs(model, sequence: list[int], start: int, runtime: Runtime) -> None:
    """Stop before training if this file's log-probs (the model's body, then lm_logits) of one sequence's first 64
    response tokens differ from log_softmax of the model's own logits by more than 0.05 nats a token on average.

    A model family whose logits lm_logits does not treat is off by nats a token (docs/changes.md). Every rank calls.
    """
    input_ids = torch.tensor([sequence[: start + 64]], device=runtime.device)
    with runtime.autocast():
        gap = model(log_prob_gap, input_ids, start)
    if gap > 0.05:
        config = unwrap(model).config
        raise UsageError(f"{type(unwrap(model)).__name__} (model_type {config.model_type!r}): this file's log-probs "
                         f"differ from the model's own logits by {gap:.3f} nats a token. Its LM head's output is "
                         "scaled in a way lm_logits does not know; add the model family there.")


def log_prob_gap(model, input_ids: torch.Tensor, start: int) -> float:
    """Mean |difference| over input_ids[0, start:] of lm_logits' log-probs and those of the model's own forward."""
    targets = input_ids[0, start:, None]  # (R, 1): the response tokens
    hidden = model.base_model(input_ids=input_ids).last_hidden_state[0, start - 1 : -1]  # (R, H)
    ours = torch.log_softmax(lm_logits(model, hidden), -1).gather(-1, targets)
    logits = model(input_ids=input_ids, logits_to_keep=len(targets) + 1).logits[0, :-1].float()  # (R, V)
    theirs = torch.log_softmax(logits, -1).gather(-1, targets)
    return (ours - theirs).abs().mean().item()


def all_sum(values: dict, device) -> dict:
    """Each value summed over the ranks, in one all-reduce (unchanged on one process)."""
    if not dist.is_initialized():
        return dict(values)
    keys = list(values)  # the same order on every rank: the same code filled it
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dict(zip(keys, total.tolist()))


def sample_table(tokenizer, query, query_mask, response, response_mask, *columns) -> list[list]:
    """[prompt, response, *values] rows: the texts, and each row's value in every column (B,), rounded."""
    rows = []
    for q, q_mask, r, r_mask, *values in zip(query, query_mask, response, response_mask, *columns):
        rows.append([tokenizer.decode(q[q_mask.bool()], skip_special_tokens=True).strip(),
                     tokenizer.decode(r[r_mask.bool()], skip_special_tokens=True).strip(),
                     *(round(float(v), 4) for v in values)])
    return rows


def linear_schedule(optimizer, warmup_ratio: float, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_ratio of the steps, then linear decay to 0."""
    warmup = int(warmup_ratio * total_steps)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def restore_training_state(state: Optional[dict], model, optimizer, scheduler, runtime: Runtime,
                           resume_from: Optional[str]) -> int:
    """Load a checkpoint's optimizer, scheduler and RNG states; returns the step to start from (0 for a new run)."""
    if state is None:
        return 0
    load_optimizer_state(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if len(state["rng"]) == runtime.world:
        set_rng_state(state["rng"][runtime.rank])
    else:
        print(f"the checkpoint has RNG states for {len(state['rng'])} processes, not {runtime.world}: "
              "they are not restored")
    print(f"resumed from {resume_from} at step {state['step']}")
    return state["step"]


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """The inverse of optimizer_state: each rank takes its own shards from the whole state."""
    if not any(hasattr(m, "reshard") for m in model.modules()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_tracking(args, runtime: Runtime):
    """A wandb run on rank 0 with --track, else None (wandb is imported here, so importing this file stays silent)."""
    if not (args.track and runtime.rank == 0):
        return None
    import wandb

    return wandb.init(project=args.wandb_project, name=args.run_name, config=asdict(args))


def sync_gradients(model, sync: bool):
    """Context for one micro-batch: gradients are reduced across ranks only on the last of an optimizer step.

    `model` is one wrapped model, or a ModuleList of them (PPO trains two).
    """
    context = contextlib.ExitStack()
    for part in model if isinstance(model, torch.nn.ModuleList) else [model]:
        if isinstance(part, DDP) and not sync:
            context.enter_context(part.no_sync())
        elif hasattr(part, "set_requires_gradient_sync"):  # FSDP2
            part.set_requires_gradient_sync(sync)
    return context


def check_finite(value: torch.Tensor, what: str, where: str, last_checkpoint: Optional[str]) -> None:
    """Stop the run at a NaN or infinite loss or gradient norm, naming the last checkpoint to resume from."""
    if not torch.isfinite(value).all():
        raise FloatingPointError(f"{what} is {value.mean().item()} at {where}; stopping. "
                                 f"Last good checkpoint: {last_checkpoint or 'none saved'}")


def clip_gradients(model, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_, returning the norm before clipping as a plain tensor (FSDP2 returns a DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def seconds_since(start: float, device: torch.device) -> float:
    """Wall time since `start` (time.perf_counter), once the device's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def log_metrics(metrics: dict, step: int, total_steps: int, logging_steps: int, tracker, label: str = "step",
                tracker_step: Optional[int] = None) -> None:
    """Print every logging_steps steps and at the last; every step goes to wandb with --track (at tracker_step if
    given, else at step)."""
    if step % logging_steps == 0 or step == total_steps:
        tqdm.write(f"{label} {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if tracker is not None:
        tracker.log(metrics, step=step if tracker_step is None else tracker_step)


def save_checkpoint(args, step: int, model, tokenizer, optimizer, scheduler, runtime: Runtime, trained=None,
                    also=None, **extra) -> str:
    """output_dir/checkpoint-{step}: the model, then what --resume_from reads: the optimizer, the scheduler, every
    rank's RNG state and `extra`. `trained` holds every module the optimizer trains (default: the model); `also`
    goes to `save`. Returns the checkpoint's path; every rank calls it."""
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    state = {"step": step, "optimizer": optimizer_state(model if trained is None else trained, optimizer),
             "scheduler": scheduler.state_dict(), "rng": rank_rng_states(runtime.world)}
    save(path, model, tokenizer, args, state | extra, also)
    return path


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state for a checkpoint; under FSDP2 gathered whole, keyed by parameter name (all ranks call)."""
    if not any(hasattr(m, "reshard") for m in model.modules()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def rank_rng_states(world: int) -> list:
    """Every rank's RNG states, gathered so that rank 0 can save them (every rank must call this)."""
    states = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(states, rng_state())
    return states


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain Python (numpy's key array as a list), so that a checkpoint
    loads with torch.load(weights_only=True)."""
    kind, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), *rest], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save(path: str, model, tokenizer, args, state: Optional[dict] = None, also=None) -> None:
    """An HF model directory (safetensors + tokenizer + args.json); with `state`, also what resuming needs; `also`,
    called on every rank with the directory being written, adds more to it.

    Everything goes to path + ".tmp" first and is moved into place once complete (`publish`), so a process killed
    mid-save leaves no directory that looks whole and is not. Every rank calls it (FSDP2 gathers the shards); rank 0
    writes.
    """
    writer = not dist.is_initialized() or dist.get_rank() == 0
    staging = os.path.normpath(path) + ".tmp"
    if writer and os.path.isdir(staging):  # left by a run killed while saving
        shutil.rmtree(staging)
    save_model(staging, model)
    if also is not None:
        also(staging)
    if writer and args.merge_lora and args.lora_r and state is None:  # a final model, not a checkpoint
        save_merged(staging, os.path.join(staging, "merged"), model, tokenizer)
    if writer:
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        if state is not None:
            torch.save(state, os.path.join(staging, "training_state.pt"))
        publish(staging, path)
    if dist.is_initialized():
        dist.barrier()  # nobody reads a checkpoint before it is written


def publish(staging: str, path: str) -> None:
    """Move a completely written directory to `path`: renamed whole (atomic) where path is new, as a checkpoint is;
    into an existing path (the final output_dir, which holds the checkpoints) file by file, each rename atomic. There
    a model an earlier run left (a LoRA adapter beside full weights, a stale merged/ copy) goes first: it would be read
    in place of this one."""
    if not os.path.isdir(path):
        os.rename(staging, path)
        return
    written = set(os.listdir(staging))
    for name in set(os.listdir(path)) - written:
        stale = name in ("config.json", "generation_config.json", CLASSIFIER_CONFIG, "merged", "value_model") or (
            name.startswith(("adapter_", "model")) and name.endswith((".safetensors", ".json")))
        if stale:
            target = os.path.join(path, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    for name in written:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def save_model(path: str, model) -> None:
    """The inner model as a Hugging Face directory; FSDP2 shards are gathered first. Every rank calls, rank 0 writes."""
    weights = full_state_dict(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        unwrap(model).save_pretrained(path, state_dict=weights)
        if hasattr(unwrap(model), "peft_config") and type(hf_model(unwrap(model))).__name__.endswith(
                "ForSequenceClassification"):  # a classifier's adapter: its config too (head size, pad id)
            hf_model(unwrap(model)).config.to_json_file(os.path.join(path, CLASSIFIER_CONFIG))


def save_merged(adapter_path: str, path: str, model, tokenizer) -> None:
    """The adapter saved at adapter_path merged into a float32 copy of its base (on the CPU), as a plain Hugging Face
    model directory: merging into a bf16 base would round the update away."""
    inner = hf_model(unwrap(model))
    base = type(inner).from_pretrained(saved_adapter(adapter_path)["base_model_name_or_path"], config=inner.config,
                                       dtype=torch.float32)
    with_adapter(base, adapter_path, SimpleNamespace(dtype="float32"), trainable=False).save_pretrained(path)
    tokenizer.save_pretrained(path)


def full_state_dict(model) -> Optional[dict]:
    """Under FSDP2, the inner model's whole state dict gathered on CPU (every rank must call this); else None."""
    if not hasattr(model, "reshard"):  # not an FSDP2 module: the model holds its full weights
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    inner = unwrap(model)
    tied = dict(inner.named_parameters(remove_duplicate=False)).keys() - dict(inner.named_parameters()).keys()
    # as save_pretrained writes them
    return {k.removeprefix("model."): v for k, v in weights.items() if k.removeprefix("model.") not in tied}


def unwrap(model):
    """The Hugging Face model inside Forward (and DDP)."""
    return (model.module if isinstance(model, DDP) else model).model


class UsageError(ValueError):
    """A bad flag, column, value or path, found on purpose: the script prints the message alone and exits with status 2,
    as for a bad command line. Any other error keeps its traceback."""


if __name__ == "__main__":
    try:
        train(tyro.cli(Args, use_underscores=True))
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
