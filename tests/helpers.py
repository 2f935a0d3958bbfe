"""Plain helpers that several test modules share. Fixtures live in conftest.py, exact toy-world measurements in
toy.py."""

import itertools
import json
import math
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "toy_world"
# The toy tokenizer splits on whitespace and looks each word up, with no merges: read its vocabulary directly, so that
# expected token ids come from the file, not from the tokenizer code the scripts call.
TOY_VOCAB = json.loads((TOY / "model" / "tokenizer.json").read_text())["model"]["vocab"]
TOY_EOS = TOY_VOCAB["<|end|>"]
N_TRAIN, N_TEST = 64, 16  # rows of toy pairs in the conftest `data_dir` fixture, which the short training runs use
# Short pairwise runs: 4 batches an epoch, so the step 3 -> 4 checkpoint-and-resume crosses an epoch boundary
SHORT_RUN = dict(max_steps=6, save_steps=3, per_device_train_batch_size=16, per_device_eval_batch_size=16,
                 eval_steps=0, logging_steps=1000, device="cpu")

# Tiny random causal LMs covering every branch of the scripts' logit code: Llama (grouped-query attention, untied
# head), Gemma 2 (soft-capped logits), Granite and Cohere (scaled logits). TINY is their shared size: pad 0, eos 2.
TINY = dict(vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=False),
    "gemma2": lambda: Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=5.0),
    "granite": lambda: GraniteConfig(**TINY, logits_scaling=4.0),
    "cohere": lambda: CohereConfig(**TINY, logit_scale=0.5),
}


def head(src: Path, dst: Path, n: int, margin=None) -> None:
    """The first n rows of a jsonl file; with `margin`, each row i also gets margin(i) in a 'margin' column."""
    with open(src) as f:
        lines = list(itertools.islice(f, n))
    if margin is not None:
        lines = [json.dumps({**json.loads(line), "margin": margin(i)}) + "\n" for i, line in enumerate(lines)]
    dst.write_text("".join(lines))


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    """The two saved models' weights, tensor by tensor: identical, or within atol."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def relative_gap(a: Path, b: Path, start: Path) -> float:
    """||w_a - w_b|| / ||w_a - w_start|| over all weights: how far two runs from one start ended apart, as a fraction of
    how far training moved. Two orderings of the same float32 sums differ by rounding (~1e-7 relative), which Adam's
    normalised steps amplify for weights whose gradient is near 0, so comparing each weight to a fixed atol is fragile;
    the gap relative to the whole movement is not. Runs that truly agree measure ~1e-5 here."""
    wa, wb, w0 = (load_file(p / "model.safetensors") for p in (a, b, start))
    assert wa.keys() == wb.keys()
    shared = wa.keys() & w0.keys()  # a reward model started from a causal LM has a head the start lacks
    gap = sum(float(((wa[k] - wb[k]) ** 2).sum()) for k in shared)
    moved = sum(float(((wa[k] - w0[k]) ** 2).sum()) for k in shared)
    return math.sqrt(gap / moved)


def softplus(z: float) -> float:
    """log(1 + e^z), overflow-free."""
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def python(*argv: str) -> subprocess.CompletedProcess:
    """A script run from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "160"})


def cached_runner(module, tmp_path_factory, **fixed):
    """run(fresh=False, **overrides): module.train(module.Args(**fixed, **overrides)) into a fresh output_dir, returned
    as a namespace (out, metrics, args). Calls with the same overrides share one run; fresh=True always trains anew."""
    cache = {}

    def run(fresh: bool = False, **overrides):
        key = tuple(sorted(overrides.items()))
        if fresh or key not in cache:
            args = module.Args(**{**fixed, "output_dir": str(tmp_path_factory.mktemp("run")), **overrides})
            result = SimpleNamespace(out=Path(args.output_dir), metrics=module.train(args), args=args)
            if fresh:
                return result
            cache[key] = result
        return cache[key]

    return run


def toy_ids(text: str) -> list[int]:
    """The toy tokenizer's ids of `text`, word by word from its vocabulary; a word it does not know (such as "?great",
    which "how was the food ?" + "great" makes) raises KeyError instead of becoming <unk>."""
    return [TOY_VOCAB[word] for word in text.split()]


def toy_chat_ids(prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one toy conversation as its chat template renders it, "<|user|> {prompt}
    <|assistant|> {answer} <|end|> ", written out here by hand: the answer's ids end with <|end|>."""
    return toy_ids(f"<|user|> {prompt} <|assistant|>"), toy_ids(answer) + [TOY_EOS]


@torch.no_grad()
def direct_logp(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """log pi(response | prompt) from one plain forward over the lone, unpadded sequence: the log-softmax (in float64)
    of the model's logits, summed over the positions that predict the response's tokens."""
    ids = prompt_ids + response_ids
    logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))


def wandb_offline_log(root: Path, keys: tuple[str, ...], files: tuple[str, ...] = (), timeout: float = 120.0) -> bytes:
    """The binary log of the one offline wandb run under root/wandb (WANDB_DIR=root), once it holds every key and
    every glob in `files` matches.

    wandb's service writes the run out in the background: run.finish() can return before it has (seen once in CI, on
    busy cores). teardown() stops the service, which flushes what it holds; the poll then waits, up to `timeout`, for
    a service slower than that, so the test does not depend on how fast the files appear. A genuinely missing key
    fails after `timeout`, naming what is missing.
    """
    import wandb

    wandb.teardown()
    deadline = time.monotonic() + timeout
    while True:
        records = list(root.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(records) <= 1, f"more than one wandb run under {root}: {records}"
        data = records[0].read_bytes() if records else b""  # protobuf keeps the keys as text
        missing = [k for k in keys if k.encode() not in data] + [f for f in files if not list(root.glob(f))]
        if records and not missing:
            return data
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f} s the offline wandb run under {root} lacks {missing}")
        time.sleep(0.25)


def newton_minimise(loss, theta: torch.Tensor, tol: float = 1e-13) -> torch.Tensor:
    """The minimiser of a convex loss over softmax logits by Newton's method from theta, in float64: the
    pseudo-inverse of the Hessian skips the flat direction theta + c. Stops once the gradient is below tol."""
    for _ in range(100):
        grad = torch.autograd.functional.jacobian(loss, theta)
        if grad.abs().max() < tol:
            return theta
        theta = theta - torch.linalg.pinv(torch.autograd.functional.hessian(loss, theta), hermitian=True) @ grad
    raise AssertionError(f"Newton did not converge: gradient {grad.abs().max():.1e}")


def help_text(script: str, monkeypatch, capsys) -> str:
    """What `python script --help` prints, from the script's own `__main__` block run in this process (a fresh
    interpreter would spend seconds importing); its exit status must be 0."""
    import pytest

    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setenv("COLUMNS", "160")
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert info.value.code == 0
    return capsys.readouterr().out
