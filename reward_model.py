"""Bradley-Terry reward model in one file.

Paper: Ouyang et al. 2022, "Training language models to follow instructions
with human feedback" (InstructGPT), Sec. 3.5, https://arxiv.org/abs/2203.02155

Objective (Eq. 1): a scalar head r_phi(x, y) on a language model, trained so that

    P(y_w > y_l | x) = sigmoid(r_phi(x, y_w) - r_phi(x, y_l)),    L = -E[ log sigmoid(r_w - r_l) ]

(the Bradley-Terry model). Only differences of r within a prompt enter the loss, so its
population minimiser is the true reward up to a per-prompt constant: r_phi = r + c(x).

Conventions and deviations
- Data are pairs, each its own example. InstructGPT ranks K = 4-9 answers per prompt and
  puts all C(K, 2) comparisons of a prompt in one batch element (hence the 1/C(K, 2) in Eq. 1).
- The model is `AutoModelForSequenceClassification` with one output, started from
  `--model_name_or_path` (usually the SFT model, as in InstructGPT). A causal-LM checkpoint
  loads with its LM head dropped and a fresh `score` head, initialised from `--seed`.
- The score is read at each sequence's last non-padding token, exactly as the model's own
  forward does (the rightmost token that is not `config.pad_token_id`), so the saved model,
  called as `model(**inputs).logits[:, 0]`, gives the scores that were trained. A tokenizer
  without a pad token pads with `<eos>`; the config and the saved tokenizer say so.
- As in dpo.py, an `<eos>` is appended to every response, so the score sits on `<eos>`.
  Where pad and eos are one token, that final `<eos>` counts as padding and the score sits
  on the token before it, in training and in later use alike.
- Too-long rows are cut as in dpo.py (the prompt keeps its end, then the responses their
  start); a cut response has no `<eos>` and is scored at its last kept token. Empty rows,
  and pairs identical once tokenized, are skipped, counted and reported.
- The scores are not normalised after training (InstructGPT adds a bias so that labeller
  demonstrations average 0). `--center_rewards_coef c` adds c (r_w + r_l)^2 to each pair's
  loss instead (Eisenstein et al. 2023, arXiv:2312.09244; TRL's center_rewards_coefficient).
  It fixes the free constant (the mean score over the pairs goes to 0), at the price of a
  distortion of order c in the differences. Off (0) by default.
- `--margin_column m` reads a per-pair margin and uses -log sigmoid(r_w - r_l - m)
  (Touvron et al. 2023, Llama 2, Eq. 2 of arXiv:2307.09288). Off by default.

Usage
    python reward_model.py                           # the embedded toy world, any CPU, about a minute
    python reward_model.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --learning_rate 1e-5 --num_train_epochs 1 \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 4 --max_length 1024 \\
        --eval_steps 200 --save_steps 500 --gradient_checkpointing --output_dir runs/rm-qwen
    python reward_model.py --resume_from runs/reward_model/checkpoint-100   # continue a run exactly
The result loads with `AutoModelForSequenceClassification.from_pretrained(output_dir)`.

Several GPUs (torchrun; a plain `python reward_model.py` needs none of it)
    torchrun --nproc_per_node 4 reward_model.py <the flags above> --per_device_train_batch_size 2
        # DDP: an optimizer step sees per_device_train_batch_size x 4 processes x gradient_accumulation_steps
        # pairs, and the run is the one-process run with that global batch (tested on CPU to float rounding)
    torchrun --nproc_per_node 8 reward_model.py <the flags above> --fsdp   # FSDP2: every model sharded per decoder layer

Logged metrics (one dict per optimizer step; printed every --logging_steps, and to wandb with --track)
    train/loss                  mean loss (Bradley-Terry, plus margin and centring terms if on)
    train/rewards/accuracy      fraction of pairs with r_w > r_l
    train/rewards/chosen        mean score r_w of the chosen responses
    train/rewards/rejected      mean score r_l of the rejected responses
    train/rewards/margin        mean r_w - r_l
    train/rewards/mean          mean of all 2B scores, chosen and rejected together
    train/rewards/std           their standard deviation (on train, over the optimizer step's pairs on every process)
    train/lr, train/grad_norm   learning rate, and the gradient norm before clipping
    train/epoch                 fractional epoch
    perf/tokens_per_sec         non-padding tokens through the model per second of wall time
    eval/...                    the same quantities over the whole held-out split, every --eval_steps
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
import torch.nn.functional as F
import tyro
from datasets import DatasetDict, load_dataset
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer


@dataclass
class Args:
    # ---- model and data
    model_name_or_path: str = "toy_world/model"
    """model to start from (usually the SFT model): a hub name or a local directory (a relative path is also looked up next to this file)"""
    dataset_name: str = "toy_world/pairs"
    """preference data: a hub name, a local directory, or a .json/.jsonl/.parquet/.csv file"""
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
    # ---- reward model
    margin_column: Optional[str] = None
    """a column of per-pair margins m, used as -log sigmoid(r_w - r_l - m) (Llama 2, Eq. 2); None: no margin"""
    center_rewards_coef: float = 0.0
    """c of the centring term c (r_w + r_l)^2 added to each pair's loss (arXiv:2312.09244; 0.01 is common); 0: off"""
    # ---- optimisation
    learning_rate: float = 3e-4
    """peak AdamW learning rate (the toy world's; about 1e-5 suits a real 0.5-7B model)"""
    num_train_epochs: int = 2
    """passes over the training pairs (the toy world's; on real data one is usual, as reward models overfit quickly)"""
    max_steps: int = -1
    """if > 0, the number of optimizer steps, overriding num_train_epochs"""
    per_device_train_batch_size: int = 32
    """pairs per micro-batch on each process (a step sees this x processes x gradient_accumulation_steps)"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    per_device_eval_batch_size: int = 64
    """pairs per evaluation batch"""
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
    """autocast to bfloat16 on CUDA (weights stay float32, the loss is taken in float32); ignored on CPU and MPS"""
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
    output_dir: str = "runs/reward_model"
    """where the final model and checkpoints go"""
    resume_from: Optional[str] = None
    """a checkpoint directory written by this script (output_dir/checkpoint-N) to continue from"""
    seed: int = 1
    """seed for python, numpy and torch, the new head, the data order and the held-out split"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without a network)"""
    wandb_project: str = "single-file-alignment"
    """wandb project"""
    run_name: Optional[str] = None
    """wandb run name"""


# --------------------------------------------------------------------------- the method
def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Optional[torch.Tensor] = None,
    center_rewards_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bradley-Terry loss per pair (Eq. 1 of arXiv:2203.02155), with an optional margin and centring.

    chosen_rewards, rejected_rewards: scores r_w, r_l of shape (B,); margin: m of shape (B,) or None.
    Returns losses (B,) = -log sigmoid(r_w - r_l - m) + c (r_w + r_l)^2, and r_w, r_l detached.
    """
    logits = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:  # Llama 2, Eq. 2 of arXiv:2307.09288
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    if center_rewards_coef:  # Eisenstein et al. 2023, arXiv:2312.09244: pulls the mean score toward 0
        losses = losses + center_rewards_coef * (chosen_rewards + rejected_rewards) ** 2
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# --------------------------------------------------------------------------- data (as in dpo.py)
FORMATS = (
    "accepted preference formats:\n"
    "  standard:        prompt, chosen, rejected as strings\n"
    "  conversational:  prompt, chosen, rejected as lists of {'role', 'content'} messages\n"
    "  implicit prompt: chosen, rejected only (strings or message lists), sharing the prompt as a prefix"
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


def check_columns(dataset, name: str) -> None:
    """Stop early, naming the problem, if the columns fit none of the accepted formats."""
    cols = set(dataset.column_names)
    missing = [c for c in ("chosen", "rejected") if c not in cols]
    if missing:
        raise ValueError(f"dataset {name!r} has no column {missing[0]!r} (columns: {sorted(cols)}).\n{FORMATS}")


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


def tokenize_pairs_with_margins(dataset, tokenizer, max_length: int, max_prompt_length: int, desc: str, margin_column: Optional[str]) -> list[dict]:
    """dpo.py's tokenize_pairs, with each kept pair's margin (0 without a margin column) carried along."""
    rows, skipped, truncated, empty = [], Counter(), 0, 0
    for i, row in enumerate(tqdm(dataset, desc=f"tokenizing {desc}", leave=False)):
        margin = 0.0
        if margin_column is not None:  # checked on every row, kept or not, so a bad value never hides
            if margin_column not in row:
                raise ValueError(f"no margin column {margin_column!r} in the {desc} split (columns: {sorted(row)})")
            margin = row[margin_column]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise ValueError(f"row {i}: margin column {margin_column!r} should hold a finite number, got {margin!r}")
        texts = row_texts(row, i, tokenizer)
        if texts is None:
            skipped["empty prompt or response"] += 1
            continue
        prompt, chosen, rejected, templated = texts
        if chosen == rejected:
            skipped["chosen equals rejected"] += 1
            continue
        (pc, c), (pr, r) = (tokenize_response(tokenizer, prompt, x, templated) for x in (chosen, rejected))
        if not (pc and pr):  # the whole prompt merged into the response: nothing to condition on
            skipped["empty prompt or response"] += 1
            continue
        if max(len(pc) + len(c), len(pr) + len(r)) > max_length:
            truncated += 1
            # keep the end of the prompt (the question next to the answer), then the start of each response
            pc, pr = pc[-max_prompt_length:], pr[-max_prompt_length:]
            c, r = c[: max_length - len(pc)], r[: max_length - len(pr)]
        if pc + c == pr + r:  # different texts, same tokens (after truncation, or "a  b" vs "a b"): no preference left
            skipped["identical once tokenized or truncated"] += 1
            continue
        empty += (c == [tokenizer.eos_token_id]) + (r == [tokenizer.eos_token_id])
        rows.append({"chosen": pc + c, "chosen_start": len(pc), "rejected": pr + r, "rejected_start": len(pr), "index": len(rows),
                     "margin": float(margin)})
    report = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    print(f"{desc}: {len(rows)} pairs kept of {len(dataset)} ({empty} empty responses scored as <eos> alone); "
          f"{truncated} truncated to {max_length} tokens; skipped: {report}")
    if not rows:
        raise ValueError(f"no usable pairs in the {desc} split")
    return rows


def batch_order(rows: list[dict], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """One epoch of batches (row indices), a pure function of (seed, epoch) so a resumed run replays it exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(rows), generator=g).tolist()
    if group_by_length:  # sort within mega-batches of 64 batches, then shuffle the batches
        mega = 64 * batch_size
        length = lambda i: max(len(rows[i]["chosen"]), len(rows[i]["rejected"]))  # noqa: E731
        order = [i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=length, reverse=True)]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def collate(rows: list[dict], pad_id: int) -> dict:
    """Chosen then rejected sequences in one right-padded batch of 2B rows.

    `targets` holds the next token at each position and -100 where it is not
    a response token, so log-probs are gathered at response positions only.
    """
    seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    starts = [r["chosen_start"] for r in rows] + [r["rejected_start"] for r in rows]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), width), -100, dtype=torch.long)
    for b, (seq, start) in enumerate(zip(seqs, starts)):
        input_ids[b, : len(seq)] = torch.tensor(seq)
        attention_mask[b, : len(seq)] = 1
        targets[b, start - 1 : len(seq) - 1] = torch.tensor(seq[start:])  # position t predicts token t+1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets, "index": torch.tensor([r["index"] for r in rows])}


# --------------------------------------------------------------------------- scores
def pair_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_rewards, rejected_rewards), each (B,) float32, from one forward over the 2B concatenated rows.

    The head scores every position, (2B, T, 1); the model's forward keeps the score at each row's
    rightmost token that is not config.pad_token_id, so this is what `model(**inputs).logits` gives later.
    """
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, 1)
    return scores.squeeze(-1).float().chunk(2)


def reward_metrics(prefix: str, losses, chosen_rewards, rejected_rewards) -> dict:
    margin = chosen_rewards - rejected_rewards
    rewards = torch.cat([chosen_rewards, rejected_rewards])
    return {
        f"{prefix}/loss": losses.mean().item(),
        f"{prefix}/rewards/accuracy": (margin > 0).float().mean().item(),
        f"{prefix}/rewards/chosen": chosen_rewards.mean().item(),
        f"{prefix}/rewards/rejected": rejected_rewards.mean().item(),
        f"{prefix}/rewards/margin": margin.mean().item(),
        f"{prefix}/rewards/mean": rewards.mean().item(),
        f"{prefix}/rewards/std": rewards.std().item(),
    }


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) from every rank, joined along the last dimension in rank order (x itself on one process)."""
    if not dist.is_initialized():
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts, dim=-1)


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
    seed_everything(args.seed)  # before loading, the same on every rank: the new score head is drawn from torch's generator
    device = pick_device(args.device)
    use_bf16 = args.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext

    # ---- model and tokenizer
    model_path = resolve_path(args.resume_from or args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {model_path!r} has no eos token; responses need one")
    if tokenizer.pad_token_id is None:  # saved with the model, so whoever loads it pads the same way
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    scorer = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32).to(device)
    # the forward finds each row's last real token by this id (a multimodal config keeps its own in the text config)
    scorer.config.pad_token_id = scorer.config.get_text_config().pad_token_id = pad_id
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(scorer)
    scorer.config.use_cache = False
    model = wrap(scorer, world, args.fsdp, use_bf16, trained=True)
    state = None
    if args.resume_from:
        state_file = os.path.join(model_path, "training_state.pt")
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"--resume_from needs a checkpoint directory written with --save_steps (output_dir/checkpoint-N); "
                                    f"{model_path!r} has no training_state.pt")
        state = torch.load(state_file, weights_only=False)
    if world > 1:
        seed_everything(args.seed + 100_003 * rank)  # each rank its own stream (dropout)

    # ---- data
    train_data, eval_data = load_splits(args.dataset_name, args.dataset_config, args.train_split, args.eval_split, args.eval_holdout, args.seed)
    check_columns(train_data, args.dataset_name)
    train_rows = tokenize_pairs_with_margins(train_data, tokenizer, args.max_length, args.max_prompt_length, "train", args.margin_column)
    eval_rows = []
    if eval_data is not None:
        check_columns(eval_data, args.dataset_name)
        eval_rows = tokenize_pairs_with_margins(eval_data, tokenizer, args.max_length, args.max_prompt_length, "eval", args.margin_column)
    batch_size = args.per_device_train_batch_size * world  # one micro-batch over all ranks
    batches_per_epoch = math.ceil(len(train_rows) / batch_size)
    if batches_per_epoch < args.gradient_accumulation_steps:
        raise ValueError(f"{len(train_rows)} training pairs make {batches_per_epoch} micro-batches of {batch_size}, "
                         f"fewer than gradient_accumulation_steps={args.gradient_accumulation_steps}")
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * args.num_train_epochs

    def margins(rows: list[dict]) -> Optional[torch.Tensor]:
        return torch.tensor([r["margin"] for r in rows], device=device) if args.margin_column else None

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        parts = []
        eval_batch = args.per_device_eval_batch_size * world
        for s in range(0, len(eval_rows), eval_batch):
            rows, n = rank_share(eval_rows[s : s + eval_batch], rank, world)
            with autocast():
                chosen, rejected = model(pair_rewards, to_device(collate(rows, pad_id), device))
            losses, chosen, rejected = reward_loss(chosen, rejected, margins(rows), args.center_rewards_coef)
            parts.append(torch.stack([losses, chosen, rejected])[:, :n].cpu())  # (3, n)
        model.train()
        return reward_metrics("eval", *gather_rows(torch.cat(parts, dim=1)))  # over the whole split, so rewards/std is exact

    # ---- optimizer and schedule: linear warmup, then linear decay to 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    warmup = int(args.warmup_ratio * total_steps)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (total_steps - s) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    start_step = 0
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
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
                orders[epoch] = batch_order(train_rows, batch_size, args.seed, epoch, args.group_by_length)
            rows = [train_rows[j] for j in orders[epoch][i]]
            yield m, epoch + i / per_epoch, len(rows), *rank_share(rows, rank, world)

    model.train()
    metrics: dict = {}
    last_good = args.resume_from
    progress = tqdm(range(start_step, total_steps), desc="reward model", initial=start_step, total=total_steps)
    for step in progress:
        t0, tokens, parts = time.perf_counter(), 0, []
        for m, epoch, global_n, rows, n in micro_batches(step):
            batch = to_device(collate(rows, pad_id), device)
            with sync_gradients(model, m == args.gradient_accumulation_steps - 1):
                with autocast():
                    chosen, rejected = model(pair_rewards, batch)
                losses, cr, rr = reward_loss(chosen, rejected, margins(rows), args.center_rewards_coef)
                if not torch.isfinite(losses).all():
                    raise FloatingPointError(f"loss is {losses.mean().item()} at step {step}; stopping. Last good checkpoint: {last_good or 'none saved'}")
                # the mean over the global micro-batch: DDP averages the ranks' gradients, so each rank's sum is scaled by world
                (losses[:n].sum() * world / (global_n * args.gradient_accumulation_steps)).backward()
            tokens += int(batch["attention_mask"].unflatten(0, (-1, len(rows)))[:, :n].sum())
            parts.append(torch.stack([losses.detach(), cr, rr])[:, :n].cpu())  # (3, n)
        grad_norm = clip_gradients(model, args.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"gradient norm is {grad_norm.item()} at step {step}; stopping. Last good checkpoint: {last_good or 'none saved'}")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        metrics = reward_metrics("train", *gather_rows(torch.cat(parts, dim=1)))  # over the step's pairs on every rank
        metrics.update({"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item(), "train/epoch": epoch,
                        "perf/tokens_per_sec": all_sum({"tokens": tokens}, device)["tokens"] / (time.perf_counter() - t0)})
        done = step + 1
        if eval_rows and ((args.eval_steps and done % args.eval_steps == 0) or done == total_steps):
            metrics.update(evaluate())
        progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", acc=f"{metrics['train/rewards/accuracy']:.2f}")
        if done % args.logging_steps == 0 or done == total_steps:
            tqdm.write(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if run is not None:
            run.log(metrics, step=done)
        if args.save_steps and done % args.save_steps == 0 and done < total_steps:
            last_good = os.path.join(args.output_dir, f"checkpoint-{done}")
            save(last_good, model, tokenizer, args, {"step": done, "optimizer": optimizer_state(model, optimizer), "scheduler": scheduler.state_dict(),
                                                     "rng": rank_rng_states(world)})
    save(args.output_dir, model, tokenizer, args)
    if run is not None:
        run.finish()
    return metrics


if __name__ == "__main__":
    train(tyro.cli(Args, use_underscores=True))
