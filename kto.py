"""KTO: Kahneman-Tversky Optimization, in one file.

Paper: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306

Each answer is labelled on its own, desirable (a thumbs-up) or undesirable; no pairs are needed. With the log-ratio
r = log pi(y|x) - log pi_ref(y|x) and a reference point z0, the value of an answer and the loss (Eq. 8) are

    v(x, y) = lambda_D * sigmoid(beta * (r - z0))    if y is desirable
              lambda_U * sigmoid(beta * (z0 - r))    if y is undesirable
    L_KTO   = E[ lambda_y - v(x, y) ]

z0 = max(0, mean of log pi(y'|x) - log pi_ref(y'|x)), detached, where each y' is the data's completion of another row:
the paper's estimate of KL(pi || pi_ref). It is not that KL, since y' comes from the data and not from pi. KTO has
no closed-form optimum; docs/kto.md derives what its population loss converges to, and measures it.

Conventions (TRL's KTOTrainer and the authors' code agree on the loss) and deviations
- Log-probs are summed over a completion's tokens; a batch's loss is the mean over its rows of both labels.
- z0 is taken per micro-batch, over the real rows of every process, before the clamp (the authors' code; TRL averages
  the processes' means, the same when their shares are equal). The mismatched pairs run without gradient.
- Each row's mismatched completion is fixed when the data load: the previous row's in a seeded shuffle of its split.
  TRL also fixes it at load time, rotating completions within blocks of the per-device batch, and the authors' code
  rotates within each micro-batch. The expectation is the same, and here it does not depend on the process count.
- Preference pairs are accepted: each becomes one desirable row (chosen) and one undesirable row (rejected), as
  TRL's unpair_preference_dataset makes them, and the run says so.
- The paper advises lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] for imbalanced data; outside it, the run prints
  weights that fall inside. It does not change them.

Usage
    python kto.py                                    # the embedded toy world, any CPU, about a minute
    python kto.py --beta 0.1 --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/kto-mix-14k --learning_rate 5e-7 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --max_length 1024 \\
        --precompute_ref_logps --gradient_checkpointing --output_dir runs/kto-qwen

Logged metrics (one dict per optimizer step; printed every --logging_steps, and to wandb with --track)
    train/loss                  mean KTO loss
    train/kl                    z0, the clamped reference point (over the step's micro-batches, by their rows)
    train/rewards/chosen        beta * (log pi - log pi_ref), the implicit reward, over desirable rows
    train/rewards/rejected      the same over undesirable rows
    train/rewards/margin        chosen minus rejected
    train/logps/chosen          log pi(y|x) under the policy, summed over its tokens, over desirable rows
    train/logps/rejected        the same over undesirable rows
    train/desirable             the fraction of rows labelled desirable
    train/lr, grad_norm, epoch; perf/tokens_per_sec (policy tokens, mismatched ones included); eval/... as dpo.py
"""

import atexit
import contextlib
import functools
import gc
import hashlib
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


@dataclass
class Args:
    # ---- model and data
    model_name_or_path: str = "toy_world/model"
    """policy to train: a hub name or a local directory (a relative path is also looked up next to this file)"""
    ref_model_name_or_path: Optional[str] = None
    """frozen reference model pi_ref; None means the starting policy (model_name_or_path)"""
    dataset_name: str = "toy_world/unpaired"
    """labelled answers (or preference pairs, unpaired): a hub name, a local directory, or a .json/.jsonl/.parquet/.csv
    file"""
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
    """tokens kept from the end of a prompt when a row is longer than max_length"""
    # ---- the method
    beta: float = 0.1
    """beta of Eq. 8: the scale of the log-ratio inside the sigmoid (as in DPO, smaller moves further)"""
    desirable_weight: float = 1.0
    """lambda_D of Eq. 8: the weight of desirable rows' losses"""
    undesirable_weight: float = 1.0
    """lambda_U of Eq. 8: the weight of undesirable rows' losses"""
    precompute_ref_logps: bool = False
    """compute reference log-probs in one pass before training and free the reference model"""
    # ---- optimisation
    learning_rate: float = 1e-5
    """peak AdamW learning rate (the toy world's at beta 0.1, docs/kto.md; about 5e-7 suits a real 0.5-7B model)"""
    num_train_epochs: int = 2
    """passes over the training rows"""
    max_steps: int = -1
    """if > 0, the number of optimizer steps, overriding num_train_epochs"""
    per_device_train_batch_size: int = 32
    """rows per micro-batch on each process (a step sees this x processes x gradient_accumulation_steps)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    per_device_eval_batch_size: int = 64
    """rows per evaluation batch"""
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
    """dtype of frozen weights (a reference or reward model, a LoRA base); trained weights stay float32. Without LoRA
    a bf16 reference puts the log-ratio r off 0 at step 0"""
    # ---- logging, evaluation, saving
    logging_steps: int = 10
    """print metrics every this many optimizer steps"""
    eval_steps: int = 100
    """evaluate on the held-out split every this many steps (0 = only at the end)"""
    save_steps: int = 0
    """save a resumable checkpoint every this many steps (0 = only the final model)"""
    output_dir: str = "runs/kto"
    """where the final model and checkpoints go"""
    resume_from: Optional[str] = None
    """a checkpoint (output_dir/checkpoint-N) to continue from; `latest`: output_dir's newest, or a new run if none"""
    seed: int = 1
    """seed for python, numpy and torch, the data order and the held-out split"""
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
        if self.beta <= 0 or min(self.desirable_weight, self.undesirable_weight) < 0:
            raise UsageError(f"beta ({self.beta}) must be positive, and desirable_weight ({self.desirable_weight}) "
                             f"and undesirable_weight ({self.undesirable_weight}) not negative")


# ---------------------------------------------------------------------------------------------------------- the method
PARTS = ("completion", "kl")  # each row's sequences: its prompt and completion, and its prompt and another completion


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO loss per row, lambda_y - v(x, y) (Eq. 8 of arXiv:2402.01306).

    policy_logps, ref_logps: (B,) log-probs of each row's completion, summed over its tokens. desirable: (B,) bool
    labels. kl: the scalar estimate of KL(pi || pi_ref) (kl_estimate); the reference point is z0 = max(kl, 0),
    detached, so no gradient flows through it.
    Returns losses (B,) and rewards (B,) = beta * (log pi - log pi_ref), detached.
    """
    z0 = kl.detach().clamp(min=0)
    logratios = policy_logps - ref_logps  # r, (B,)
    value = torch.where(desirable, desirable_weight * torch.sigmoid(beta * (logratios - z0)),  # v(x, y), (B,)
                        undesirable_weight * torch.sigmoid(beta * (z0 - logratios)))
    weight = torch.where(desirable, torch.as_tensor(desirable_weight).to(value),  # lambda_y, (B,)
                         torch.as_tensor(undesirable_weight).to(value))
    return weight - value, beta * logratios.detach()


@torch.no_grad()
def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, n: int) -> torch.Tensor:
    """The paper's estimate of KL(pi || pi_ref) before the clamp: the mean of log pi(y'|x) - log pi_ref(y'|x) over the
    mismatched rows of the micro-batch, this process's first n (its real rows) and every other process's.

    policy_kl_logps, ref_kl_logps: (B,) log-probs of each row's prompt followed by another row's completion.
    """
    sums = torch.stack([(policy_kl_logps - ref_kl_logps)[:n].sum(), policy_kl_logps.new_tensor(float(n))])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return sums[0] / sums[1]


def completion_logps(model, batch: dict) -> torch.Tensor:
    """log pi(y|x) of each row of a one-part batch (collate, parts=("completion",)), summed over its tokens: (B,)."""
    return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["targets"])[0]


def kto_metrics(prefix: str, losses, policy_logps, rewards, desirable, kl) -> dict:
    """One batch's metrics, each a mean over its rows. A label's metric is its rows' sum over all the rows; by_label
    divides it by the label's share once batches are pooled, making it a mean over that label's rows."""
    good = desirable.float()
    metrics = {f"{prefix}/loss": losses.mean().item(), f"{prefix}/kl": kl.clamp(min=0).item(),
               f"{prefix}/desirable": good.mean().item()}
    for kind, values in (("rewards", rewards), ("logps", policy_logps.detach())):
        metrics[f"{prefix}/{kind}/chosen"] = (values * good).mean().item()
        metrics[f"{prefix}/{kind}/rejected"] = (values * (1 - good)).mean().item()
    return metrics


def by_label(metrics: dict) -> dict:
    """Pooled kto_metrics with each label's metrics as means over its rows (nan where it has none), and the margin."""
    for prefix in {key.split("/")[0] for key in metrics if key.endswith("/desirable")}:
        share = {"chosen": metrics[f"{prefix}/desirable"], "rejected": 1 - metrics[f"{prefix}/desirable"]}
        for kind in ("rewards", "logps"):
            for label, part in share.items():
                key = f"{prefix}/{kind}/{label}"
                metrics[key] = metrics[key] / part if part > 0 else math.nan
        rewards = metrics[f"{prefix}/rewards/chosen"], metrics[f"{prefix}/rewards/rejected"]
        metrics[f"{prefix}/rewards/margin"] = rewards[0] - rewards[1]
    return metrics


# ---------------------------------------------------------------------------------------------------------- training
def train(args: Args) -> dict:
    runtime = setup(args)  # torchrun's process group (or none), the seeds, the device, bf16 autocast on CUDA

    # ---- models: the policy, and the frozen reference pi_ref (unless a resumed run saved its log-probs)
    policy_path = resolve_path(args.resume_from or args.model_name_or_path)
    tokenizer, pad_id = load_tokenizer(policy_path)
    policy = load_model(policy_path, args, runtime, trained=True)
    state = load_training_state(args.resume_from, policy_path)  # None for a new run
    ref_logps = state.get("ref_logps") if state and args.precompute_ref_logps else None  # a resumed run's own
    ref_model = None
    if ref_logps is None:  # in the policy's dtype and autocast (or its own base), so that r = 0 exactly at step 0
        ref_model = load_reference(args, runtime, policy)
    runtime.seed_per_rank(args.seed)

    # ---- data: labelled completions, each with another row's completion for z0, tokenized once
    train_rows, eval_rows = load_unpaired(args, tokenizer)
    advise_weights(train_rows, args.desirable_weight, args.undesirable_weight)
    check_log_probs(policy, train_rows[0]["completion"], train_rows[0]["completion_start"], runtime)  # a known head
    batches = TrainBatches(train_rows, args, runtime)
    if args.precompute_ref_logps and ref_logps is None:  # one pass of the reference over every row, then free it
        ref_logps = {split: precompute_ref_logps(ref_model, rows, args.per_device_eval_batch_size, pad_id, runtime,
                                                 PARTS)
                     for split, rows in (("train", train_rows), ("eval", eval_rows))}
        ref_model = None
        release_memory(runtime.device)
    ref_logps = of_these_rows(ref_logps, train_rows, eval_rows)  # a resumed run's must be of these rows

    def batch_losses(rows: list[dict], split: str, n: int) -> tuple[torch.Tensor, dict, int]:
        """Losses of one batch, the metrics of its n real rows (of its stand-in if n = 0), and their policy tokens."""
        sequences = [to_device(collate(rows, pad_id, (part,)), runtime.device) for part in PARTS]
        completions, mismatched = sequences
        with torch.no_grad(), runtime.autocast():  # z0 carries no gradient, so the mismatched rows need none
            if ref_logps is None:  # on the policy's own batches, so that r = 0 exactly at step 0
                ref_completion, ref_mismatched = (ref_model(completion_logps, batch).float() for batch in sequences)
            else:
                ref_completion, ref_mismatched = ref_logps[split][completions["index"].cpu()].to(runtime.device).T
            kl = kl_estimate(policy(completion_logps, mismatched).float(), ref_mismatched, n)
        with runtime.autocast():
            policy_logps = policy(completion_logps, completions).float()
        desirable = torch.tensor([row["label"] for row in rows], device=runtime.device)
        losses, rewards = kto_loss(policy_logps, ref_completion, desirable, kl, args.beta, args.desirable_weight,
                                   args.undesirable_weight)
        real = slice(max(n, 1))  # a rank with no real row reports its stand-in, weighted 0
        metrics = kto_metrics(split, *(x[real] for x in (losses, policy_logps, rewards, desirable)), kl)
        return losses, metrics, sum(int(batch["attention_mask"][:n].sum()) for batch in sequences)

    @torch.no_grad()
    def evaluate() -> dict:
        policy.eval()
        sums = MetricSums()
        for rows, n in eval_batches(eval_rows, args.per_device_eval_batch_size, runtime):
            losses, metrics, _ = batch_losses(rows, "eval", n)
            sums.add(metrics, n)
        policy.train()
        return by_label(sums.means(runtime.device)[0])

    # ---- optimizer, learning-rate schedule, and where a resumed run left off
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = linear_schedule(optimizer, args.warmup_ratio, batches.total_steps)
    start_step = restore_training_state(state, policy, optimizer, scheduler, runtime, args.resume_from)
    tracker = init_tracking(args, runtime)

    # ---- the loop: one optimizer step per global batch of labelled rows
    policy.train()
    metrics, last_checkpoint, total_steps = {}, args.resume_from, batches.total_steps
    progress = tqdm(range(start_step, total_steps), desc="kto", initial=start_step, total=total_steps)
    for step in progress:
        sums = MetricSums()  # also starts the step's clock
        for micro in batches.of_step(step):
            with sync_gradients(policy, micro.last):
                losses, batch_metrics, tokens = batch_losses(micro.rows, "train", micro.n)
                check_finite(losses, "loss", f"step {step}", last_checkpoint)
                micro.global_mean(losses).backward()
            sums.add(batch_metrics, micro.n, tokens)
        grad_norm = clip_gradients(policy, args.max_grad_norm)
        check_finite(grad_norm, "gradient norm", f"step {step}", last_checkpoint)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics, tokens_per_sec = sums.means(runtime.device)
        metrics = by_label(metrics) | {"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item(),
                                       "train/epoch": micro.epoch, "perf/tokens_per_sec": tokens_per_sec}
        done = step + 1
        if eval_rows and ((args.eval_steps and done % args.eval_steps == 0) or done == total_steps):
            metrics.update(evaluate())
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", kl=f"{metrics['train/kl']:.3f}")
        log_metrics(metrics, done, total_steps, args.logging_steps, tracker)
        if args.save_steps and done % args.save_steps == 0 and done < total_steps:
            last_checkpoint = save_checkpoint(args, done, policy, tokenizer, optimizer, scheduler, runtime,
                                              ref_logps=ref_logps)
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


def load_training_state(resume_from: Optional[str], path: str) -> Optional[dict]:
    """The optimizer, scheduler, RNG and step a checkpoint holds beside its model; None when not resuming."""
    if not resume_from:
        return None
    state_file = os.path.join(path, "training_state.pt")
    if not os.path.isfile(state_file):
        raise UsageError(f"--resume_from needs a checkpoint directory written with --save_steps "
                                f"(output_dir/checkpoint-N); {path!r} has no training_state.pt")
    return torch.load(state_file, weights_only=True)  # tensors and plain Python only: a checkpoint runs no code


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


FORMATS = (
    "accepted preference formats:\n"
    "  standard:        prompt, chosen, rejected as strings\n"
    "  conversational:  prompt, chosen, rejected as lists of {'role', 'content'} messages\n"
    "  implicit prompt: chosen, rejected only (strings or message lists), sharing the prompt as a prefix"
)


def load_unpaired(args, tokenizer) -> tuple[list[dict], list[dict]]:
    """The train and eval splits' labelled rows, tokenized, each with its mismatched completion. No eval split gives no
    eval rows."""
    train_data, eval_data = load_splits(args.dataset_name, args.dataset_config, args.train_split, args.eval_split,
                                        args.eval_holdout, args.seed)
    train_rows = tokenize_unpaired(train_data, tokenizer, args, "train")
    return train_rows, [] if eval_data is None else tokenize_unpaired(eval_data, tokenizer, args, "eval")


def advise_weights(rows: list[dict], desirable_weight: float, undesirable_weight: float) -> None:
    """Print the paper's advice for imbalanced data when lambda_D * n_D / (lambda_U * n_U) is outside [1, 4/3]."""
    n_desirable = sum(row["label"] for row in rows)
    n_undesirable = len(rows) - n_desirable
    if not (n_desirable and n_undesirable and desirable_weight and undesirable_weight):
        print(f"train: {n_desirable} desirable and {n_undesirable} undesirable rows, weights {desirable_weight} and "
              f"{undesirable_weight}: the paper's advice on their ratio does not apply")
        return
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1 <= ratio <= 4 / 3:
        return
    low, high = undesirable_weight * n_undesirable / n_desirable, desirable_weight * n_desirable / n_undesirable
    print(f"train: {n_desirable} desirable and {n_undesirable} undesirable rows, so lambda_D n_D / (lambda_U n_U) = "
          f"{ratio:.3f}, outside the paper's advised [1, 4/3]: for example --desirable_weight in "
          f"[{low:.3g}, {4 / 3 * low:.3g}], or --undesirable_weight in [{3 / 4 * high:.3g}, {high:.3g}]")


COMPLETION_FORMATS = (
    "accepted formats of labelled data:\n"
    "  unpaired:          prompt, completion as strings, or as lists of {'role', 'content'} messages, and a boolean\n"
    "                     label (true: desirable); or messages, whose last message is the answer, and label\n"
    "  preference pairs:  prompt, chosen, rejected, or chosen, rejected sharing the prompt as a prefix: each pair\n"
    "                     becomes a desirable row (chosen) and an undesirable row (rejected)"
)


def labelled_texts(dataset, name: str, tokenizer, desc: str) -> tuple[list[tuple], Counter, str]:
    """(prompt, completion, templated, label, dataset row) as text for every usable row, the skipped dataset rows by
    reason, and what the dataset's rows are ('rows', or 'pairs', which give two rows each)."""
    columns, texts, skipped = set(dataset.column_names), [], Counter()
    pairwise = "label" not in columns and {"chosen", "rejected"} <= columns
    needed = ["label"] + ([] if "messages" in columns else ["prompt", "completion"])
    missing = [column for column in needed if column not in columns]
    if missing and not pairwise:
        raise UsageError(f"dataset {name!r} has no column {missing[0]!r} (columns: {sorted(columns)}).\n"
                         f"{COMPLETION_FORMATS}")
    for i, row in enumerate(tqdm(dataset, desc=f"reading {desc}", leave=False)):
        if pairwise:
            found = row_texts(row, i, tokenizer)  # (prompt, chosen, rejected, templated)
            if found is not None and found[1] == found[2]:  # a tie: not one desirable and one undesirable answer
                skipped["chosen equals rejected"] += 1
                continue
            usable = [] if found is None else [(found[0], found[k], found[3], k == 1) for k in (1, 2)]
        else:
            label = row["label"]
            if not (isinstance(label, bool) or (isinstance(label, (int, float)) and label in (0, 1))):
                raise UsageError(f"row {i}: column 'label' should be a boolean (true: desirable), got "
                                 f"{type(label).__name__}: {str(label)[:80]!r}\n{COMPLETION_FORMATS}")
            found = completion_texts(row, i, tokenizer)
            usable = [] if found is None else [(*found, bool(label))]
        if not usable:
            skipped["empty prompt or completion"] += 1
        texts += [(*text, i) for text in usable]
    if pairwise:
        print(f"{desc}: {name!r} holds preference pairs: each becomes a desirable row (chosen) and an undesirable row "
              "(rejected), as TRL's unpair_preference_dataset makes them")
    return texts, skipped, "pairs" if pairwise else "rows"


def tokenize_unpaired(dataset, tokenizer, args, desc: str) -> list[dict]:
    """Tokenize every labelled row, and give each the completion of the row before it in a seeded shuffle of its split,
    after its own prompt: the mismatched pairs that z0 is estimated from. The mismatched ids are the prompt's ids then
    the other completion's ids, as in TRL (a split of one row gets its own). Skipped rows are counted by reason and
    reported, never dropped silently.

    A kept row holds its ids (prompt + completion) and its mismatched ids (`kl`) with where each completion starts,
    its `label`, its `index` among the kept rows and its `row` in the dataset.
    """
    texts, skipped, unit = labelled_texts(dataset, args.dataset_name, tokenizer, desc)
    tokenized, merged = [], 0
    for prompt, completion, templated, label, i in tqdm(texts, desc=f"tokenizing {desc}", leave=False):
        prompt_ids, completion_ids = tokenize_response(tokenizer, prompt, completion, templated)
        if not prompt_ids:  # the whole prompt merged into the completion: no condition left
            merged += 1  # a row, which for pairs is one of a pair's two
            continue
        tokenized.append((prompt_ids, completion_ids, label, i))
    if not tokenized:
        raise UsageError(f"no usable rows in the {desc} split")
    order = torch.randperm(len(tokenized), generator=torch.Generator().manual_seed(args.seed)).tolist()
    previous = dict(zip(order, order[-1:] + order[:-1]))  # each row's mismatched completion: the previous row's
    rows, truncated = [], 0
    for k, (prompt_ids, completion_ids, label, i) in enumerate(tokenized):
        sequences = []
        for prompt_part, answer in ((prompt_ids, completion_ids), (prompt_ids, tokenized[previous[k]][1])):
            if len(prompt_part) + len(answer) > args.max_length:  # keep the end of the prompt, then the answer's start
                truncated += 1
                prompt_part = prompt_part[-args.max_prompt_length :]
                answer = answer[: args.max_length - len(prompt_part)]
            sequences.append((prompt_part, answer))
        (prompt_part, answer), (kl_prompt, kl_answer) = sequences
        rows.append({"completion": prompt_part + answer, "completion_start": len(prompt_part),
                     "kl": kl_prompt + kl_answer, "kl_start": len(kl_prompt), "label": label, "index": len(rows),
                     "row": i})
    desirable = sum(row["label"] for row in rows)
    empty = sum(ids == [tokenizer.eos_token_id] for _, ids, _, _ in tokenized)
    report = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    if merged:
        report += f"; skipped rows: whole prompt merged into the completion: {merged}"
    print(f"{desc}: {len(rows)} rows kept from {len(dataset)} {unit}: {desirable} desirable, {len(rows) - desirable} "
          f"undesirable ({empty} empty completions scored as <eos> alone); {truncated} sequences truncated to "
          f"{args.max_length} tokens (mismatched ones included); skipped {unit}: {report}")
    return rows


def row_texts(row: dict, index: int, tokenizer) -> Optional[tuple[str, str, str, bool]]:
    """(prompt, chosen, rejected, templated) as text, whichever format the row is in; None if a part is empty."""
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    chat = is_conversation(chosen)
    for column, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is None and column == "prompt":
            continue
        if not (is_conversation(value) if chat else isinstance(value, str)):
            kind = "a list of {'role', 'content'} messages" if chat else "a string"
            raise UsageError(f"row {index}: column {column!r} should be {kind} like 'chosen', got "
                             f"{type(value).__name__}: {str(value)[:80]!r}\n{FORMATS}")
    if prompt is None:  # implicit prompt: the shared prefix of chosen and rejected
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    if not prompt or (chat and not (chosen and rejected)):  # an empty text answer is kept: it is scored as its <eos>
        return None
    if not chat:
        return prompt, chosen, rejected, False
    prompt_text, (chosen_text, rejected_text) = chat_texts(tokenizer, prompt, [chosen, rejected], index)
    return prompt_text, chosen_text, rejected_text, True


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


def split_implicit_prompt(chosen, rejected):
    """The longest shared prefix is the prompt: whole messages for conversations, whole words for text (a response
    then begins with the whitespace before its first word, as " like" does in "A: I like" vs "A: I hate")."""
    n = 0
    if isinstance(chosen, list):  # keep at least the last message as the response
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = n
    while cut > 0 and not chosen[cut - 1].isspace():  # back over a word both may only begin with: "yes" vs "yesterday"
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():  # then over the whitespace before it, newlines included
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


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


def rows_fingerprint(*splits: list[dict]) -> str:
    """A digest of the splits' rows (token ids, positions, labels): the same for the same rows in the same order."""
    digest = hashlib.sha256()
    for rows in splits:
        for row in rows:
            digest.update(repr(sorted(row.items())).encode())
    return digest.hexdigest()


def of_these_rows(ref_logps: Optional[dict], train_rows: list[dict], eval_rows: list[dict]) -> Optional[dict]:
    """Precomputed reference log-probs, which are looked up by row, marked with the digest of the rows they are of. A
    resumed run's saved ones must be of its own rows: another dataset, --seed or --max_length gives other rows, each
    of which would get another's values. A checkpoint saved before the digest was kept is taken as it is."""
    if ref_logps is None:
        return None
    rows = rows_fingerprint(train_rows, eval_rows)
    if ref_logps.setdefault("rows", rows) != rows:
        raise UsageError("the checkpoint's precomputed reference log-probs are of other rows than this run's: resume "
                         "with the flags and data it was trained with")
    return ref_logps


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


def release_memory(device: torch.device) -> None:
    """Return freed tensors' memory (a dropped reference model's) to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
