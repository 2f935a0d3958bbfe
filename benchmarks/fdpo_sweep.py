"""f-DPO across divergences on the toy world: trained policies beside their analytic optima, and the figure.

    python benchmarks/fdpo_sweep.py                                  # train the grid (minutes per point), then plot
    python benchmarks/fdpo_sweep.py --plot_only                      # re-plot from the saved JSON

For each alpha of the grid (alpha -> 0 is the reverse KL, alpha = 1 the forward KL) fdpo.py trains on the toy
pairs; the trained policy is enumerated exactly over Y and its entropy and E[r] recorded beside those of its
divergence's analytic optimum pi_ref(.|Y) (f')^{-1}((r - lambda)/beta) (tests/fdpo_toy.py), computed on a fine
alpha grid. JS is computed and trained too. Results go to --out_json, the figure to --out_png. The figure needs
matplotlib, which is not a project dependency (pip install matplotlib): only this script draws.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
import fdpo_toy  # noqa: E402
import toy  # noqa: E402


@dataclasses.dataclass
class Config:
    beta: float = 1.0
    alphas: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    """alphas to train at; the reverse KL, the forward KL and JS are trained too"""
    learning_rate: float = 1e-3
    num_train_epochs: int = 2
    threads: int = 2
    out_json: Path = REPO / "benchmarks" / "fdpo_sweep.json"
    out_png: Path = REPO / "docs" / "fdpo_tradeoff.png"
    plot_only: bool = False
    analytic_betas: tuple[float, ...] = (1.0, 0.1)
    """further betas whose analytic curves are drawn (no training) in rows below the trained one"""


def analytic(reference: dict, beta: float) -> dict:
    grid = [0.001, *np.round(np.arange(0.025, 1.0, 0.025), 3).tolist(), 0.999]
    curve = [fdpo_toy.entropy_and_reward(fdpo_toy.optima(reference, beta, "alpha", a)) for a in grid]
    ends = {d: fdpo_toy.entropy_and_reward(fdpo_toy.optima(reference, beta, d))
            for d in ("reverse_kl", "forward_kl", "js")}
    return {"alpha": grid, "entropy": [c[0] for c in curve], "reward": [c[1] for c in curve], "ends": ends}


def train_point(cfg: Config, divergence: str, alpha: float, **overrides) -> dict:
    """Train fdpo.py at one divergence (cfg's beta, learning rate and epochs unless `overrides`, further fdpo.Args
    fields, say otherwise) and measure the policy exactly over Y beside its analytic optimum."""
    import torch

    import fdpo

    torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        args = {"learning_rate": cfg.learning_rate, "num_train_epochs": cfg.num_train_epochs, **overrides}
        fdpo.train(fdpo.Args(divergence=divergence, alpha=alpha, beta=cfg.beta, precompute_ref_logps=True, eval_steps=0,
                             logging_steps=100_000, output_dir=tmp, device="cpu", **args))
        seconds = time.perf_counter() - start
        policy = toy.exact_logprobs(tmp)
    reference = toy.reference_logprobs()
    optimum = fdpo_toy.optima(reference, cfg.beta, divergence, alpha if divergence == "alpha" else None)
    on_y = {p: toy.on_answers(policy[p]) for p in policy}
    kl = float(np.mean([toy.world.kl(on_y[p], optimum[p]) for p in optimum]))
    kl_ref = float(np.mean([toy.world.kl(toy.on_answers(reference[p]), optimum[p]) for p in optimum]))
    entropy, reward = fdpo_toy.entropy_and_reward(on_y)
    opt_entropy, opt_reward = fdpo_toy.entropy_and_reward(optimum)
    return {"divergence": divergence, "alpha": alpha, "entropy": entropy, "reward": reward,
            "optimum_entropy": opt_entropy, "optimum_reward": opt_reward, "kl_y": kl, "kl_y_reference": kl_ref,
            "bottom": toy.bottom_mass(policy), "seconds": seconds}


def plot(results: dict, path: Path) -> None:
    """One row per beta: entropy and E[r] against alpha. The first row has the trained points; the others are
    analytic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(results["beta"], results["analytic"], results["trained"])] + [
        (float(b), a, []) for b, a in results.get("analytic_other", {}).items()]
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.3 * len(rows)), squeeze=False)
    for (beta, a, trained), row in zip(rows, axes):
        for ax, k, label in ((row[0], 0, "entropy of π(·|Y) (nats)"), (row[1], 1, "E[r] over Y")):
            key = ("entropy", "reward")[k]
            ax.plot(a["alpha"], a[key], color="C0", label="analytic optimum (α-divergence)")
            ax.scatter([0.0, 1.0], [a["ends"]["reverse_kl"][k], a["ends"]["forward_kl"][k]], marker="s", color="C0",
                       zorder=3, label="reverse KL (α→0), forward KL (α=1)")
            ax.axhline(a["ends"]["js"][k], color="C2", ls="--", label="JS, analytic")
            pts = [p for p in trained if p["divergence"] != "js"]
            if pts:
                xs = [p["alpha"] if p["divergence"] == "alpha" else (0.0 if p["divergence"] == "reverse_kl" else 1.0)
                      for p in pts]
                ax.scatter(xs, [p[key] for p in pts], color="C1", zorder=3, label="trained with fdpo.py")
            for p in trained:
                if p["divergence"] == "js":
                    ax.axhline(p[key], color="C2", ls=":", label="JS, trained")
            ax.set_title(f"β = {beta}" + (": trained and analytic" if trained else ": analytic only"), fontsize=9)
            ax.set_ylabel(label)
        row[0].legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("α   (0: reverse KL  →  1: forward KL)")
    fig.suptitle("f-DPO on the toy world: exact entropy and E[r] of the optima, and of policies trained by fdpo.py")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(cfg: Config) -> None:
    if cfg.plot_only:
        results = json.loads(cfg.out_json.read_text())
        results["analytic_other"] = {str(b): analytic(toy.reference_logprobs(), b) for b in cfg.analytic_betas}
        cfg.out_json.write_text(json.dumps(results, indent=1))
        return plot(results, cfg.out_png)
    results = {"beta": cfg.beta, "learning_rate": cfg.learning_rate, "num_train_epochs": cfg.num_train_epochs,
               "analytic": analytic(toy.reference_logprobs(), cfg.beta), "trained": [],
               "analytic_other": {str(b): analytic(toy.reference_logprobs(), b) for b in cfg.analytic_betas}}
    for divergence, alpha in [("reverse_kl", 0.5), *(("alpha", a) for a in cfg.alphas), ("forward_kl", 0.5),
                              ("js", 0.5)]:
        point = train_point(cfg, divergence, alpha)
        results["trained"].append(point)
        print(json.dumps(point), flush=True)
        cfg.out_json.write_text(json.dumps(results, indent=1))
    plot(results, cfg.out_png)
    print(f"wrote {cfg.out_json} and {cfg.out_png}")


if __name__ == "__main__":
    main(tyro.cli(Config, use_underscores=True))
