"""GPU smoke run: dpo.py on random-weight Qwen2.5 shapes, on one GPU, under an 80 GB cap. Run it through gpu_smoke.sh.

    bash benchmarks/gpu_smoke.sh                      # a lent GPU machine, from the repo root: about 4-6 minutes
    bash benchmarks/gpu_smoke.sh --tiny               # the same pipeline on CPU with tiny configs, in seconds
    bash benchmarks/gpu_smoke.sh --peak_tflops 756    # MFU against a peak the device name does not give

gpu_smoke.sh checks that dpo.py's imports are there; what is missing it installs from wheels carried in ./.whl, or it
names them and stops. The GPU image lacks these (versions as in this repo's venv; carry with the `device` tool's
`carry: [".whl"]`, never commit them):
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1

Runs, each in a fresh process that builds its model (random weights, bf16, on the GPU), a tokenizer of Qwen2's
form whose ids cover the vocabulary (one token a word) and synthetic pairs (4 pairs of 256 prompt + 767 response
words + <eos> = 1,024 tokens a row, 6,144 response tokens a step), then caps its memory with
torch.cuda.set_per_process_memory_fraction and runs dpo.py through runpy with the flags below:
  lora-7b   Qwen2.5-7B's config, 10 steps: --lora_r 16 --dtype bfloat16 --gradient_checkpointing
  full-0.5b Qwen2.5-0.5B's config, 5 steps, every weight trained (float32 with bf16 autocast):
            --precompute_ref_logps --gradient_checkpointing (the README's 0.5B recipe)
Where dpo.Args has them, --logp_chunk_tokens 1024 and --attn_implementation sdpa are passed too (the report says
which were). Reported: peak torch.cuda.max_memory_allocated (and _reserved), tokens/s (dpo.py's perf/tokens_per_sec,
real tokens per second of the optimizer step, steps 2 on: step 1 warms up), and MFU.

MFU counts model FLOPs, not hardware FLOPs: gradient checkpointing's recomputation is not counted, nor element-wise
work. With N the layers' linear weights (no embeddings or head), L layers, H hidden, V vocabulary, a row of T tokens
whose last R positions go through the LM head: forward F = 2NT + 2LH*T(T+1) (causal QK^T and AV) + 2VHR.
  full fine-tuning: 3F a row (forward + backward for inputs and weights; the reference is precomputed, outside steps)
  LoRA: F + B + F, with B = 2NT + 4LH*T(T+1) + 2VHR the backward pass for the activations only (attention's has two
        activation operands, so twice its forward), and the last F the reference pass (adapter off). The adapter's
        own matmuls (40M parameters for 7B, r=16) are left out: under 2% of the total.
Peak bf16 dense: H100 SXM / H200 989 TFLOP/s, H100 PCIe 756, A100 312, from the device name (else --peak_tflops).

On paper: Qwen2.5-7B, LoRA r=16 on every linear layer, bf16 base, one 80 GB card, --gradient_checkpointing, 4 pairs
x 1,024 tokens (8 rows, 8,192 tokens, 6,144 response tokens), bf16 autocast. Peak of torch's allocated memory:
  base weights, bf16: 7.616B parameters (6.526B in the layers, 0.545B embedding, 0.545B untied head)  14.2 GiB
  adapter: 40.4M float32 parameters, their gradients and AdamW's two moments (16 bytes each)           0.6 GiB
  checkpointed activations: each layer's input, 8,192 x 3,584 bf16 x 28 layers                          1.5 GiB
  backward through one recomputed layer: its saved tensors, about 310 KB a token (the MLP's 18,944-wide
    gate, up, product and SiLU, the attention's q/k/v/out, RMSNorm's float32 input, and peft's bf16 copy of
    each adapted layer's input) x 8,192 tokens, plus that layer's gradients                             ~3 GiB
  LM head and log-softmax over 6,144 response positions x 152,064: float32 logits are 3.5 GiB. Unchunked,
    the policy keeps them for its backward while the reference pass makes its own (bf16 1.7 GiB, float32 3.5,
    the log-sum-exp's temporary 3.5): ~12 GiB at that moment. With --logp_chunk_tokens 1024: one chunk of
    0.58 GiB float32 at a time, ~1.5 GiB with its temporaries, in either pass                           ~1.5 GiB
  reference pass (adapter off, no gradient): one layer's activations at a time, beside the checkpoints  ~1 GiB
  --> peak allocated: chunked ~20 GiB (14.2 + 0.6 + 1.5 + ~3 + ~0.5 of smaller tensors; the head's and the
      reference's peaks come before the backward's, not on top of it); unchunked ~28 GiB (at the reference pass).
  allocator overhead: reserved is typically 10-20% above allocated (fragmentation of the 0.3-3.5 GiB blocks), and
  the CUDA context takes ~0.5-1 GiB outside torch's count: ~23-25 GiB chunked, ~32-34 GiB unchunked on the card.
Without --gradient_checkpointing every layer keeps ~2.4 GiB (the 310 KB a token above), 66 GiB for 28 layers: with
the weights, over 80 GB. Full fine-tuning of 7B (16 bytes a parameter for float32 weights, gradients and AdamW:
122 GB) fits on no single card.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import random
import re
import resource
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what dpo.py imports, with the packages the GPU image lacks and theirs (datasets: dill, multiprocess; tyro: typeguard,
# docstring_parser): each must be found, not imported, so the check takes no time
NEEDED = ("numpy", "torch", "transformers", "tokenizers", "safetensors", "tqdm", "peft", "datasets", "dill",
          "multiprocess", "tyro", "typeguard", "docstring_parser")

# The released models' config.json values, with tiny stand-ins of the same structure for --tiny.
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, max_position_embeddings=32768)
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, max_position_embeddings=32768)
TINY_7B = QWEN25_7B | dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1024)
TINY_05B = QWEN25_05B | dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=1024)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))  # bf16 dense, first match


@dataclasses.dataclass
class Run:
    name: str
    what: str
    config: dict
    tiny_config: dict  # --tiny: this config, 2 pairs of 8 + 23 + 1 tokens, 3 steps
    steps: int
    lora: bool
    flags: list  # dpo.py flags beside the shared ones
    pairs: int = 4  # pairs per step
    prompt_words: int = 256
    response_words: int = 767  # + <eos>: 1,024 tokens a row


RUNS = [
    Run("lora-7b", "Qwen2.5-7B shape, LoRA r=16, bf16 base", QWEN25_7B, TINY_7B, steps=10, lora=True,
        flags=["--lora_r", "16", "--dtype", "bfloat16", "--gradient_checkpointing", "--learning_rate", "5e-6"]),
    Run("full-0.5b", "Qwen2.5-0.5B shape, full fine-tuning", QWEN25_05B, TINY_05B, steps=5, lora=False,
        flags=["--precompute_ref_logps", "--gradient_checkpointing", "--learning_rate", "5e-7"]),
]


# ---------------------------------------------------------------- assets (also used by bench_one_gpu_memory.py)
def tokenizer_words(vocab_size: int) -> list[str]:
    """vocab_size - 30 distinct words of lowercase letters, every prefix of each one also among them (a, b, .., aa,
    ab, .., aaa, ..): with a space before it, each is one token of build_tokenizer's vocabulary."""
    words, level = [], [""]
    while len(words) < vocab_size - 30:
        level = [w + c for w in level for c in LETTERS][: vocab_size - 30 - len(words)]
        words += level
    return words


def build_tokenizer(vocab_size: int, path: Path) -> list[str]:
    """A byte-level BPE tokenizer of Qwen2's form (its pre-tokenizer regex, then bytes) whose ids cover the
    vocabulary: <pad> 0, <eos> 1, <unk> 2, the space and the 26 letters, then " " + each of tokenizer_words. Its
    merges join a space to a word one letter at a time, so " word" is one token and lengths in words are exact.
    (transformers loads a qwen2 model's tokenizer as Qwen2Tokenizer, which rebuilds this pipeline from the vocabulary
    and merges: a word-level tokenizer would not survive that.) Returns the words."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words, space = tokenizer_words(vocab_size), "\u0120"  # byte-level's stand-in for the space byte
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, space: 3} | {c: 4 + i for i, c in enumerate(LETTERS)}
    vocab |= {space + w: len(vocab) + i for i, w in enumerate(words)}
    merges = [(space + w[:-1], w[-1]) for w in words]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    split = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*""" \
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""  # Qwen2's
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<unk>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)
    return words


def write_pairs(path: Path, n_pairs: int, prompt_words: int, response_words: int, words: list[str],
                seed: int = 0) -> None:
    """Standard-format pairs of fixed lengths in tokens: random words, each text starting with a space."""
    rng = random.Random(seed)
    text = lambda n: "".join(" " + rng.choice(words) for _ in range(n))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n_pairs):
            f.write(json.dumps({"prompt": text(prompt_words), "chosen": text(response_words),
                                "rejected": text(response_words)}) + "\n")


def build_model(config: dict, path: Path, device: str, seed: int = 0) -> tuple[int, list[str]]:
    """A random-weight Qwen2 causal LM from `config`, built in bf16 on `device` and saved to `path` with a tokenizer
    over its whole vocabulary. Returns its parameter count and the tokenizer's words."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    words = build_tokenizer(config["vocab_size"], path)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config, pad_token_id=0, eos_token_id=1,
                                                             bos_token_id=None), dtype=torch.bfloat16)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n, words


# ---------------------------------------------------------------- FLOPs
def linear_params(c: dict) -> int:
    """Weights of every decoder layer's linear maps (q, k, v, o, gate, up, down), no embeddings or head."""
    h, kv = c["hidden_size"], c["num_key_value_heads"] * c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * c["intermediate_size"])


def step_flops(run: Run, config: dict) -> float:
    """Model FLOPs of one optimizer step (the accounting in the module docstring)."""
    n, L, h, v = linear_params(config), config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]
    t, r = run.prompt_words + run.response_words + 1, run.response_words + 1
    forward = 2 * n * t + 2 * L * h * t * (t + 1) + 2 * v * h * r
    backward_inputs = 2 * n * t + 4 * L * h * t * (t + 1) + 2 * v * h * r
    per_row = forward + backward_inputs + forward if run.lora else 3 * forward
    return 2 * run.pairs * per_row


def peak_tflops(device_name: str) -> float:
    return next((peak for key, peak in PEAK_TFLOPS if key in device_name), 0.0)


# ---------------------------------------------------------------- the child: build, cap, run dpo.py
def child(run: Run, opts) -> None:
    import torch

    tiny, work, config = opts.tiny, Path(opts.work_dir) / run.name, run.config
    device = "cpu" if tiny else "cuda"
    started = time.perf_counter()
    model_dir, data = work / "model", work / "pairs.jsonl"
    params, words = build_model(config, model_dir, device)
    write_pairs(data, run.pairs * run.steps, run.prompt_words, run.response_words, words)
    result = {"params": params, "build_s": time.perf_counter() - started, "device": "CPU", "status": "ok"}
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        props = torch.cuda.get_device_properties(0)
        fraction = min(1.0, opts.cap_gb * 1e9 / props.total_memory)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        result |= {"device": props.name, "total_gib": props.total_memory / 2**30, "fraction": fraction}

    sys.path.insert(0, str(REPO))
    import dpo

    fields = {f.name for f in dataclasses.fields(dpo.Args)}
    t = run.prompt_words + run.response_words + 1
    argv = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(work / "out"),
            "--per_device_train_batch_size", str(run.pairs), "--max_length", str(t), "--max_prompt_length",
            str(run.prompt_words), "--max_steps", str(run.steps), "--eval_holdout", "0", "--warmup_ratio", "0",
            "--logging_steps", "1", "--seed", "0", *run.flags] + (["--device", "cpu"] if tiny else [])
    optional = {"logp_chunk_tokens": "16" if tiny else "1024", "attn_implementation": "sdpa"}
    result["passed"] = [f"--{k} {v}" for k, v in optional.items() if k in fields]
    result["dropped"] = [f"--{k}" for k in optional if k not in fields]
    argv += [x for k, v in optional.items() if k in fields for x in (f"--{k}", v)]
    print("+ dpo.py " + " ".join(argv), flush=True)
    sys.argv = [str(REPO / "dpo.py"), *argv]
    started = time.perf_counter()
    try:
        runpy.run_path(str(REPO / "dpo.py"), run_name="__main__")
    except torch.OutOfMemoryError as error:
        result["status"] = "OOM"
        print(f"out of memory: {str(error)[:400]}", flush=True)
    except SystemExit as exit_:
        if exit_.code:
            result["status"] = f"exit {exit_.code}"
    result["train_s"] = time.perf_counter() - started
    result["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        result |= {"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    Path(opts.result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------- the parent: one child per run, then the report
STEP_LINE = re.compile(r"step (\d+): (train/loss=.*)")


def run_child(run: Run, opts, work: Path, env: dict, timeout_s: float) -> dict:
    """Runs `run` in a fresh process, echoing its output; its result with the per-step metrics it printed."""
    result_file = work / f"{run.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", run.name, "--result_file", str(result_file),
           "--work_dir", str(work), "--cap_gb", str(opts.cap_gb)] + (["--tiny"] if opts.tiny else [])
    print(f"=== {run.name}: {run.what}", flush=True)
    proc = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    steps = {}
    for line in proc.stdout:
        print(line, end="", flush=True)
        for part in line.split("\r"):
            match = STEP_LINE.search(part)
            if match:
                steps[int(match[1])] = {k: float(v) for k, v in (kv.split("=") for kv in match[2].split(", "))}
    proc.wait()
    timer.cancel()
    if result_file.exists():
        result = json.loads(result_file.read_text())
    else:
        result = {"status": "killed after timeout" if proc.returncode == -9 else f"exit {proc.returncode}"}
    if proc.returncode and result.get("status") == "ok":
        result["status"] = f"exit {proc.returncode}"
    if len(steps) < run.steps and result.get("status") == "ok":
        result["status"] = f"{len(steps)} of {run.steps} steps logged"
    result["steps"] = steps
    shutil.rmtree(work / run.name, ignore_errors=True)  # the 7B's 15 GB
    return result


def report(runs: list, results: dict, opts, seconds: float) -> bool:
    first = next(iter(results.values()))
    device = first.get("device", "?")
    peak = opts.peak_tflops or peak_tflops(device)
    gpu = device != "CPU"
    cap = (f"memory capped at {opts.cap_gb:g} GB (fraction {first['fraction']:.3f} of {first['total_gib']:.1f} GiB)"
           if gpu and "fraction" in first else "no memory cap on CPU")
    print(f"\ngpu_smoke report: device {device}; {cap}; MFU against {peak:g} TFLOP/s" if peak else
          f"\ngpu_smoke report: device {device}; {cap}; MFU n/a (unknown peak: give --peak_tflops)")
    memory = "peak allocated / reserved GiB" if gpu else "peak RSS GiB"
    print(f"| run | what | params | steps | loss first, last | tokens/step | tokens/s (steps 2+) | MFU | {memory} | "
          "status |\n|---|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for run in runs:
        r = results[run.name]
        config = run.config
        tokens = 2 * run.pairs * (run.prompt_words + run.response_words + 1)
        rates = [m["perf/tokens_per_sec"] for s, m in sorted(r["steps"].items()) if s > 1 or len(r["steps"]) == 1]
        rate = len(rates) / sum(1 / x for x in rates) if rates else 0.0  # the same tokens each step: harmonic mean
        mfu = f"{step_flops(run, config) * rate / tokens / (peak * 1e12):.1%}" if peak and rate else "n/a"
        mem = (f"{r.get('peak_allocated_gib', 0):.1f} / {r.get('peak_reserved_gib', 0):.1f}" if gpu
               else f"{r.get('max_rss_gib', 0):.2f}")
        params = f"{r['params'] / 1e6:,.1f}M" if "params" in r else "?"
        losses = [m["train/loss"] for _, m in sorted(r["steps"].items())]
        loss = f"{losses[0]:.4f}, {losses[-1]:.4f}" if losses else "-"
        print(f"| {run.name} | {run.what} | {params} | {len(r['steps'])} | {loss} | {tokens} | {rate:,.0f} | {mfu} | "
              f"{mem} | {r['status']} |")
        all_ok &= r["status"] == "ok"
    passed, dropped = first.get("passed", []), first.get("dropped", [])
    print(f"flags passed where dpo.Args has them: {', '.join(passed) or 'none'}; "
          f"not in this dpo.py: {', '.join(dropped) or 'none'}")
    print(f"gpu_smoke: done, {sum(results[r.name]['status'] == 'ok' for r in runs)} of {len(runs)} runs ok, "
          f"{seconds:.0f} s")
    return all_ok


def check() -> None:
    """Prints the modules dpo.py needs that are not installed, one a line (nothing when all are there)."""
    for name in NEEDED:
        if importlib.util.find_spec(name) is None:
            print(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs on CPU (CI's check that this runs)")
    parser.add_argument("--cap_gb", type=float, default=80.0, help="GPU memory cap, 1e9 bytes")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="bf16 dense peak (default: from the name)")
    parser.add_argument("--runs", default=",".join(r.name for r in RUNS), help="comma-separated subset of the runs")
    parser.add_argument("--work_dir", default="", help="where models are built (default: a temporary directory)")
    parser.add_argument("--check", action="store_true", help="list the missing modules and exit")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result_file", default="", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.check:
        return check()
    by_name = {r.name: dataclasses.replace(r, config=r.tiny_config, steps=3, pairs=2, prompt_words=8,
                                           response_words=23) if opts.tiny else r for r in RUNS}
    if opts.child:
        return child(by_name[opts.child], opts)
    if not opts.tiny:
        import torch

        if not torch.cuda.is_available():
            sys.exit("gpu_smoke: no CUDA device here; --tiny runs the same pipeline on CPU")
    runs = [by_name[name] for name in opts.runs.split(",")]
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="gpu_smoke_"))
    work.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf"),
                        "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1",
                        "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    results = {run.name: run_child(run, opts, work, env, timeout_s=120 if opts.tiny else 330) for run in runs}
    ok = report(runs, results, opts, time.perf_counter() - started)
    if not opts.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
