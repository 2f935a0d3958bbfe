"""Peak memory of DPO with a real large vocabulary: the LM head's logits, chunked (--logp_chunk_tokens) or not.

The model: a random 2-layer Llama-architecture model (width 256, untied head) with Qwen2.5's vocabulary, 151,936
tokens, so that the LM head and its logits weigh as they do in a real model. (Under a Qwen2 config, transformers 5
would swap the word-level tokenizer below for Qwen2's own tokenizer class.) The tokenizer: one word per vocabulary
entry, so lengths are exact. The data: fixed synthetic pairs with 16-token prompts. Each run trains 2 steps of
dpo.py (batch 4 pairs, reference held, AdamW, fp32) in a fresh subprocess and reports its peak memory: the resident
set (ru_maxrss) on CPU, torch.cuda.max_memory_allocated on a GPU. 2k and 8k are the response tokens of one batch
(chosen + rejected): answers of 256 and 1024 tokens. One unchunked float32 logits tensor takes 4 x 151,936 bytes a
position: 1.2 GiB at 2k, 4.6 GiB at 8k; a chunk of 1024 positions takes 0.58 GiB.

    python benchmarks/bench_logp_memory.py                 # CPU, 2 threads; about 6 minutes on 2 cores
    python benchmarks/bench_logp_memory.py --device cuda   # on a GPU machine

Each child may use at most --max_memory_gib of memory (RLIMIT_DATA, so that a run that needs more fails alone,
without pushing the machine out of memory); a run past it is reported as out of memory (OOM). The CPU figures
include the interpreter, torch and transformers (about 0.5 GiB before any model is loaded) and the models and AdamW
state (about 1.5 GiB here), so compare differences between rows.
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

import tyro

REPO = Path(__file__).resolve().parents[1]
VOCAB = 151_936  # Qwen2.5's
PROMPT_TOKENS, PAIRS_PER_BATCH = 16, 4
RUNS = {  # name: (response tokens of each answer, extra dpo.Args)
    "2k, unchunked (--logp_chunk_tokens 0)": (256, {"logp_chunk_tokens": 0}),
    "2k, chunks of 1024 (the default)": (256, {"logp_chunk_tokens": 1024}),
    "8k, unchunked (--logp_chunk_tokens 0)": (1024, {"logp_chunk_tokens": 0}),
    "8k, chunks of 1024 (the default)": (1024, {"logp_chunk_tokens": 1024}),
}


@dataclasses.dataclass
class Config:
    work_dir: Path = Path("/tmp/dpo_bench_qwen_vocab")
    """where the model and the pairs are built"""
    device: str = "cpu"
    threads: int = 2
    max_memory_gib: float = 12.0
    """each run's memory cap (RLIMIT_DATA); past it, the run is reported as out of memory"""
    runs: tuple[str, ...] = tuple(RUNS)
    """which entries of RUNS to run"""
    child: str = ""
    """internal: run this entry of RUNS in this process"""
    result_file: str = ""
    """internal: where the child writes its measurement"""


def build_assets(work_dir: Path) -> None:
    """The model and tokenizer in work_dir/model, and 2 steps' pairs for each response length. Built once."""
    if (work_dir / "done").exists():
        return
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(work_dir / "model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(work_dir / "model")
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(n))  # noqa: E731
    for length in sorted({length for length, _ in RUNS.values()}):
        with open(work_dir / f"pairs_{length}.jsonl", "w") as f:
            for _ in range(2 * PAIRS_PER_BATCH):  # 2 steps; the eos makes each answer `length` tokens
                f.write(json.dumps({"prompt": words(PROMPT_TOKENS), "chosen": " " + words(length - 1),
                                    "rejected": " " + words(length - 1)}) + "\n")
    (work_dir / "done").write_text("")


def child(cfg: Config) -> None:
    if cfg.device == "cpu":
        limit = int(cfg.max_memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import torch

    torch.set_num_threads(cfg.threads)
    sys.path.insert(0, str(REPO))
    import dpo

    length, extra = RUNS[cfg.child]
    args = dpo.Args(model_name_or_path=str(cfg.work_dir / "model"),
                    dataset_name=str(cfg.work_dir / f"pairs_{length}.jsonl"), eval_holdout=0,
                    max_length=PROMPT_TOKENS + length, max_prompt_length=PROMPT_TOKENS,
                    per_device_train_batch_size=PAIRS_PER_BATCH, max_steps=2, learning_rate=1e-6, warmup_ratio=0.0,
                    logging_steps=1, eval_steps=0, output_dir=tempfile.mkdtemp(), device=cfg.device, **extra)
    start = time.perf_counter()
    try:
        dpo.train(args)
        oom = False
    except (MemoryError, RuntimeError) as error:  # torch's allocators raise RuntimeError("... can't allocate ...")
        if not isinstance(error, MemoryError) and not any(s in str(error) for s in ("allocate", "bad_alloc")):
            raise
        oom = True
    result = {"wall_s": time.perf_counter() - start, "oom": oom,
              "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cfg.device == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(cfg.result_file).write_text(json.dumps(result))


def main(cfg: Config) -> None:
    if cfg.child:
        return child(cfg)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    build_assets(cfg.work_dir)
    cuda = cfg.device == "cuda"
    print(f"\n| run | wall s | peak RSS MiB |{' CUDA peak MiB |' if cuda else ''}\n"
          f"|---|---|---|{'---|' if cuda else ''}")
    for name in cfg.runs:
        with tempfile.TemporaryDirectory() as tmp:
            result_file = os.path.join(tmp, "result.json")
            env = os.environ | {"OMP_NUM_THREADS": str(cfg.threads), "HF_DATASETS_CACHE": tmp, "WANDB_MODE": "disabled",
                                "TOKENIZERS_PARALLELISM": "false"}
            done = subprocess.run([sys.executable, __file__, "--child", name, "--result_file", result_file,
                                   "--work_dir", str(cfg.work_dir), "--device", cfg.device, "--threads",
                                   str(cfg.threads), "--max_memory_gib", str(cfg.max_memory_gib)],
                                  env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
            r = json.loads(Path(result_file).read_text())
        peak = f"OOM (over {cfg.max_memory_gib:g} GiB)" if r["oom"] else f"{r['max_rss_mib']:.0f}"
        print(f"| {name} | {r['wall_s']:.1f} | {peak} |" + (f" {r['cuda_peak_mib']:.0f} |" if cuda else ""), flush=True)


if __name__ == "__main__":
    main(tyro.cli(Config, use_underscores=True))
