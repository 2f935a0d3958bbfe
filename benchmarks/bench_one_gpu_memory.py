"""Peak memory of dpo.py's one-GPU tools, measured on the CPU with Qwen2.5's real vocabulary (151,936 tokens).

What a precomputed reference, bf16 frozen weights, LoRA and chunked log-probs each save: every row trains 2 DPO steps
(dpo.py's train with max_steps=2) in a fresh subprocess and reports that process's peak resident set (ru_maxrss, read
with wait4, so that a process the kernel kills is measured too). The model is a Qwen2 built from a config: 2 layers,
hidden 256, untied head as in Qwen2.5-7B; 77.8M of its 79.3M parameters are the embedding and the head, so the
vocabulary dominates, as it does a real model's LM head. Pairs are synthetic, of fixed lengths: 4 pairs a step, a
64-token prompt, responses of 32, 256 or 1,024 tokens with <eos>, so 256, 2,048 or 8,192 response positions a batch
(the tokenizer is gpu_smoke.py's, one token a word). The first five rows use the 256 batch, where the weights and the
optimizer dominate; the 2k and 8k rows compare unchunked and chunked log-probs under LoRA with a bf16 base. Trained
weights are float32 (no autocast on the CPU). dpo.py's final save is skipped: it is not training memory.

Each child runs under an address-space limit (RLIMIT_AS, --mem_cap_gib, default 12 GiB: the machine is shared); an
allocation beyond it is an out-of-memory, recorded as one with the size it asked for (so is a child the kernel kills).
Rows with --logp_chunk_tokens need dpo.py to have that flag, and show n/a until it does.

    python benchmarks/bench_one_gpu_memory.py               # 6 minutes on 2 cores busy with other work (2 threads)
    python benchmarks/bench_one_gpu_memory.py --rows full,lora-bf16   # a subset

The 6 minutes were measured without the two chunked rows; there, the 2k one should take about as long as the 2k
unchunked row (80 s) and the 8k one about four times that. The figures include the interpreter, torch, transformers
and datasets (about 0.45 GB before any model is loaded): compare differences between rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_smoke import QWEN25_05B, build_model, write_pairs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = QWEN25_05B | dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=False)  # vocab_size 151,936
PROMPT = 64
BATCHES = {"256": 31, "2k": 255, "8k": 1023}  # response words; + <eos>, x 2 responses x 4 pairs = 256 / 2,048 / 8,192
PAIRS = 4
CHUNK = {"logp_chunk_tokens": 1024}
BF16, LORA = {"dtype": "bfloat16"}, {"lora_r": 16}
ROWS = {  # name: (label, batch, dpo.Args overrides)
    "full": ("full fine-tuning (float32, reference held)", "256", {}),
    "precompute": ("--precompute_ref_logps", "256", {"precompute_ref_logps": True}),
    "bf16": ("--dtype bfloat16 (the reference in bf16)", "256", BF16),
    "lora": ("--lora_r 16 (float32 base, the reference = adapter off)", "256", LORA),
    "lora-bf16": ("--lora_r 16 --dtype bfloat16", "256", LORA | BF16),
    "2k-unchunked": ("--lora_r 16 --dtype bfloat16, unchunked", "2k", LORA | BF16),
    "2k-chunked": ("--lora_r 16 --dtype bfloat16 --logp_chunk_tokens 1024", "2k", LORA | BF16 | CHUNK),
    "8k-unchunked": ("--lora_r 16 --dtype bfloat16, unchunked", "8k", LORA | BF16),
    "8k-chunked": ("--lora_r 16 --dtype bfloat16 --logp_chunk_tokens 1024", "8k", LORA | BF16 | CHUNK),
}


@dataclasses.dataclass
class Config:
    work_dir: Path = Path("/tmp/one_gpu_memory_bench")
    """where the model and the pairs are built (once)"""
    rows: str = ",".join(ROWS)
    """comma-separated subset of the rows"""
    threads: int = 2
    mem_cap_gib: float = 12.0
    """each child's address-space limit: an allocation beyond it is recorded as out of memory"""
    timeout_s: float = 600.0
    """a child still running after this is stopped and recorded as such"""
    child: str = ""
    """internal: run this row in this process"""
    result_file: str = ""
    """internal: where the child writes its result"""


def build_assets(work_dir: Path) -> None:
    meta = {"config": CONFIG, "prompt": PROMPT, "batches": BATCHES, "pairs": PAIRS, "version": 1}
    meta_file = work_dir / "meta.json"
    if meta_file.exists() and json.loads(meta_file.read_text()) == meta:
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    params, words = build_model(CONFIG, work_dir / "model", "cpu")
    for name, response in BATCHES.items():
        write_pairs(work_dir / f"pairs_{name}.jsonl", 2 * PAIRS, PROMPT, response, words)
    meta_file.write_text(json.dumps(meta | {"params": params}))


def child(cfg: Config) -> None:
    import torch

    torch.set_num_threads(cfg.threads)
    sys.path.insert(0, str(REPO))
    import dpo

    _, batch, overrides = ROWS[cfg.child]
    dpo.save = lambda *args, **kwargs: None  # the final save is not training memory
    data = cfg.work_dir / f"pairs_{batch}.jsonl"
    args = dpo.Args(model_name_or_path=str(cfg.work_dir / "model"), dataset_name=str(data), eval_holdout=0,
                    max_length=PROMPT + BATCHES[batch] + 1, max_prompt_length=PROMPT, per_device_train_batch_size=PAIRS,
                    max_steps=2, learning_rate=1e-6, warmup_ratio=0.0, logging_steps=1, eval_steps=0, save_steps=0,
                    output_dir=tempfile.mkdtemp(), device="cpu", seed=0, **overrides)
    result = {"status": "ok"}
    try:
        metrics = dpo.train(args)
        result["loss"] = metrics["train/loss"]
    except (MemoryError, RuntimeError) as error:  # torch's CPU allocator raises RuntimeError("... can't allocate ...")
        if not isinstance(error, MemoryError) and "allocate" not in str(error):
            raise
        asked = re.search(r"allocate (\d+) bytes", str(error))
        result["status"] = f"OOM (asking for {int(asked[1]) / 2**30:.2f} GiB more)" if asked else "OOM"
    Path(cfg.result_file).write_text(json.dumps(result))


def run_row(name: str, cfg: Config, tmp: str) -> dict:
    """The row in a fresh process under the address-space cap; its peak RSS from wait4, whatever way it ended."""
    result_file, log = os.path.join(tmp, f"{name}.json"), os.path.join(tmp, f"{name}.log")
    cap = int(cfg.mem_cap_gib * 2**30)
    env = os.environ | {"OMP_NUM_THREADS": str(cfg.threads), "HF_DATASETS_CACHE": tmp, "WANDB_MODE": "disabled",
                        "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result_file", result_file,
           "--work_dir", str(cfg.work_dir), "--threads", str(cfg.threads)]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
        timer = threading.Timer(cfg.timeout_s, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"wall_s": time.perf_counter() - start, "max_rss_mib": usage.ru_maxrss / 1024}
    if os.path.exists(result_file):
        return result | json.loads(Path(result_file).read_text())
    if proc.returncode == -9 and result["wall_s"] >= cfg.timeout_s:
        return result | {"status": f"stopped after {cfg.timeout_s:.0f} s"}
    tail = Path(log).read_text()[-1500:]
    print(f"--- {name} ended with status {proc.returncode}; its log ends:\n{tail}", flush=True)
    killed = proc.returncode < 0 or "MemoryError" in tail or "allocate" in tail
    return result | {"status": f"OOM (killed by signal {-proc.returncode})" if proc.returncode < 0
                     else "OOM" if killed else f"error (exit {proc.returncode})"}


def main(cfg: Config) -> None:
    if cfg.child:
        return child(cfg)
    build_assets(cfg.work_dir)
    sys.path.insert(0, str(REPO))
    import dpo

    fields = {f.name for f in dataclasses.fields(dpo.Args)}
    meta = json.loads((cfg.work_dir / "meta.json").read_text())
    print(f"model: Qwen2, {meta['params'] / 1e6:.1f}M parameters (vocab 151,936, hidden 256, 2 layers, untied head); "
          f"{cfg.threads} threads; each child capped at {cfg.mem_cap_gib:g} GiB of address space", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in cfg.rows.split(","):
            overrides = ROWS[name][2]
            if not overrides.keys() <= fields:
                rows[name] = {"status": "n/a (no --" + ", --".join(sorted(overrides.keys() - fields)) + ")"}
            else:
                rows[name] = run_row(name, cfg, tmp)
            print(f"{name}: {rows[name]}", flush=True)
    base = rows.get("full", {}).get("max_rss_mib") if rows.get("full", {}).get("status") == "ok" else None
    print("\n| run | response tokens / batch | peak RSS MiB | vs full fine-tuning | wall s | status |\n"
          "|---|---|---|---|---|---|")
    for name, r in rows.items():
        label, batch, _ = ROWS[name]
        rss = f"{r['max_rss_mib']:,.0f}" if "max_rss_mib" in r else "-"
        delta = f"{r['max_rss_mib'] - base:+,.0f}" if base and "max_rss_mib" in r and batch == "256" else "-"
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else "-"
        tokens = f"{2 * PAIRS * (BATCHES[batch] + 1):,}"
        print(f"| {label} | {tokens} | {rss} | {delta} | {wall} | {r['status']} |")


if __name__ == "__main__":
    main(tyro.cli(Config, use_underscores=True))
