"""Online DPO: DPO on the current policy's own samples, labelled by a reward model, in one file.

Papers: Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", https://arxiv.org/abs/2402.04792;
Xiong et al. 2023, "Iterative Preference Learning from Human Feedback", https://arxiv.org/abs/2312.11456

Each round samples two answers y1, y2 ~ pi_theta(.|x) per prompt, scores them with a reward model r_hat, and labels
the pair; then DPO (Rafailov et al. 2023, Eq. 7) trains on the labelled pairs against the fixed pi_ref:

    L = -E_{x, (y_w, y_l) ~ pi_theta, label}[ log sigmoid(beta h) ],  h = log-ratio margin of y_w over y_l vs pi_ref

Labels (--label). `bradley_terry`: y1 is chosen with probability sigmoid(r_hat(y1) - r_hat(y2)). For any sampling
distribution with full support, DPO's population minimiser under these labels is pi_ref exp(r_hat / beta) / Z, so
that policy is the fixed point of sampling from the current policy (at any temperature). `argmax` (TRL's): y1 is
chosen when r_hat(y1) >= r_hat(y2). The labels are then deterministic, no finite policy fits them, and on a bandit the
mass keeps moving onto r_hat's best answer, at any beta (tests/test_online_dpo_optimum.py).

Deviations and options
- Online (the default): each round samples one optimizer step's prompts and takes that step, as TRL's
  OnlineDPOTrainer does. --iterative: each round samples --prompts_per_round prompts, then trains --epochs_per_round
  passes over their pairs; --update_reference then makes each round's reference the policy the round starts from, and
  round t lands near pi_ref exp(t r_hat / beta) / Z: the fixed point is lost.
- Sampling at --temperature 1 (TRL's default is 0.9) with no top-p. An answer without an EOS within --max_new_tokens
  is kept, minus --missing_eos_penalty in its score, as in TRL; the fixed point then has r_hat minus that penalty. A
  pair of two equal answers has h = 0 and no gradient; it is counted (rollout/identical).
- The reward model shares the policy's tokenizer (a one-label *ForSequenceClassification, as reward_model.py makes)
  and is read at the EOS, as ppo_rlhf.py reads it.

Usage
    python reward_model.py && python online_dpo.py   # the embedded toy world: a reward model, then online DPO
    python online_dpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --reward_model_path runs/rm-tldr \\
        --dataset_name trl-lib/tldr --max_prompt_length 512 --max_new_tokens 53 --missing_eos_penalty 1.0 \\
        --beta 0.1 --learning_rate 5e-7 --num_rounds 500 --per_device_train_batch_size 8 \\
        --gradient_accumulation_steps 4 --gradient_checkpointing --output_dir runs/online-dpo-qwen

Logged metrics (one dict per optimizer step; printed every --logging_steps, and to wandb with --track)
    train/loss, train/rewards/{chosen,rejected,margin,accuracy}, train/logps/{chosen,rejected}    as in dpo.py
    objective/score             mean r_hat of the round's answers, after the missing-EOS penalty
    objective/score_margin      mean r_hat(y_w) - r_hat(y_l) over the round's pairs
    rollout/length, rollout/no_eos, rollout/identical   answer tokens, answers without an EOS, pairs of equal answers
    train/round, train/lr, train/grad_norm, perf/tokens_per_sec
    eval/score                  mean r_hat of two answers per held-out prompt, with a few pairs printed
"""

import atexit
import contextlib
import functools
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
import torch.nn.functional as F
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
    reward_model_path: str = "runs/reward_model"
    """the judge r_hat: a one-label sequence classifier with the policy's tokenizer (`python reward_model.py`'s)"""
    dataset_name: str = "toy_world/prompts"
    """prompts: a hub name, a local directory or a data file with a 'prompt' column (text, or a list of messages)"""
    dataset_config: Optional[str] = None
    """the dataset's configuration name, if it has several"""
    train_split: str = "train"
    """split to draw prompts from"""
    eval_split: str = "test"
    """held-out prompts for evaluation; if the dataset has none, `eval_holdout` rows of the train split are held out"""
    eval_holdout: int = 512
    """rows held out from the train split when the dataset has no `eval_split`, at most a tenth (0: no evaluation)"""
    max_prompt_length: int = 256
    """tokens kept from the end of a longer prompt"""
    max_new_tokens: int = 5
    """answer budget in tokens, EOS included (the toy world's answers are at most 4 words + EOS)"""
    temperature: float = 1.0
    """sampling temperature (any > 0 keeps the Bradley-Terry fixed point: it sets which pairs are seen)"""
    # ---- the method
    beta: float = 0.1
    """beta of DPO's Eq. 7: the strength of the KL penalty toward pi_ref (smaller moves further)"""
    label: Literal["bradley_terry", "argmax"] = "bradley_terry"
    """bradley_terry: y1 chosen with probability sigmoid(r_hat1 - r_hat2) (fixed point pi_ref exp(r_hat / beta) / Z);
    argmax: y1 chosen when r_hat1 >= r_hat2 (TRL's; moves toward r_hat's best answers)"""
    missing_eos_penalty: float = 0.0
    """subtracted from the score of an answer with no EOS within max_new_tokens (0 = off)"""
    num_rounds: int = 200
    """rounds of sample-score-label-train in the run"""
    iterative: bool = False
    """iterative DPO: rounds of --prompts_per_round pairs, --epochs_per_round passes each (off: one step a round)"""
    prompts_per_round: int = 1024
    """with --iterative: prompts (so pairs) sampled per round, over all processes"""
    epochs_per_round: int = 2
    """with --iterative: passes over each round's pairs"""
    update_reference: bool = False
    """with --iterative: each round's reference is the policy the round starts from, not pi_ref"""
    # ---- optimisation
    learning_rate: float = 3e-4
    """peak AdamW learning rate (the toy world's; about 5e-7 suits a real 0.5-7B model)"""
    per_device_train_batch_size: int = 32
    """pairs per micro-batch on each process (a step sees this x processes x gradient_accumulation_steps)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    forward_batch_size: int = 64
    """answers per batch in generation, scoring and (--update_reference) the reference's pass"""
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
    """LoRA rank: train a float32 adapter on a frozen base, the reference if none is named or updated (0: all)"""
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
    """print metrics every this many optimizer steps"""
    eval_steps: int = 50
    """answer held-out prompts and print a few of their pairs every this many rounds (0 = only at the end)"""
    num_eval_prompts: int = 64
    """held-out prompts answered at each evaluation (the first ones of the split)"""
    num_printed_samples: int = 8
    """held-out pairs printed at each evaluation"""
    save_steps: int = 0
    """save a resumable checkpoint every this many rounds (0 = only the final model)"""
    output_dir: str = "runs/online_dpo"
    """where the final model and checkpoints go"""
    resume_from: Optional[str] = None
    """a checkpoint (output_dir/checkpoint-N, N rounds done) to continue from; `latest`: output_dir's newest"""
    seed: int = 1
    """seed for python, numpy and torch, the prompt order, sampling, labels and the held-out split"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "single-file-alignment"
    """wandb project"""
    run_name: Optional[str] = None
    """wandb run name"""

    def __post_init__(self):  # a bad value stops the run before any work, naming the flag
        if self.temperature <= 0 or self.max_new_tokens < 1:
            raise UsageError("online DPO samples its answers: temperature must be > 0 and max_new_tokens >= 1")
        if self.iterative and (self.prompts_per_round < 1 or self.epochs_per_round < 1):
            raise UsageError(f"--iterative needs prompts_per_round ({self.prompts_per_round}) and epochs_per_round "
                             f"({self.epochs_per_round}) >= 1")
        if self.update_reference and not self.iterative:  # one step a round: the reference would be the policy itself
            raise UsageError("--update_reference needs --iterative: with one step a round, the reference would be the "
                             "policy being trained, h = 0 at every step and the update unregularised")
        if self.update_reference and self.ref_model_name_or_path:
            raise UsageError("--update_reference replaces the reference each round: --ref_model_name_or_path is unused")


# ---------------------------------------------------------------------------------------------------------- the method
def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair (Eq. 7 of arXiv:2305.18290), with cDPO label smoothing.

    All inputs are response log-probs of shape (B,), each summed over its response's tokens.
    Returns losses (B,), chosen_rewards (B,), rejected_rewards (B,); a reward is
    beta * (log pi_theta - log pi_ref), detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # beta * h, (B,)
    # cDPO: the label is flipped with probability eps (Mitchell 2023, "A note on DPO with noisy preferences")
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ---------------------------------------------------------------------------------------------------------- training


def label_probability(first_scores: torch.Tensor, second_scores: torch.Tensor, label: str) -> torch.Tensor:
    """P(the first answer is chosen) (B,) for pairs scored first_scores, second_scores (B,) by the judge:
    sigmoid(r1 - r2) with Bradley-Terry labels; 1 where r1 >= r2, else 0, with argmax labels (TRL's: a tie picks the
    first)."""
    if label == "argmax":
        return (first_scores >= second_scores).to(first_scores.dtype)
    return torch.sigmoid(first_scores - second_scores)


def penalised_scores(scores: torch.Tensor, has_eos: torch.Tensor, missing_eos_penalty: float) -> torch.Tensor:
    """scores (B,) minus missing_eos_penalty where has_eos (B,) is False."""
    return torch.where(has_eos, scores, scores - missing_eos_penalty)


# ------------------------------------------------------------------------------------------- the method's own data
def round_prompts(prompts: list[list[int]], n: int, round_: int, seed: int) -> list[list[int]]:
    """The n prompts of round `round_`: the next n of an epoch order (a pure function of the seed and the epoch)."""
    orders, picked = {}, []
    for slot in range(round_ * n, (round_ + 1) * n):
        epoch, i = divmod(slot, len(prompts))
        if epoch not in orders:
            orders[epoch] = prompt_order(len(prompts), seed, epoch)
        picked.append(prompts[orders[epoch][i]])
    return picked


@torch.no_grad()
def online_pairs(policy, reward_model, prompts: list[list[int]], args: Args, eos_ids: list[int], pad_id: int,
                 seed: int, runtime) -> tuple[list[dict], dict]:
    """Two answers per prompt sampled from the policy, scored by the judge and labelled, as pairs in dpo.py's row
    format (chosen first), with the round's statistics.

    Prompt i's answers and label come from draws of a generator seeded by `seed` and kept at row i, so the pairs
    depend neither on the batching nor on the number of processes: the ranks split the prompts, then share the pairs.
    """
    g = torch.Generator().manual_seed(seed)
    uniforms = torch.rand(len(prompts), 2, args.max_new_tokens, generator=g)  # (N, 2, R): each answer's draws
    label_draws = torch.rand(len(prompts), generator=g)  # (N,)
    made: dict[int, list] = {}
    step = max(1, args.forward_batch_size // 2) * runtime.world
    for s in range(0, len(prompts), step):
        chunk, n = rank_share(list(range(s, min(s + step, len(prompts)))), runtime.rank, runtime.world)
        # 1. two answers per prompt (rows 2b and 2b + 1), each from its own draws
        query, query_mask = (t.to(runtime.device) for t in left_pad([prompts[i] for i in chunk for _ in "12"], pad_id))
        with runtime.autocast():
            raw = policy(generate, *cut_left_padding(query, query_mask), args.max_new_tokens, args.temperature,
                         eos_ids, uniforms[chunk].flatten(0, 1).to(runtime.device))
        response, mask, has_eos = truncate_after_eos(raw, eos_ids, pad_id)
        # 2. the judge's scores, at the EOS token
        with runtime.autocast():
            scores = penalised_scores(reward_model(reward_scores, query, query_mask, response, mask), has_eos,
                                      args.missing_eos_penalty)
        for b, i in enumerate(chunk[:n]):
            made[i] = [(response[r][mask[r]].tolist(), bool(has_eos[r]), float(scores[r])) for r in (2 * b, 2 * b + 1)]
    made = gather_dicts(made)  # every rank's pairs
    # 3. the labels: the first answer is chosen with probability label_probability
    scores = torch.tensor([[made[i][0][2], made[i][1][2]] for i in range(len(prompts))])  # (N, 2)
    first_chosen = label_draws < label_probability(scores[:, 0], scores[:, 1], args.label)
    rows, margin = [], 0.0
    for i, prompt in enumerate(prompts):
        (chosen, _, chosen_score), (rejected, _, rejected_score) = made[i][:: 1 if first_chosen[i] else -1]
        rows.append({"chosen": prompt + chosen, "chosen_start": len(prompt), "rejected": prompt + rejected,
                     "rejected_start": len(prompt), "index": i, "scores": (chosen_score, rejected_score)})
        margin += chosen_score - rejected_score
    answers = [answer for i in range(len(prompts)) for answer in made[i]]
    stats = {"objective/score": float(scores.mean()), "objective/score_margin": margin / len(prompts),
             "rollout/length": sum(len(a[0]) for a in answers) / len(answers),
             "rollout/no_eos": sum(not a[1] for a in answers) / len(answers),
             "rollout/identical": sum(made[i][0][0] == made[i][1][0] for i in made) / len(prompts)}
    return rows, stats


def print_pairs(tokenizer, rows: list[dict], done: int, n: int) -> None:
    """The first n pairs as text: prompt | chosen (score) | rejected (score)."""
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
    lines = [f"  {decode(r['chosen'][: r['chosen_start']]).strip()!r} | {decode(r['chosen'][r['chosen_start']:])!r} "
             f"({r['scores'][0]:.3f}) | {decode(r['rejected'][r['rejected_start']:])!r} ({r['scores'][1]:.3f})"
             for r in rows[:n]]
    tqdm.write(f"held-out pairs after round {done} (prompt | chosen (score) | rejected (score)):\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------- training
def train(args: Args) -> dict:
    runtime = setup(args)  # torchrun's process group (or none), the seeds, the device, bf16 autocast on CUDA

    # ---- models: the policy, the frozen reference pi_ref and the judge r_hat
    policy_path = resolve_path(args.resume_from or args.model_name_or_path)
    rm_path = resolve_path(args.reward_model_path)
    if args.reward_model_path == Args.reward_model_path and not os.path.isdir(rm_path):
        raise UsageError(f"no reward model at {rm_path!r}: train one first with `python reward_model.py` (it saves to "
                         "runs/reward_model), or pass --reward_model_path")
    tokenizer, pad_id = load_tokenizer(policy_path)
    check_same_tokenizer(rm_path, tokenizer)
    state = load_training_state(args.resume_from, policy_path)  # None for a new run
    policy = load_model(policy_path, args, runtime, trained=True)
    ref_model = None if args.update_reference else load_reference(args, runtime, policy)
    reward_model = load_model(rm_path, args, runtime, trained=False, model_class=AutoModelForSequenceClassification)
    if unwrap(reward_model).config.num_labels != 1:
        raise UsageError(f"the reward model {rm_path!r} has {unwrap(reward_model).config.num_labels} labels, not 1")
    eos_ids = eos_token_ids(policy, tokenizer)  # the tokenizer's eos and the model's own (a chat model's turn end)

    # ---- data: prompts, tokenized once; each round takes the next prompts_per_round of them
    train_prompts, eval_prompts, _, _ = load_prompts(args, tokenizer)
    check_log_probs(policy, train_prompts[0], max(1, len(train_prompts[0]) - 64), runtime)  # a known LM head
    micro = args.per_device_train_batch_size * runtime.world  # pairs in one micro-batch over all ranks
    per_round = args.prompts_per_round if args.iterative else micro * args.gradient_accumulation_steps
    epochs = args.epochs_per_round if args.iterative else 1
    steps_per_round = math.ceil(math.ceil(per_round / micro) * epochs / args.gradient_accumulation_steps)
    round_args = SimpleNamespace(**asdict(args), max_steps=-1, num_train_epochs=epochs)  # a round, for TrainBatches

    @torch.no_grad()
    def evaluate(done: int) -> dict:
        """Two answers per held-out prompt (the same draws every time): their mean score, and a few pairs printed."""
        policy.eval()
        rows, stats = online_pairs(policy, reward_model, eval_prompts, args, eos_ids, pad_id, args.seed, runtime)
        policy.train()
        print_pairs(tokenizer, rows, done, args.num_printed_samples)
        return {"eval/score": stats["objective/score"]}

    # ---- optimizer, learning-rate schedule over every round's steps, and where a resumed run left off
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = linear_schedule(optimizer, args.warmup_ratio, args.num_rounds * steps_per_round)
    start_round = restore_training_state(state, policy, optimizer, scheduler, runtime, args.resume_from)
    tracker = init_tracking(args, runtime)

    # ---- the loop: a round samples, scores and labels pairs with the current policy, then trains DPO on them
    metrics, last_checkpoint = {}, args.resume_from
    progress = tqdm(range(start_round, args.num_rounds), desc="online dpo", initial=start_round, total=args.num_rounds)
    for round_ in progress:
        # 1-3. two answers per prompt from the current policy, scored by r_hat and labelled
        policy.eval()
        prompts = round_prompts(train_prompts, per_round, round_, args.seed)
        rows, round_stats = online_pairs(policy, reward_model, prompts, args, eos_ids, pad_id,
                                         args.seed * 1_000_003 + 1_000_000_007 + round_, runtime)  # a stream apart
        policy.train()
        # 4. with --update_reference, the reference is the policy as the round starts: its log-probs of the pairs, now
        ref_logps = None
        if args.update_reference:
            ref_logps = {"train": precompute_ref_logps(policy, rows, max(1, args.forward_batch_size // 2), pad_id,
                                                       runtime)}
        # 5. DPO on the round's pairs: epochs_per_round passes, in micro-batches split over the ranks
        batches = TrainBatches(rows, round_args, runtime, epoch_offset=1_000 * round_)
        for step in range(batches.total_steps):
            sums = MetricSums()  # also starts the step's clock
            for micro_batch in batches.of_step(step):
                batch = to_device(collate(micro_batch.rows, pad_id), runtime.device)
                with sync_gradients(policy, micro_batch.last):
                    with runtime.autocast():
                        chosen, rejected = policy(pair_logps, batch)
                    ref_chosen, ref_rejected = ref_pair_logps(ref_model, ref_logps, batch, "train", runtime)
                    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                                                        args.beta)
                    check_finite(losses, "loss", f"round {round_}", last_checkpoint)
                    micro_batch.global_mean(losses).backward()
                real = slice(max(micro_batch.n, 1))  # a rank with no real row reports its stand-in, weighted 0
                sums.add(pair_metrics("train", *(x[real] for x in (losses, chosen, rejected, chosen_rewards,
                                                                   rejected_rewards))),
                         micro_batch.n, micro_batch.real_tokens(batch["attention_mask"]))
            grad_norm = clip_gradients(policy, args.max_grad_norm)
            check_finite(grad_norm, "gradient norm", f"round {round_}", last_checkpoint)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            metrics, tokens_per_sec = sums.means(runtime.device)
            metrics.update({**round_stats, "train/round": round_ + 1, "train/lr": scheduler.get_last_lr()[0],
                            "train/grad_norm": grad_norm.item(), "perf/tokens_per_sec": tokens_per_sec})
            done_steps = round_ * steps_per_round + step + 1
            if step == batches.total_steps - 1 and eval_prompts and (
                    (args.eval_steps and (round_ + 1) % args.eval_steps == 0) or round_ + 1 == args.num_rounds):
                metrics.update(evaluate(round_ + 1))
            log_metrics(metrics, done_steps, args.num_rounds * steps_per_round, args.logging_steps, tracker)
        progress.set_postfix(score=f"{round_stats['objective/score']:.3f}", loss=f"{metrics['train/loss']:.4f}")
        done = round_ + 1
        if args.save_steps and done % args.save_steps == 0 and done < args.num_rounds:
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


def prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    """One epoch's order of the n prompts, a pure function of (seed, epoch) so a resumed run replays it exactly."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 3 * epoch)).tolist()


class TrainBatches:
    """This rank's micro-batches of each optimizer step, wherever the epoch boundaries fall.

    The order of an epoch is a pure function of (seed, epoch) and the global batch (the per-process batch times the
    processes), the same on every rank: a resumed run replays it, and N processes train on the batches of the
    one-process run with the same global batch. epoch_offset gives a run of several trainings (SPIN's iterations)
    an order of its own for each.
    """

    def __init__(self, rows: list[dict], args, runtime: Runtime, epoch_offset: int = 0):
        self.rows, self.runtime = rows, runtime
        self.seed, self.group_by_length, self.epoch_offset = args.seed, args.group_by_length, epoch_offset
        self.accumulation = args.gradient_accumulation_steps
        self.batch_size = args.per_device_train_batch_size * runtime.world  # one micro-batch over all ranks
        self.batches_per_epoch = math.ceil(len(rows) / self.batch_size)  # the last one short unless it divides
        if self.batches_per_epoch < self.accumulation:
            raise UsageError(f"{len(rows)} training rows make {self.batches_per_epoch} micro-batches of "
                             f"{self.batch_size}, fewer than gradient_accumulation_steps={self.accumulation}")
        # every micro-batch of every epoch is trained on: a step takes the next `accumulation` of them, across an
        # epoch boundary if need be, and the run's last step takes what is left
        self.total_batches = (args.max_steps * self.accumulation if args.max_steps > 0
                              else self.batches_per_epoch * args.num_train_epochs)
        self.total_steps = math.ceil(self.total_batches / self.accumulation)
        self.orders: dict[int, list[list[int]]] = {}

    def of_step(self, step: int):
        """The MicroBatch of each micro-batch of optimizer step `step` (gradient_accumulation_steps of them, fewer in
        the run's last step); each knows the step's number of rows, so that the step's gradient is their mean."""
        numbers = range(step * self.accumulation, min((step + 1) * self.accumulation, self.total_batches))
        micro_batches = []
        for number in numbers:
            epoch, i = divmod(number, self.batches_per_epoch)
            if epoch not in self.orders:
                self.orders[epoch] = batch_order(self.rows, self.batch_size, self.seed, self.epoch_offset + epoch,
                                                 self.group_by_length)
            # epochs trained once this micro-batch is done (1.0 after the first epoch's last), as HF's Trainer counts
            micro_batches.append(([self.rows[j] for j in self.orders[epoch][i]],
                                  epoch + (i + 1) / self.batches_per_epoch))
        step_rows = sum(len(rows) for rows, _ in micro_batches)  # real rows of the step over all ranks
        for m, (rows, epoch) in enumerate(micro_batches):
            share, n = rank_share(rows, self.runtime.rank, self.runtime.world)
            yield MicroBatch(share, n, m == len(micro_batches) - 1, epoch, step_rows, self.runtime.world)


def batch_order(rows: list[dict], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """One epoch of batches (row indices), a pure function of (seed, epoch) so a resumed run replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(rows), generator=g).tolist()
    if group_by_length:  # sort within mega-batches of 64 batches, then shuffle the batches
        mega = 64 * batch_size
        length = lambda i: row_length(rows[i])  # noqa: E731
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=length, reverse=True)]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def row_length(row: dict) -> int:
    """The length that --group_by_length sorts by: a pair's longer sequence, the total tokens of a group, or the longer
    of an unpaired row's completion and its mismatched one (kto.py)."""
    if "seqs" in row:
        return sum(len(s) for s in row["seqs"])
    if "completion" in row:
        return max(len(row["completion"]), len(row["kl"]))
    return max(len(row["chosen"]), len(row["rejected"]))


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
def gather_dicts(part: dict) -> dict:
    """Every rank's dict merged into one, on every rank (the dict itself on one process)."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


@dataclass
class MicroBatch:
    """This rank's part of one global micro-batch: `n` real rows, then stand-ins weighted 0."""

    rows: list
    n: int
    last: bool  # the optimizer step's last micro-batch, after which the ranks' gradients are reduced
    epoch: float  # fractional epoch
    step_rows: int  # real rows in the whole optimizer step: every micro-batch's, over all ranks
    world: int

    def global_mean(self, losses: torch.Tensor) -> torch.Tensor:
        """This rank's share of the step's mean loss over every row of the step, whatever the sizes of its
        micro-batches: DDP averages the ranks' gradients, so each rank's sum is scaled by the number of processes."""
        return losses[: self.n].sum() * self.world / self.step_rows

    def real_tokens(self, attention_mask: torch.Tensor) -> int:
        """Non-padding tokens of the real rows, in a batch that stacks k sequences per row as k blocks of rows."""
        return int(attention_mask.unflatten(0, (-1, len(self.rows)))[:, : self.n].sum())


@torch.no_grad()
def precompute_ref_logps(ref_model, rows: list[dict], batch_size: int, pad_id: int, runtime: Runtime,
                         parts: tuple[str, str] = ("chosen", "rejected")) -> torch.Tensor:
    """Reference log-probs of each row's two sequences `parts`, (len(rows), 2), in one pass split over the ranks."""
    out = torch.zeros(len(rows), 2, device=runtime.device)
    order = sorted(range(len(rows)), key=lambda i: sum(len(rows[i][part]) for part in parts))  # little padding
    step = batch_size * runtime.world
    for s in tqdm(range(0, len(order), step), desc="reference log-probs", leave=False):
        share, n = rank_share([rows[i] for i in order[s : s + step]], runtime.rank, runtime.world)
        batch = to_device(collate(share, pad_id, parts), runtime.device)
        with runtime.autocast():
            first, second = ref_model(pair_logps, batch)
        out[batch["index"][:n]] = torch.stack([first, second], dim=1)[:n].float()
    if runtime.world > 1:
        dist.all_reduce(out)  # each row was computed on one rank, and is 0 on the others
    return out.cpu()


def collate(rows: list[dict], pad_id: int, parts: Optional[tuple[str, ...]] = None) -> dict:
    """Each row's sequences `parts`, part after part, in one right-padded batch of len(parts) * B rows; by default
    chosen then rejected (then target, where rows have one).

    `targets` holds the next token at each position and -100 where it is not
    a response token, so log-probs are gathered at response positions only.
    """
    parts = parts or (("chosen", "rejected", "target") if "target" in rows[0] else ("chosen", "rejected"))
    sequences = [r[part] for part in parts for r in rows]
    starts = [r[f"{part}_start"] for part in parts for r in rows]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    targets = torch.full((len(sequences), width), -100, dtype=torch.long)
    for b, (sequence, start) in enumerate(zip(sequences, starts)):
        input_ids[b, : len(sequence)] = torch.tensor(sequence)
        attention_mask[b, : len(sequence)] = 1
        targets[b, start - 1 : len(sequence) - 1] = torch.tensor(sequence[start:])  # position t predicts token t+1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets,
            "index": torch.tensor([r["index"] for r in rows])}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps, rejected_logps), each (B,), from one forward over the 2B concatenated rows. A pair of two equal
    rows (online DPO samples them) gets one number for both, so that its h is exactly 0 and it gives no gradient."""
    sums, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["targets"])
    chosen, rejected = sums.chunk(2)
    (ids, other_ids), (targets, other_targets) = batch["input_ids"].chunk(2), batch["targets"].chunk(2)
    same = (ids == other_ids).all(-1) & (targets == other_targets).all(-1)  # (B,)
    return chosen, torch.where(same, chosen, rejected)


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens of each row, and their counts.

    The transformer body runs on the whole batch (N, T); the LM head and a
    float32 log-softmax run only at the positions that predict a response
    token, so no (N, T, V) logits tensor is ever built, and over at most
    model.logp_chunk_tokens of them at a time (in_chunks).
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (N, T, H)
    mask = targets != -100  # (N, T)
    token_logps = in_chunks(target_logps, model, hidden[mask], targets[mask])  # (M,), M = response tokens in the batch
    row = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(mask)[mask]  # (M,) row of each token
    sums = torch.zeros(len(input_ids), device=input_ids.device).index_add_(0, row, token_logps)  # (N,)
    return sums, mask.sum(-1)


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


def target_logps(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target | hidden state) of each position, (M,), from hidden states (M, H) and target tokens (M,)."""
    logits = lm_logits(model, hidden)  # (M, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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


def ref_pair_logps(ref_model, precomputed: Optional[dict], batch: dict, split: str,
                   runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen_logps, ref_rejected_logps), each (B,): looked up where precomputed, else one no-grad pass."""
    if precomputed is not None:
        logps = precomputed[split][batch["index"].cpu()].to(runtime.device)
        return logps[:, 0], logps[:, 1]
    with torch.no_grad(), runtime.autocast():
        chosen, rejected = ref_model(pair_logps, batch)
    return chosen.float(), rejected.float()


def pair_metrics(prefix: str, losses, policy_chosen, policy_rejected, chosen_rewards, rejected_rewards) -> dict:
    """The DPO family's metrics of one batch: rewards are beta * (log pi - log pi_ref)."""
    margin = chosen_rewards - rejected_rewards
    return {
        f"{prefix}/loss": losses.mean().item(),
        f"{prefix}/rewards/chosen": chosen_rewards.mean().item(),
        f"{prefix}/rewards/rejected": rejected_rewards.mean().item(),
        f"{prefix}/rewards/margin": margin.mean().item(),
        f"{prefix}/rewards/accuracy": (margin > 0).float().mean().item(),
        f"{prefix}/logps/chosen": policy_chosen.detach().mean().item(),
        f"{prefix}/logps/rejected": policy_rejected.detach().mean().item(),
    }


class MetricSums:
    """Per-row means of batch metrics over micro-batches and ranks (each batch's means weighted by its real rows),
    and the non-padding tokens per second since it was made."""

    def __init__(self):
        self.sums, self.start = Counter(), time.perf_counter()

    def add(self, metrics: dict, n: int, tokens: int = 0) -> None:
        self.sums.update({k: v * n for k, v in metrics.items()})
        self.sums.update({"count": n, "tokens": tokens})

    def means(self, device) -> tuple[dict, float]:
        """(the metrics' means, tokens per second), over every rank."""
        sums = all_sum(self.sums, device)
        means = {k: v / sums["count"] for k, v in sums.items() if k not in ("count", "tokens")}
        return means, sums["tokens"] / seconds_since(self.start, device)


def all_sum(values: dict, device) -> dict:
    """Each value summed over the ranks, in one all-reduce (unchanged on one process)."""
    if not dist.is_initialized():
        return dict(values)
    keys = list(values)  # the same order on every rank: the same code filled it
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return dict(zip(keys, total.tolist()))


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
