"""CPU throughput benchmark: dpo.py vs TRL's DPOTrainer on the same tiny Llama and synthetic pairs.

Everything is built offline and deterministically into --work-dir: a random-init LlamaForCausalLM (~23M params,
untied), a WordLevel tokenizer over synthetic words "w0".."w15996" (n words == n tokens, so lengths are exact) and a
JSONL of preference pairs in the standard format {prompt, chosen, rejected} (plain strings; responses start with a
space so that `prompt + chosen` tokenizes as the concatenation). Each implementation then trains one epoch (fp32,
batch 8 pairs, beta 0.1, reference log-probs precomputed) in a FRESH subprocess, so peak RSS is per run.

Measured per run: wall time of the whole training call (model load + tokenization + reference pass + epoch; not
asset building or interpreter start-up), tokens/s over the real tokens (prompt+chosen+eos + prompt+rejected+eos per
pair, counted from the data, same for both), peak RSS (ru_maxrss of the child), padding share (from the shapes
that actually reach the model) and MFU against this machine's measured fp32 matmul peak.

FLOP accounting (matmul FLOPs; element-wise ops ignored). N = non-embedding, non-LM-head params, L layers, H hidden,
V vocab. A forward over a row of T positions costs 2*N*T + 4*L*H*T^2 (attention QK^T and AV) + 2*V*H*P, with P the
positions that go through the LM head. Training = forward + backward = 3x forward; the reference pass = 1x forward.
  * useful FLOPs (identical for both): T = real tokens of the row, causal attention 2*L*H*T*(T+1), P = response
    tokens + eos (only those log-probs enter the loss).
  * actual FLOPs: T, P and row counts are recorded by a global forward pre-hook on the embedding and LM-head
    modules, i.e. what the implementation really fed to the model (padding included); attention is counted as the
    full T^2 square (a masked dense kernel). TRL 1.16 on CPU runs its fused chunked LM head over ALL positions
    (P = T-1; the compact "response-only" path needs Triton, i.e. GPU) and recomputes the logits in backward, so its
    head costs 4x forward in training instead of 3x. For `ours` P comes from the lm_head hook: 3x in training, or
    with --logp_chunk_tokens (on by default) 4x, its backward's recomputation being seen by the hook (so 2x P as seen).

Commands (run from the repo root, on a quiet machine; --threads as wanted):
  python benchmarks/bench_dpo.py --impl both --threads 2 --trl-python /tmp/trl_venv/bin/python   # 160 pairs, both
  python benchmarks/bench_dpo.py --impl trl --num-pairs 16 --trl-python ...                     # TRL smoke test
The TRL side runs in --trl-python (a scratch venv with trl; TRL is not a project dependency).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import tyro

REPO = Path(__file__).resolve().parents[1]
VOCAB = 16000  # 16k words: 6.1M embedding + 6.1M LM head + 10.6M in the layers = 22.9M parameters


@dataclasses.dataclass
class Config:
    impl: Literal["both", "trl", "ours"] = "both"
    work_dir: Path = Path("/tmp/dpo_bench_23m")
    num_pairs: int = 160
    threads: int = 2  # torch intra-op threads, used for the runs and for the matmul peak
    seed: int = 0
    batch_size: int = 8  # pairs per optimizer step (no gradient accumulation)
    max_length: int = 512  # longest row is 200 + 200 + 1 = 401 tokens, so nothing is truncated
    beta: float = 0.1
    learning_rate: float = 1e-6
    trl_sampling: Literal["random", "group_by_length"] = "group_by_length"  # see run_trl
    trl_python: str = "/tmp/trl_venv/bin/python"  # a scratch venv with trl, as in docs/benchmarks.md
    ours_python: str = sys.executable
    out_json: Path | None = None  # default: <work_dir>/results.json
    child: str = ""  # internal: "trl"/"ours" = run that implementation in this process
    result_file: str = ""  # internal: where the child writes its measurements


# ---------------------------------------------------------------- assets
def build_assets(cfg: Config) -> dict:
    """Model + tokenizer in work_dir/model, pairs in work_dir/pairs.jsonl. Rebuilt only if the recipe changed."""
    meta = {"num_pairs": cfg.num_pairs, "seed": cfg.seed, "vocab": VOCAB, "version": 1}
    model_dir, data = cfg.work_dir / "model", cfg.work_dir / "pairs.jsonl"
    meta_file = cfg.work_dir / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) == meta:
        return {"model": str(model_dir), "data": str(data)}
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    n_words = 15997
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(n_words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<eos>", "<unk>"])  # matched before pre-tokenization: "w5<eos>" -> 2 tokens
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(model_dir)

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
        intermediate_size=1024, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)

    rng = random.Random(cfg.seed)
    words = lambda n: " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))  # noqa: E731
    with open(data, "w") as f:
        for _ in range(cfg.num_pairs):
            prompt, chosen, rejected = (words(rng.randint(lo, 200)) for lo in (20, 10, 10))
            f.write(json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")
    meta_file.write_text(json.dumps(meta))
    return {"model": str(model_dir), "data": str(data)}


def data_stats(data: str) -> dict:
    """Real-token count and the useful-FLOP ingredients, from word counts (1 word == 1 token)."""
    tokens = resp_pos = attn_causal = 0
    for line in open(data):
        ex = json.loads(line)
        p = len(ex["prompt"].split())
        for r in (len(ex["chosen"].split()) + 1, len(ex["rejected"].split()) + 1):  # +1: eos
            t = p + r
            tokens, resp_pos, attn_causal = tokens + t, resp_pos + r, attn_causal + t * (t + 1) // 2
    return {"tokens": tokens, "resp_pos": resp_pos, "attn_causal": attn_causal}


# ---------------------------------------------------------------- child side
class ShapeLog:
    """Global forward pre-hook: records the shapes that really reach the embedding and the LM head.

    Passes with grad enabled are training forwards; passes without grad are reference (or other no-grad) forwards.
    """

    def __init__(self, vocab: int):
        import torch

        self.vocab, self.torch = vocab, torch
        self.s = {k: {"rows": 0, "pos": 0, "sq": 0, "head": 0} for k in ("train", "ref")}
        torch.nn.modules.module.register_module_forward_pre_hook(self)

    def __call__(self, module, args):
        nn, kind = self.torch.nn, ("train" if self.torch.is_grad_enabled() else "ref")
        if isinstance(module, nn.Embedding) and module.num_embeddings == self.vocab and args:
            b, t = args[0].shape
            s = self.s[kind]
            s["rows"], s["pos"], s["sq"] = s["rows"] + b, s["pos"] + b * t, s["sq"] + b * t * t
        elif isinstance(module, nn.Linear) and module.out_features == self.vocab:
            self.s[kind]["head"] += args[0].numel() // module.in_features


def run_trl(cfg: Config, paths: dict) -> dict:
    """TRL DPOTrainer, one epoch. Every option below was checked against trl 1.16.0's DPOConfig source."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(paths["data"])]
    for r in rows:  # padded row length, only read by the length-grouped sampler (1 word == 1 token)
        r["length"] = len(r["prompt"].split()) + max(len(r["chosen"].split()), len(r["rejected"].split())) + 1
    # In-memory dataset: TRL caches precomputed ref log-probs in a file keyed by the dataset fingerprint and SKIPS the
    # reference pass when that file exists; an in-memory dataset gets a random temp cache path, so it always runs.
    dataset = Dataset.from_list(rows)
    args = DPOConfig(
        output_dir=str(cfg.work_dir / "trl_out"),
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1, num_train_epochs=1,
        learning_rate=cfg.learning_rate, beta=cfg.beta, seed=cfg.seed,
        max_length=cfg.max_length,  # 1.16 has no max_prompt_length / max_completion_length; nothing is cut at 512
        precompute_ref_log_probs=True,  # one no-grad reference pass up front; no ref model kept during training
        # precompute_ref_batch_size left at None = the train batch (8 pairs), like ours; bigger means more padding
        bf16=False, fp16=False,  # TRL defaults bf16=True (autocast on CPU too): force plain fp32
        gradient_checkpointing=False,  # TRL defaults it to True
        use_cpu=True, dataloader_pin_memory=False, report_to="none", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, logging_steps=10**6,
        # Default here "group_by_length": transformers' LengthGroupedSampler sorts within megabatches of
        # min(n // (4 * batch), 50) * batch pairs (40 at 160 pairs; no effect at <= 31 pairs). At 160 pairs it cuts
        # padding of the training batches from 36.5% to 20.0% (same math per step, only the order changes), so it is
        # the faster choice; --trl-sampling random gives TRL's default. It reads the "length" column, so
        # remove_unused_columns=False (else the column is dropped before the sampler sees it).
        train_sampling_strategy=cfg.trl_sampling, remove_unused_columns=False,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        # Not used: padding_free (1.16 warns and falls back to padding), use_logits_to_keep (gone: 1.16 always uses a
        # fused chunked LM head), pad_to_multiple_of (None off Neuron), torch_compile (minutes of CPU compile for a
        # 20-step run), use_liger_kernel (Triton/GPU), activation_offloading (GPU only).
        # optim stays the transformers default, adamw_torch_fused (works on CPU with torch >= 2.8).
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=paths["model"], args=args, train_dataset=dataset)  # loads, tokenizes, ref pass
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    import trl

    return {"wall_s": t2 - t0, "setup_and_ref_s": t1 - t0, "version": trl.__version__, "head_train_mult": 4}


def run_ours(cfg: Config, paths: dict) -> dict:
    """dpo.py from this repo. Written against the agreed Args contract; adapt here if the names change."""
    sys.path.insert(0, str(REPO))
    import dpo

    args = dpo.Args(
        model_name_or_path=paths["model"], dataset_name=paths["data"], beta=cfg.beta,
        max_length=cfg.max_length, max_prompt_length=cfg.max_length - 1, eval_holdout=0,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1, learning_rate=cfg.learning_rate, warmup_ratio=0.0,
        num_train_epochs=1, precompute_ref_logps=True, gradient_checkpointing=False, logging_steps=1000,
        eval_steps=0, save_steps=0, output_dir=str(cfg.work_dir / "ours_out"), seed=cfg.seed, device="cpu",
    )
    t0 = time.perf_counter()
    dpo.train(args)  # may include a final save (~0.1 s for this model)
    # chunked, the hook sees each position's head twice in training (forward, recomputation in the backward): 2 x 2
    head_train_mult = 2 if args.logp_chunk_tokens else 3
    return {"wall_s": time.perf_counter() - t0, "version": "repo", "head_train_mult": head_train_mult}


def child(cfg: Config) -> None:
    import torch
    import transformers

    torch.set_num_threads(cfg.threads)
    paths = {"model": str(cfg.work_dir / "model"), "data": str(cfg.work_dir / "pairs.jsonl")}
    log = ShapeLog(vocab=VOCAB)
    res = (run_trl if cfg.child == "trl" else run_ours)(cfg, paths)
    res |= {"shapes": log.s, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "torch": torch.__version__, "transformers": transformers.__version__}
    Path(cfg.result_file).write_text(json.dumps(res))


# ---------------------------------------------------------------- parent side
def matmul_peak(threads: int, n: int = 2048, reps: int = 10) -> float:
    """Best-of-`reps` fp32 n x n matmul throughput, FLOP/s, with the threads the runs use."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for i in range(reps + 2):
        t = time.perf_counter()
        torch.matmul(a, b)
        if i >= 2:  # first two are warm-up
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def flops(shapes: dict, stats: dict, head_train_mult: int) -> tuple[float, float]:
    """(actual, useful) FLOPs of one epoch plus the reference pass; see the module docstring."""
    L, H, V = 6, 384, VOCAB
    N = L * (4 * H * H + 3 * H * 1024 + 2 * H) + H  # attention + MLP + 2 RMSNorms per layer, final norm
    useful = 4 * (2 * N * stats["tokens"] + 4 * L * H * stats["attn_causal"] + 2 * V * H * stats["resp_pos"])
    actual = 0.0
    for kind, mult, head_mult in (("train", 3, head_train_mult), ("ref", 1, 1)):
        s = shapes[kind]
        # No lm_head module call (TRL's fused head uses the weight directly; on CPU over all T-1 positions). If ours
        # ever bypasses the lm_head module too, this fallback over-counts its head FLOPs: fix it here.
        head = s["head"] or s["pos"] - s["rows"]
        actual += mult * (2 * N * s["pos"] + 4 * L * H * s["sq"]) + head_mult * 2 * V * H * head
    return actual, useful


def main(cfg: Config) -> None:
    if cfg.child:
        return child(cfg)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    paths = build_assets(cfg)
    stats = data_stats(paths["data"])
    peak = matmul_peak(cfg.threads)
    print(f"pairs={cfg.num_pairs} real tokens={stats['tokens']} threads={cfg.threads} "
          f"fp32 matmul peak={peak / 1e9:.1f} GFLOP/s", flush=True)
    results = {"config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()}, "peak_flops": peak,
               "data": stats, "runs": {}}
    impls = ["trl", "ours"] if cfg.impl == "both" else [cfg.impl]
    for impl in impls:
        py = cfg.trl_python if impl == "trl" else cfg.ours_python
        with tempfile.TemporaryDirectory() as tmp:
            result_file = os.path.join(tmp, "result.json")
            env = os.environ | {"OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads),
                                "HF_DATASETS_CACHE": tmp, "TOKENIZERS_PARALLELISM": "false",
                                "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
            cmd = [py, str(Path(__file__).resolve()), "--child", impl, "--result-file", result_file,
                   "--work-dir", str(cfg.work_dir), "--num-pairs", str(cfg.num_pairs), "--threads", str(cfg.threads),
                   "--seed", str(cfg.seed), "--batch-size", str(cfg.batch_size), "--max-length", str(cfg.max_length),
                   "--beta", str(cfg.beta), "--learning-rate", str(cfg.learning_rate),
                   "--trl-sampling", cfg.trl_sampling]
            print(f"--- running {impl}: {' '.join(cmd[:2])} ...", flush=True)
            subprocess.run(cmd, env=env, check=True, cwd=tmp)
            r = json.loads(Path(result_file).read_text())
        actual, useful = flops(r["shapes"], stats, r["head_train_mult"])
        r |= {"tokens_per_s": stats["tokens"] / r["wall_s"], "actual_flops": actual, "useful_flops": useful,
              "mfu": actual / r["wall_s"] / peak, "useful_mfu": useful / r["wall_s"] / peak,
              "pad_share_train": 1 - stats["tokens"] / max(r["shapes"]["train"]["pos"], 1),
              "pad_share_ref": 1 - stats["tokens"] / max(r["shapes"]["ref"]["pos"], 1)}
        results["runs"][impl] = r

    cols = ["impl", "version", "wall s", "tok/s", "peak RSS MiB", "pad train", "pad ref", "MFU", "useful MFU"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for impl, r in results["runs"].items():
        print(f"| {impl} | {r['version']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | {r['max_rss_mib']:.0f} | "
              f"{r['pad_share_train']:.1%} | {r['pad_share_ref']:.1%} | {r['mfu']:.1%} | {r['useful_mfu']:.1%} |")
    out = cfg.out_json or cfg.work_dir / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(tyro.cli(Config))
