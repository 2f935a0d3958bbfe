"""SPIN: Self-Play fINe-tuning, in one file.

Paper: Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models",
https://arxiv.org/abs/2401.01335

Objective (Sec. 4, with the logistic loss): at iteration t the opponent pi_t is a frozen copy of the current model.
For each SFT prompt x, y is the human answer and y' ~ pi_t(.|x) is generated; with
h = [log pi(y|x) - log pi_t(y|x)] - [log pi(y'|x) - log pi_t(y'|x)],

    L_SPIN = -E[ log sigmoid(beta * h) ]

and pi_{t+1} is its minimiser; with no preference labels, p_data is the fixed point. One iteration's exact population
minimiser is pi_{t+1} ∝ pi_t (p_data / pi_t)^(1/beta) (Theorem 5.4): the log-space error shrinks by (1 - 1/beta), so
beta < 1/2 (the paper's 0.1) overshoots. In practice each iteration takes finitely many gradient steps.

Deviations and options
- Each iteration generates one response per prompt with the current model, computes the opponent's log-probs of every
  pair once with that same model (so only one model is in memory), then trains with a fresh optimizer and schedule,
  as the official recipe restarts each iteration from the previous checkpoint.
- Iteration t trains on the pairs generated at t and t-1 (the official recipe), both against pi_t;
  `--no-previous_iteration_data` uses only t's. The toy world's default beta is 1; the paper's is 0.1.
- A generation cut at --max_new_tokens without <eos> is kept (its log-prob is the prefix's), and so is one equal to
  the real answer (h = 0, no gradient, as in the population loss); both are counted each iteration.
- Generation samples at --temperature 1 with no top-p (the official code's): y' ~ pi_t, so p_data is the fixed point.
- Data: prompt/completion columns (strings, or message lists), or `messages` ending with the answer. output_dir/
  iteration-k holds pi_k and its pairs (generated.jsonl); `--resume_from output_dir/iteration-k` continues from it.

Usage
    python spin.py                                   # the embedded toy world (SFT answers from a known p_data)
    python spin.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name HuggingFaceH4/ultrachat_200k \\
        --train_split train_sft --eval_split test_sft --beta 0.1 --num_iterations 3 --learning_rate 5e-7 \\
        --max_new_tokens 256 --per_device_train_batch_size 8 --gradient_accumulation_steps 8 --max_length 1024 \\
        --gradient_checkpointing --output_dir runs/spin-qwen

Logged metrics (one dict per optimizer step; printed every --logging_steps, and to wandb with --track)
    train/loss                  mean SPIN loss
    train/rewards/real          beta * (log pi - log pi_t) of the real (SFT) answer; rewards/generated likewise
    train/rewards/margin        real minus generated (= beta * h); rewards/accuracy: the fraction with margin > 0
    train/logps/real, train/logps/generated    summed log-probs under the policy
    train/iteration, train/epoch    t, and the fractional epoch in it; train/lr, train/grad_norm, perf/tokens_per_sec
    eval/...                    the same quantities on the held-out prompts, at the end of each iteration
    generation/identical, generation/no_eos, generation/length   per iteration: fraction of generations equal
                                to the real answer, fraction cut at --max_new_tokens, mean tokens
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
from dataclasses import asdict, dataclass, replace
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


@dataclass
class Args:
    # ---- model and data
    model_name_or_path: str = "toy_world/model"
    """starting policy pi_0, usually an SFT model: a hub name or a local directory (relative: also next to this file)"""
    dataset_name: str = "toy_world/sft"
    """SFT data: a hub name, a local directory, or a .json/.jsonl/.parquet/.csv file"""
    dataset_config: Optional[str] = None
    """the dataset's configuration name, if it has several"""
    train_split: str = "train"
    """split to train on"""
    eval_split: str = "test"
    """held-out split; if the dataset has none, `eval_holdout` rows of the train split are held out"""
    eval_holdout: int = 512
    """rows held out from the train split when the dataset has no `eval_split`, at most a tenth (0: no evaluation)"""
    max_length: int = 512
    """longest prompt + response in tokens"""
    max_prompt_length: int = 256
    """prompt tokens kept (from its end) when the prompt with its real answer, or with max_new_tokens, is too long"""
    # ---- the method
    beta: float = 1.0
    """beta of the logistic loss (Sec. 4); the paper's 0.1 is below 1/2, where the exact iteration overshoots"""
    num_iterations: int = 3
    """T, self-play iterations: each generates with the current model, then trains against it"""
    previous_iteration_data: bool = True
    """train iteration t on the pairs generated at t and t-1, as the official recipe does (else only on t's)"""
    max_new_tokens: int = 5
    """generation budget in tokens, <eos> included (the toy world's answers are at most 4 words + <eos>)"""
    temperature: float = 1.0
    """sampling temperature of the opponent's generations"""
    per_device_generation_batch_size: int = 64
    """prompts per generation batch"""
    # ---- optimisation (per iteration)
    learning_rate: float = 3e-4
    """peak AdamW learning rate (the toy world's; the paper uses 5e-7 for 7B models)"""
    num_train_epochs: int = 1
    """passes over each iteration's pairs"""
    max_steps: int = -1
    """if > 0, optimizer steps per iteration, overriding num_train_epochs"""
    per_device_train_batch_size: int = 32
    """pairs per micro-batch on each process (a step sees this x processes x gradient_accumulation_steps)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    per_device_eval_batch_size: int = 64
    """pairs per evaluation (and opponent log-prob) batch"""
    warmup_ratio: float = 0.1
    """fraction of each iteration's steps with linear warmup; the rest decays linearly to 0"""
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
    """LoRA rank: train a float32 adapter on a frozen base (0 = train every weight)"""
    lora_alpha: float = 16.0
    """LoRA alpha: the adapter's output is scaled by lora_alpha / lora_r"""
    lora_dropout: float = 0.0
    """dropout on the adapter's input (the rest of every model has none)"""
    lora_target_modules: str = "all-linear"
    """layers that get an adapter: 'all-linear' (every linear layer but the output head), or names joined by commas"""
    merge_lora: bool = False
    """with --lora_r, also save the adapter merged into a float32 copy of the base, in output_dir/merged"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the frozen LoRA base; without LoRA every weight is trained, in float32"""
    # ---- logging, saving
    logging_steps: int = 10
    """print metrics every this many optimizer steps"""
    num_sample_generations: int = 3
    """(prompt, real, generated) examples printed (and sent to wandb) each iteration"""
    output_dir: str = "runs/spin"
    """where each iteration's model and data, and the final model, go"""
    resume_from: Optional[str] = None
    """an iteration (output_dir/iteration-k) to continue from; `latest`: output_dir's newest, or a new run if none"""
    seed: int = 1
    """seed for python, numpy and torch, generation, the data order and the held-out split"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "single-file-alignment"
    """wandb project"""
    run_name: Optional[str] = None
    """wandb run name"""

    def __post_init__(self):  # a bad value stops the run before any work, naming the flag
        if not 0 < self.max_prompt_length < self.max_length:  # 0 would keep the whole prompt: ids[-0:] == ids
            raise UsageError(f"max_prompt_length ({self.max_prompt_length}) must be positive and below max_length "
                             f"({self.max_length}) to leave room for a response")
        if self.temperature <= 0 or self.max_new_tokens < 1:
            raise UsageError("SPIN samples its opponent's answers: temperature must be > 0 and max_new_tokens >= 1")
        if self.max_prompt_length + self.max_new_tokens > self.max_length:  # a generation follows a cut prompt
            raise UsageError(f"max_prompt_length ({self.max_prompt_length}) + max_new_tokens ({self.max_new_tokens}) "
                             f"must not exceed max_length ({self.max_length})")


# ---------------------------------------------------------------------------------------------------------- the method
def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    opponent_real_logps: torch.Tensor,
    opponent_generated_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPIN loss per pair (arXiv:2401.01335, Sec. 4, with the logistic loss l(t) = log(1 + e^-t)).

    All inputs are summed response log-probs, shape (B,): the real (SFT) answer
    y and the opponent's generation y', under the policy and under the frozen
    opponent pi_t. Returns losses (B,), and the detached rewards (B,)
    beta * log(pi/pi_t) of the real and the generated answer.
    """
    real_logratios = policy_real_logps - opponent_real_logps  # (B,)
    generated_logratios = policy_generated_logps - opponent_generated_logps  # (B,)
    losses = -F.logsigmoid(beta * (real_logratios - generated_logratios))  # (B,)
    return losses, (beta * real_logratios).detach(), (beta * generated_logratios).detach()


def spin_metrics(prefix: str, losses, policy_real, policy_generated, real_rewards, generated_rewards) -> dict:
    margin = real_rewards - generated_rewards
    return {
        f"{prefix}/loss": losses.mean().item(),
        f"{prefix}/rewards/real": real_rewards.mean().item(),
        f"{prefix}/rewards/generated": generated_rewards.mean().item(),
        f"{prefix}/rewards/margin": margin.mean().item(),
        f"{prefix}/rewards/accuracy": (margin > 0).float().mean().item(),
        f"{prefix}/logps/real": policy_real.detach().mean().item(),
        f"{prefix}/logps/generated": policy_generated.detach().mean().item(),
    }


# ------------------------------------------------------------------------------------------- the method's own data
def self_play_pairs(model, sft_rows: list[dict], tokenizer, pad_id: int, args: Args, iteration: int, desc: str,
                    runtime) -> tuple[list[dict], dict]:
    """One generation per SFT row from `model` (the opponent), as pairs: chosen = real, rejected = generated.

    Returns the pairs and generation statistics. The ranks split the rows and then share what they generated. Each
    row's draws come from a sampler seeded by (seed, iteration, split), so a resumed run regenerates the same data,
    and so does a run on another number of processes. No rows (no eval split) give no pairs.
    """
    if not sft_rows:
        return [], {}
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + 7919 * iteration + (desc == "eval"))
    uniforms = torch.rand(len(sft_rows), args.max_new_tokens, generator=g)  # (N, R): row i's draws, wherever it runs
    model.eval()
    eos_ids = eos_token_ids(model, tokenizer)
    order = sorted(range(len(sft_rows)), key=lambda i: len(sft_rows[i]["prompt"]))  # similar lengths: little padding
    generated: dict[int, tuple[list[int], bool]] = {}
    step = args.per_device_generation_batch_size * runtime.world
    for s in tqdm(range(0, len(order), step), desc=f"generating ({desc}, iteration {iteration})", leave=False):
        chunk, n = rank_share(order[s : s + step], runtime.rank, runtime.world)
        query, query_mask = left_pad([sft_rows[i]["prompt"] for i in chunk], pad_id)
        with runtime.autocast():
            responses = model(generate, query.to(runtime.device), query_mask.to(runtime.device), args.max_new_tokens,
                              args.temperature, eos_ids, uniforms[chunk].to(runtime.device))
        responses, mask, has_eos = truncate_after_eos(responses, eos_ids, pad_id)
        for b, i in enumerate(chunk[:n]):
            generated[i] = responses[b][mask[b]].tolist(), bool(has_eos[b])
    generated = gather_dicts(generated)  # every rank's generations
    pairs, identical, length = [], 0, 0
    no_eos = sum(not has_eos for _, has_eos in generated.values())
    for i, row in enumerate(sft_rows):
        answer = generated[i][0]
        rejected = row["prompt"] + answer
        identical += rejected == row["real"]
        length += len(answer)
        pairs.append({"chosen": row["real"], "chosen_start": row["real_start"], "rejected": rejected,
                      "rejected_start": len(row["prompt"]), "index": i,
                      "text": (*row["text"], tokenizer.decode(answer, skip_special_tokens=True))})
    n = len(sft_rows)
    stats = {"generation/identical": identical / n, "generation/no_eos": no_eos / n, "generation/length": length / n}
    print(f"{desc}, iteration {iteration}: {n} generations, {identical} equal to the real answer, {no_eos} cut at "
          f"{args.max_new_tokens} tokens without <eos>, {length / n:.1f} tokens on average")
    return pairs, stats


# ---------------------------------------------------------------------------------------------------------- training
def train(args: Args) -> dict:
    runtime = setup(args)  # torchrun's process group (or none), the seeds, the device, bf16 autocast on CUDA

    # ---- the policy: pi_0, or the iteration to resume from. Each iteration's opponent is the policy as it starts
    policy_path = resolve_path(args.resume_from or args.model_name_or_path)
    tokenizer, pad_id = load_tokenizer(policy_path)
    policy = load_model(policy_path, args, runtime, trained=True)
    runtime.seed_per_rank(args.seed)
    first, previous = load_iteration_state(args.resume_from, policy_path)  # (0, None) for a new run

    # ---- data: SFT prompts with their real answers, tokenized once
    train_sft, eval_sft = load_sft(args, tokenizer)
    check_log_probs(policy, train_sft[0]["real"], train_sft[0]["real_start"], runtime)  # a known LM head
    tracker = init_tracking(args, runtime)
    metrics, steps_done = {}, 0
    for t in range(first, args.num_iterations):
        # 1-2. the opponent pi_t is the current model: generate with it, and pair each real answer with its generation
        pairs, generation_stats = self_play_pairs(policy, train_sft, tokenizer, pad_id, args, t, "train", runtime)
        eval_pairs, _ = self_play_pairs(policy, eval_sft, tokenizer, pad_id, args, t, "eval", runtime)
        print_samples(pairs[: args.num_sample_generations])
        # 3. the pairs to train on (with the previous iteration's, if asked), and the opponent's log-probs of them, once
        keep = args.previous_iteration_data and previous
        pairs_before = [p | {"index": len(pairs) + i} for i, p in enumerate(previous)] if keep else []
        train_rows = pairs + pairs_before
        print(f"iteration {t}: training on {len(train_rows)} pairs ({len(pairs_before)} from iteration {t - 1})")
        opponent = {split: precompute_ref_logps(policy, rows, args.per_device_eval_batch_size, pad_id, runtime)
                    for split, rows in (("train", train_rows), ("eval", eval_pairs))}
        batches = TrainBatches(train_rows, args, runtime, epoch_offset=10_000 * t)  # each iteration its own order

        def batch_losses(batch: dict, split: str, n: int) -> tuple[torch.Tensor, dict]:
            """Losses of one batch, and the step metrics of its n real rows (of its stand-in if n = 0)."""
            with runtime.autocast():
                real, generated = policy(pair_logps, batch)
            opponent_real, opponent_generated = ref_pair_logps(None, opponent, batch, split, runtime)
            losses, real_rewards, generated_rewards = spin_loss(real, generated, opponent_real, opponent_generated,
                                                                args.beta)
            part = slice(max(n, 1))  # a rank with no real row reports its stand-in, weighted 0
            return losses, spin_metrics(split, *(x[part] for x in (losses, real, generated, real_rewards,
                                                                    generated_rewards)))

        @torch.no_grad()
        def evaluate() -> dict:
            policy.eval()
            sums = MetricSums()
            for rows, n in eval_batches(eval_pairs, args.per_device_eval_batch_size, runtime):
                losses, metrics = batch_losses(to_device(collate(rows, pad_id), runtime.device), "eval", n)
                sums.add(metrics, n)
            policy.train()
            return sums.means(runtime.device)[0]

        # 4. train pi_{t+1} from pi_t: a fresh optimizer and schedule each iteration
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
        scheduler = linear_schedule(optimizer, args.warmup_ratio, batches.total_steps)
        last_checkpoint = os.path.join(args.output_dir, f"iteration-{t}") if t > first else args.resume_from
        policy.train()
        progress = tqdm(range(batches.total_steps), desc=f"spin, iteration {t}")
        for step in progress:
            sums = MetricSums()  # also starts the step's clock
            for micro in batches.of_step(step):
                batch = to_device(collate(micro.rows, pad_id), runtime.device)
                with sync_gradients(policy, micro.last):
                    losses, batch_metrics = batch_losses(batch, "train", micro.n)
                    check_finite(losses, "loss", f"step {step} of iteration {t}", last_checkpoint)
                    micro.global_mean(losses).backward()
                sums.add(batch_metrics, micro.n, micro.real_tokens(batch["attention_mask"]))
            grad_norm = clip_gradients(policy, args.max_grad_norm)
            check_finite(grad_norm, "gradient norm", f"step {step} of iteration {t}", last_checkpoint)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            metrics, tokens_per_sec = sums.means(runtime.device)
            metrics.update({"train/iteration": t, "train/lr": scheduler.get_last_lr()[0],
                            "train/grad_norm": grad_norm.item(), "train/epoch": micro.epoch,
                            "perf/tokens_per_sec": tokens_per_sec})
            done, steps_done = step + 1, steps_done + 1
            if done == batches.total_steps:
                metrics.update(generation_stats)
                if eval_pairs:
                    metrics.update(evaluate())
            progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/rewards/accuracy']:.2f}")
            log_metrics(metrics, done, batches.total_steps, args.logging_steps, tracker, f"iteration {t}, step",
                        tracker_step=steps_done)  # wandb counts steps across the iterations
        log_samples(tracker, pairs[: args.num_sample_generations], steps_done)
        # 5. save pi_{t+1}, with the pairs generated at t
        save_iteration(os.path.join(args.output_dir, f"iteration-{t + 1}"), policy, tokenizer, args, pairs, t + 1)
        previous = pairs
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


def load_iteration_state(resume_from: Optional[str], path: str) -> tuple[int, Optional[list[dict]]]:
    """(the iteration to run next, the pairs generated for the saved one) of an iteration directory; (0, None) when
    not resuming."""
    if not resume_from:
        return 0, None
    state_file = os.path.join(path, "spin_state.json")
    if not os.path.isfile(state_file):
        raise UsageError(f"--resume_from needs an iteration directory written by spin.py "
                                f"(output_dir/iteration-k); {path!r} has no spin_state.json")
    with open(state_file) as f:
        first = json.load(f)["next_iteration"]
    print(f"resumed from {resume_from}: iteration {first} next")
    return first, torch.load(os.path.join(path, "pairs.pt"), weights_only=True)


def load_sft(args, tokenizer) -> tuple[list[dict], list[dict]]:
    """The train and eval splits' SFT rows, tokenized (no eval split: no eval rows)."""
    train_data, eval_data = load_splits(args.dataset_name, args.dataset_config, args.train_split, args.eval_split,
                                        args.eval_holdout, args.seed)
    check_sft_columns(train_data, args.dataset_name)
    train_rows = tokenize_sft(train_data, tokenizer, args.max_length, args.max_prompt_length, args.max_new_tokens,
                              "train")
    if eval_data is None:
        return train_rows, []
    check_sft_columns(eval_data, args.dataset_name)
    return train_rows, tokenize_sft(eval_data, tokenizer, args.max_length, args.max_prompt_length,
                                    args.max_new_tokens, "eval")


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


COMPLETION_FORMATS = (
    "accepted SFT formats:\n"
    "  prompt-completion:  prompt, completion as strings, or as lists of {'role', 'content'} messages\n"
    "  conversational:     messages, a list of {'role', 'content'} messages whose last one is the answer"
)


def check_sft_columns(dataset, name: str) -> None:
    """Stop early, naming the problem, if the columns fit neither SFT format."""
    columns = set(dataset.column_names)
    if "messages" not in columns and not {"prompt", "completion"} <= columns:
        missing = "completion" if "prompt" in columns else "prompt"
        raise UsageError(f"dataset {name!r} has no column {missing!r} and no 'messages' column "
                         f"(columns: {sorted(columns)}).\n{COMPLETION_FORMATS}")


def completion_texts(row: dict, index: int, tokenizer) -> Optional[tuple[str, str, bool]]:
    """(prompt, completion, templated) as text, whichever format the row is in; None if a part is empty."""
    if row.get("messages") is not None:
        messages = row["messages"]
        if not is_conversation(messages) or len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise UsageError(f"row {index}: 'messages' should be a list of {{'role', 'content'}} messages ending with "
                             f"the assistant's answer, got {str(messages)[:80]!r}\n{COMPLETION_FORMATS}")
        prompt, completion = messages[:-1], messages[-1:]
    else:
        prompt, completion = row["prompt"], row["completion"]
    chat = is_conversation(prompt)
    for column, value in (("prompt", prompt), ("completion", completion)):
        if not (is_conversation(value) if chat else isinstance(value, str)):
            kind = "a list of {'role', 'content'} messages like 'prompt'" if chat else "a string like 'prompt'"
            raise UsageError(f"row {index}: column {column!r} should be {kind}, got {type(value).__name__}: "
                             f"{str(value)[:80]!r}\n{COMPLETION_FORMATS}")
    if not prompt or (chat and not completion):  # an empty text answer is kept: it is scored as its <eos>
        return None
    if not chat:
        return prompt, completion, False
    prompt_text, (completion_text,) = chat_texts(tokenizer, prompt, [completion], index)
    return prompt_text, completion_text, True


def chat_texts(tokenizer, prompt: list, responses: list, index: int) -> tuple[str, list[str]]:
    """The prompt's messages rendered by the chat template up to the assistant's turn, and each response's messages as
    the text the template adds after that: prompt_text + response_text is the whole rendered conversation."""
    if tokenizer.chat_template is None:
        raise UsageError("conversational rows need a tokenizer with a chat template; this tokenizer has none")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for response in responses:
        full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
        if not full.startswith(prompt_text):
            raise UsageError(f"row {index}: the chat template renders the conversation without the prompt as its "
                             "prefix; cannot separate the response")
        # what follows the turn's end token is template layout (Qwen's "<|im_end|>\n"): drop it, so the <eos> is last
        texts.append(full[len(prompt_text) :].rstrip())
    return prompt_text, texts


def is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def tokenize_response(tokenizer, prompt: str, response: str, templated: bool) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) with prompt_ids + response_ids == tokenize(prompt + response) (+ eos, unless the
    response already ends its turn).

    A merge across the boundary changes the prompt's last tokens; the tokens
    from the first difference on are the response (TRL does the same).
    """
    add_special = not templated and not bos_written(tokenizer, prompt)  # a chat template writes its own bos
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    full_ids = tokenizer(prompt + response, add_special_tokens=add_special)["input_ids"]
    n = 0
    while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
        n += 1
    response_ids = full_ids[n:]
    if not response_ids or not ends_turn(tokenizer, response_ids[-1], templated):  # an empty answer is <eos> alone
        response_ids = response_ids + [tokenizer.eos_token_id]
    return full_ids[:n], response_ids


def bos_written(tokenizer, text: str) -> bool:
    """Whether text begins with the tokenizer's bos written out (a chat template's rendering stored as a string): the
    tokenizer must not add a second one."""
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


def ends_turn(tokenizer, token_id: int, templated: bool) -> bool:
    """Whether a response's last token already ends it: <eos>, or, in a chat template's rendering, any special token
    (the template closed the turn with its own: Gemma's <end_of_turn>, Llama 3's <|eot_id|>)."""
    if token_id == tokenizer.eos_token_id:
        return True
    added = tokenizer.added_tokens_decoder.get(token_id)
    return templated and (token_id in tokenizer.all_special_ids or (added is not None and added.special))


def tokenize_sft(dataset, tokenizer, max_length: int, max_prompt_length: int, max_new_tokens: int,
                 desc: str) -> list[dict]:
    """Each usable row's prompt ids, the real answer's full sequence, and where its response starts.

    The real answer is scored after exactly the prompt ids that the opponent generates from, so that both answers
    of a pair condition on one context. A row is cut (its prompt to the last max_prompt_length tokens, then its
    answer) when its prompt with the real answer, or with a generation of max_new_tokens, exceeds max_length.
    """
    rows, skipped, truncated = [], Counter(), 0
    for i, row in enumerate(tqdm(dataset, desc=f"tokenizing {desc}", leave=False)):
        texts = completion_texts(row, i, tokenizer)
        if texts is None:
            skipped["empty prompt or answer"] += 1
            continue
        prompt, completion, templated = texts
        prompt_ids, answer_ids = tokenize_response(tokenizer, prompt, completion, templated)
        if not prompt_ids:
            skipped["empty prompt or answer"] += 1
            continue
        if len(prompt_ids) + max(len(answer_ids), max_new_tokens) > max_length:  # the generation must fit too
            truncated += 1
            prompt_ids = prompt_ids[-max_prompt_length:]
            answer_ids = answer_ids[: max_length - len(prompt_ids)]
        rows.append({"prompt": prompt_ids, "real": prompt_ids + answer_ids, "real_start": len(prompt_ids),
                     "text": (prompt, completion)})
    report = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    print(f"{desc}: {len(rows)} SFT rows kept of {len(dataset)}; {truncated} truncated to {max_length} tokens; "
          f"skipped: {report}")
    if not rows:
        raise UsageError(f"no usable rows in the {desc} split")
    return rows


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


def gather_dicts(part: dict) -> dict:
    """Every rank's dict merged into one, on every rank (the dict itself on one process)."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


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


def eval_batches(rows: list, per_device_batch_size: int, runtime: Runtime):
    """(this rank's part, its number of real rows) of each evaluation batch, in order."""
    size = per_device_batch_size * runtime.world
    for s in range(0, len(rows), size):
        yield rank_share(rows[s : s + size], runtime.rank, runtime.world)


def linear_schedule(optimizer, warmup_ratio: float, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over warmup_ratio of the steps, then linear decay to 0."""
    warmup = int(warmup_ratio * total_steps)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


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


def print_samples(pairs: list[dict]) -> None:
    for p in pairs:
        print(f"  prompt {p['text'][0]!r}\n    real      {p['text'][1]!r}\n    generated {p['text'][2]!r}")


def log_samples(tracker, pairs: list[dict], step: int) -> None:
    """Some (prompt, real, generated) examples as a wandb table, with --track."""
    if tracker is not None:
        import wandb

        samples = [list(p["text"]) for p in pairs]
        tracker.log({"generation/samples": wandb.Table(columns=["prompt", "real", "generated"], data=samples)},
                    step=step)


def save_iteration(path: str, model, tokenizer, args, pairs: list[dict], next_iteration: int) -> None:
    """An iteration directory: the model, the pairs generated for it (as text in generated.jsonl, to read, and as token
    ids in pairs.pt, which a resumed run trains on again with --previous_iteration_data), and the iteration to run
    next. Every rank calls it; rank 0 writes."""

    def write_pairs(directory: str) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        with open(os.path.join(directory, "generated.jsonl"), "w") as f:
            for p in pairs:
                prompt, real, generated = p["text"]
                f.write(json.dumps({"prompt": prompt, "real": real, "generated": generated}) + "\n")
        torch.save([{k: v for k, v in p.items() if k != "text"} | {"text": list(p["text"])} for p in pairs],
                   os.path.join(directory, "pairs.pt"))
        with open(os.path.join(directory, "spin_state.json"), "w") as f:
            json.dump({"next_iteration": next_iteration}, f)

    # written whole, then moved into place; --merge_lora's merged copy is the final model's only (each is the size of
    # the base in float32)
    save(path, model, tokenizer, replace(args, merge_lora=False), also=write_pairs)


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
