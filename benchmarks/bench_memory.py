"""Peak memory of the pairwise scripts on one config: what holding a reference model costs.

dpo.py and ipo.py keep a frozen reference next to the policy (or, with --precompute_ref_logps, score every pair
with it once and free it); slic_hf.py has no reference at all. Each run trains one epoch on the same ~23M-parameter
Llama and 160 synthetic pairs that benchmarks/bench_dpo.py builds (fp32, batch 8, AdamW), in a fresh subprocess,
and reports its peak memory: the resident set (ru_maxrss) on CPU, and torch.cuda.max_memory_allocated on a GPU.

    python benchmarks/bench_memory.py                 # CPU; about 6 minutes (four runs)
    python benchmarks/bench_memory.py --device cuda   # on a GPU machine

The CPU figure includes the interpreter, torch and transformers (about 0.5 GB before any model is loaded), so
compare differences between rows, not ratios.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo import Config as AssetConfig  # noqa: E402
from bench_dpo import build_assets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # name: (script, extra Args)
    "dpo.py (reference held)": ("dpo", {}),
    "dpo.py --precompute_ref_logps": ("dpo", {"precompute_ref_logps": True}),
    "ipo.py (reference held)": ("ipo", {}),
    "slic_hf.py (no reference)": ("slic_hf", {}),
}


@dataclasses.dataclass
class Config:
    work_dir: Path = Path("/tmp/dpo_bench_23m")
    """where bench_dpo.py's model and pairs are built (shared with it)"""
    device: str = "cpu"
    threads: int = 2
    child: str = ""
    """internal: run this entry of RUNS in this process"""
    result_file: str = ""
    """internal: where the child writes its measurement"""


def child(cfg: Config) -> None:
    import torch

    torch.set_num_threads(cfg.threads)
    sys.path.insert(0, str(REPO))
    script, extra = RUNS[cfg.child]
    module = __import__(script)
    args = module.Args(model_name_or_path=str(cfg.work_dir / "model"), dataset_name=str(cfg.work_dir / "pairs.jsonl"),
                       eval_holdout=0, max_length=512, max_prompt_length=511, per_device_train_batch_size=8,
                       learning_rate=1e-6, warmup_ratio=0.0, num_train_epochs=1, logging_steps=1000, eval_steps=0,
                       output_dir=tempfile.mkdtemp(), device=cfg.device, **extra)
    start = time.perf_counter()
    module.train(args)
    result = {"wall_s": time.perf_counter() - start,
              "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cfg.device == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(cfg.result_file).write_text(json.dumps(result))


def main(cfg: Config) -> None:
    if cfg.child:
        return child(cfg)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    build_assets(AssetConfig(work_dir=cfg.work_dir))
    rows = []
    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            result_file = os.path.join(tmp, "result.json")
            env = os.environ | {"OMP_NUM_THREADS": str(cfg.threads), "HF_DATASETS_CACHE": tmp, "WANDB_MODE": "disabled",
                                "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run([sys.executable, __file__, "--child", name, "--result_file", result_file,
                            "--work_dir", str(cfg.work_dir), "--device", cfg.device, "--threads", str(cfg.threads)],
                           env=env, check=True, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows.append((name, json.loads(Path(result_file).read_text())))
    cuda = cfg.device == "cuda"
    print(f"\n| run | wall s | peak RSS MiB |{' CUDA peak MiB |' if cuda else ''}\n"
          f"|---|---|---|{'---|' if cuda else ''}")
    for name, r in rows:
        print(f"| {name} | {r['wall_s']:.1f} | {r['max_rss_mib']:.0f} |"
              + (f" {r['cuda_peak_mib']:.0f} |" if cuda else ""))


if __name__ == "__main__":
    main(tyro.cli(Config, use_underscores=True))
