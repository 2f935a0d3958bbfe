"""How fast this machine is, in three numbers, so that the suite's times measured on different machines can be
compared.

    python benchmarks/machine_speed.py          # about 20 s

The suite's time is spent in two kinds of work: Python-level overhead (tokenization, chat templates, the optimizer's
and the model's small ops) and single-threaded float32 matrix products (the toy model's forward and backward passes).
This times each on one thread, as the tests run: a loop of 20 million integer additions, 512 x 512 float32 matrix
products, and the work most of the suite's time goes to, a forward and backward pass of the toy model
(toy_world/model) on 64 sequences of 24 tokens. docs/tests.md gives the suite's time beside these figures for the
machines it was measured on.
"""

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

MODEL = Path(__file__).resolve().parents[1] / "toy_world" / "model"


def best_of(runs: int, fn) -> float:
    """The fastest of `runs` timings of fn(), in seconds: the least disturbed by other work on the machine."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def python_loop() -> None:
    total = 0
    for i in range(20_000_000):
        total += i


def main() -> None:
    torch.set_num_threads(1)
    loop = best_of(3, python_loop)
    a = torch.randn(512, 512)
    products = 200
    matmul = best_of(3, lambda: [a @ a for _ in range(products)])
    gflops = products * 2 * 512**3 / matmul / 1e9
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    ids = torch.randint(5, model.config.vocab_size, (64, 24), generator=torch.Generator().manual_seed(0))

    def steps() -> None:
        for _ in range(10):
            model(input_ids=ids, labels=ids).loss.backward()

    step = best_of(3, steps) / 10
    print(f"python loop of 20M additions: {loop:.2f} s; float32 512x512 matmul on 1 thread: {gflops:.1f} GFLOP/s; "
          f"toy model forward and backward, 64 x 24 tokens: {step * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
