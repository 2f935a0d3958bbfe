"""f-DPO's end-to-end target on the toy world, with more data than the test suite can afford.

    python benchmarks/fdpo_target.py          # draws 65,536 fresh pairs, then trains twice: about 17 min on 2 threads

Issue 5 asks that training on the toy world bring KL(pi|Y || pi*|Y), with pi* each divergence's own optimum, to at
most 20% of the reference's, for the forward KL and for alpha = 0.5. On the toy world's 16k pairs no setting we tried
gets there (tests/test_fdpo_toy_world.py holds those runs to their measured 26.2% and 21.0%): at beta = 3 what is
left barely moves with the optimiser's settings or with where the pairs are drawn, but shrinks with compute and data
together (docs/fdpo.md). This draws fresh pairs by the toy world's own recipe (both answers i.i.d. from the
reference's exact distribution over Y, Bradley-Terry labels from the true reward, identical answers skipped) and
trains fdpo.py on them at beta = 3, through its real tokenization and log-prob code. Each trained policy is
enumerated exactly over Y. The command exits 1 if a run misses the target or leaves more than 5% of its mass outside
Y. Results go to --out_json.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
import fdpo_sweep  # noqa: E402
import toy  # noqa: E402

world = toy.world
# (divergence, alpha, fdpo.Args overrides): 1,536 steps of 256 pairs each. At lr 1e-3 the alpha = 0.5 run gets closer
# on Y but puts 15% of its mass outside Y, which the loss never sees; at 3e-4 it keeps 0.5% there.
RUNS = (
    ("forward_kl", 0.5, {"learning_rate": 1e-3, "num_train_epochs": 6, "per_device_train_batch_size": 256}),
    ("alpha", 0.5, {"learning_rate": 3e-4, "num_train_epochs": 6, "per_device_train_batch_size": 256}),
)


@dataclasses.dataclass
class Config:
    n_pairs: int = 65_536
    """fresh training pairs to draw (the toy world ships 16,384)"""
    seed: int = 7
    """seed of the pair draw (training uses fdpo.py's default seed)"""
    beta: float = 3.0
    threads: int = 2
    target: float = 0.20
    """the largest KL(pi|Y || pi*|Y) allowed, as a share of the reference's"""
    max_outside: float = 0.05
    """the largest mass a trained policy may put outside Y"""
    out_json: Path = REPO / "benchmarks" / "fdpo_target.json"


def draw_pairs(n: int, seed: int, out: Path) -> None:
    """n Bradley-Terry pairs with both answers drawn i.i.d. from pi_ref(.|Y), written as out/train.jsonl in the toy
    pairs' format; the toy world's held-out pairs are copied as out/test.jsonl."""
    rng = np.random.default_rng(seed)
    reference = toy.reference_logprobs()
    cdf = {p: np.cumsum(np.exp(toy.on_answers(reference[p]))) for p in world.PROMPTS}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as f:
        written = 0
        while written < n:
            prompt = world.PROMPTS[rng.integers(len(world.PROMPTS))]
            i, j = np.minimum(np.searchsorted(cdf[prompt], rng.random(2) * cdf[prompt][-1]),
                              len(world.RESPONSES) - 1)
            if i == j:  # two identical answers carry no preference
                continue
            a, b = world.RESPONSES[i], world.RESPONSES[j]
            # P(a > b) = sigmoid(r_a - r_b)
            if rng.random() >= 1 / (1 + np.exp(world.reward(prompt, b) - world.reward(prompt, a))):
                a, b = b, a
            row = {"prompt": [{"role": "user", "content": prompt}],
                   "chosen": [{"role": "assistant", "content": " ".join(a)}],
                   "rejected": [{"role": "assistant", "content": " ".join(b)}]}
            f.write(json.dumps(row) + "\n")
            written += 1
    shutil.copy(REPO / "toy_world" / "pairs" / "test.jsonl", out / "test.jsonl")


def main(cfg: Config) -> None:
    results, failed = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_json"}, "runs": []}, []
    with tempfile.TemporaryDirectory() as tmp:
        draw_pairs(cfg.n_pairs, cfg.seed, Path(tmp) / "pairs")
        for divergence, alpha, overrides in RUNS:
            point = fdpo_sweep.train_point(fdpo_sweep.Config(beta=cfg.beta, threads=cfg.threads), divergence, alpha,
                                           dataset_name=str(Path(tmp) / "pairs"), **overrides)
            point.update(overrides, share=point["kl_y"] / point["kl_y_reference"])
            results["runs"].append(point)
            name = divergence + (f" alpha={alpha}" if divergence == "alpha" else "")
            print(f"{name}: KL(pi|Y || pi*|Y) {point['kl_y_reference']:.4f} -> {point['kl_y']:.4f}, "
                  f"{point['share']:.1%} of the reference's (target {cfg.target:.0%}); "
                  f"mass outside Y {point['bottom']:.3f}; entropy {point['entropy']:.3f} "
                  f"(optimum {point['optimum_entropy']:.3f}); E[r] {point['reward']:.3f} "
                  f"(optimum {point['optimum_reward']:.3f}); trained in {point['seconds']:.0f} s", flush=True)
            if point["share"] > cfg.target or point["bottom"] > cfg.max_outside:
                failed.append(name)
    cfg.out_json.write_text(json.dumps(results, indent=1))
    print(f"wrote {cfg.out_json}"
          + (f"; missed the target: {', '.join(failed)}" if failed else "; both runs met the target"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(tyro.cli(Config, use_underscores=True))
