"""Coverage: offline DPO on pairs sampled once from pi_ref, against online DPO on the current policy's own pairs, with
the same number of labels, the same labeller and the same beta, every policy measured exactly on the toy world.

    python reward_model.py && python benchmarks/coverage.py      # 12 runs, two at a time: about 11 min on 2 cores
    python benchmarks/coverage.py --plot_only                    # re-draw docs/coverage.png from the saved JSON

The labeller is the toy reward model r_RM, with Bradley-Terry labels; both runs target pi*_RM = pi_ref exp(r_RM /
beta) / Z. Offline: online_dpo.py --iterative --num_rounds 1 --prompts_per_round N --epochs_per_round 2, which samples
its N pairs from the starting policy, pi_ref, labels them once and trains two passes over them. Online: online_dpo.py's
default, N / 32 rounds of 32 pairs from the current policy, one step each. For N in 1,024, 4,096 and 16,384 labels and
beta = 0.1 and 1 (lr 3e-4, seed 1): KL(pi || pi*_RM) on Y, the objective gap J(pi*_RM) - J(pi) = beta KL(pi || pi*_RM)
of J = E[r_RM] - beta KL(pi || pi_ref) on Y, the true E[r], and the mass outside Y. Results go to
benchmarks/coverage.json; the figure needs matplotlib (pip install matplotlib), which is not a project dependency.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))


@dataclasses.dataclass
class Config:
    reward_model_path: str = "runs/reward_model"
    """the labeller: the toy reward model (python reward_model.py's default run)"""
    labels: tuple[int, ...] = (1024, 4096, 16384)
    betas: tuple[float, ...] = (0.1, 1.0)
    offline_epochs: int = 2
    out_json: Path = REPO / "benchmarks" / "coverage.json"
    out_png: Path = REPO / "docs" / "coverage.png"
    plot_only: bool = False


def run(mode: str, beta: float, labels: int, cfg: Config, out: str) -> dict:
    import torch

    import online_dpo
    import toy
    from test_ppo_toy_world import all_reward_model_scores, optimum_on_answers

    torch.set_num_threads(1)
    world = toy.world
    batch = online_dpo.Args().per_device_train_batch_size
    flags = (dict(iterative=True, num_rounds=1, prompts_per_round=labels, epochs_per_round=cfg.offline_epochs)
             if mode == "offline" else dict(num_rounds=labels // batch))
    online_dpo.train(online_dpo.Args(reward_model_path=cfg.reward_model_path, beta=beta, output_dir=out,
                                     logging_steps=10**9, eval_steps=0, device="cpu", **flags))
    r_rm = all_reward_model_scores(cfg.reward_model_path)
    reference, policy = toy.reference_logprobs(), toy.exact_logprobs(out)
    optimum = {p: optimum_on_answers(reference[p], r_rm[p], beta) for p in world.PROMPTS}
    kl = float(np.mean([world.kl(toy.on_answers(policy[p]), optimum[p]) for p in world.PROMPTS]))
    kl_ref = float(np.mean([world.kl(toy.on_answers(reference[p]), optimum[p]) for p in world.PROMPTS]))
    return {"mode": mode, "beta": beta, "labels": labels, **flags, "kl_to_optimum": kl,
            "kl_fraction": kl / kl_ref, "objective_gap": beta * kl, "reward": toy.expected_reward(policy),
            "mass_outside_y": toy.bottom_mass(policy)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = sorted({r["beta"] for r in results["runs"]})
    fig, axes = plt.subplots(2, len(betas), figsize=(5 * len(betas), 7), squeeze=False)
    for col, beta in enumerate(betas):
        for row, key, label in ((0, "kl_fraction", "KL(π‖π*_RM) on Y, of the reference's"),
                                (1, "mass_outside_y", "mass outside Y")):
            ax = axes[row][col]
            for mode, style in (("offline", "o--"), ("online", "s-")):
                runs = sorted((r for r in results["runs"] if r["beta"] == beta and r["mode"] == mode),
                              key=lambda r: r["labels"])
                ax.plot([r["labels"] for r in runs], [r[key] for r in runs], style,
                        label=f"{mode} DPO" + (" (pairs from π_ref)" if mode == "offline" else " (own samples)"))
            ax.set_xscale("log")
            ax.set_ylabel(label)
            ax.set_title(f"β = {beta}", fontsize=10)
            ax.legend(fontsize=8)
        axes[1][col].set_xlabel("labels (pairs labelled by the reward model)")
    fig.suptitle("Coverage on the toy world: the same labeller and number of labels, offline against online")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(cfg: Config) -> None:
    if cfg.plot_only:
        return plot(json.loads(cfg.out_json.read_text()), cfg.out_png)
    path = Path(cfg.reward_model_path)
    cfg.reward_model_path = str(path if path.is_absolute() else REPO / path)
    if not Path(cfg.reward_model_path).is_dir():
        sys.exit(f"no reward model at {cfg.reward_model_path}: run `python reward_model.py` first")
    work = Path(tempfile.mkdtemp(prefix="coverage_"))
    jobs = [(mode, beta, n) for n in sorted(cfg.labels, reverse=True) for beta in cfg.betas
            for mode in ("offline", "online")]
    with ProcessPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(run, *zip(*jobs), [cfg] * len(jobs), [str(work / f"run{i}") for i in range(len(jobs))]))
    for r in sorted(runs, key=lambda r: (r["beta"], r["labels"], r["mode"])):
        print(f"beta {r['beta']:<4} {r['labels']:>6} labels {r['mode']:8} KL to pi*_RM {r['kl_to_optimum']:.3f} "
              f"({r['kl_fraction']:.1%} of pi_ref's), J gap {r['objective_gap']:.4f}, E[r] {r['reward']:.3f}, "
              f"outside Y {r['mass_outside_y']:.3f}")
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
               "runs": runs}
    cfg.out_json.write_text(json.dumps(results, indent=1) + "\n")
    try:
        plot(results, cfg.out_png)
        print(f"wrote {cfg.out_json} and {cfg.out_png}")
    except ModuleNotFoundError:
        print(f"wrote {cfg.out_json}; no figure: pip install matplotlib, then --plot_only")


if __name__ == "__main__":
    main(tyro.cli(Config, use_underscores=True))
