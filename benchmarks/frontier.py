"""One map of every method: each trained policy as a point on the exact reward-KL plane of the toy world, beside the
frontier no policy can pass, with its entropy and diversity.

    python benchmarks/frontier.py              # trains every method (two at a time): about 15 min on 2 cores
    python benchmarks/frontier.py --remeasure  # measures the policies it cached in the temp dir again: about 1 min
    python benchmarks/frontier.py --plot_only  # re-draws docs/frontier.png from benchmarks/frontier.json

Every script runs with its defaults on the toy world (seed 1), at the settings RUNS lists; ppo_rlhf.py and online_dpo.py
score with the reward model that `reward_model.py`'s default run trains first. Each result is enumerated exactly
(tests/toy.py) and measured by tests/frontier_toy.py: KL(pi || pi_ref) and the true E[r] over Y + BOTTOM (means over
the 8 prompts), the entropy, the mass outside Y, per-prompt distinct-1 and distinct-2 over 64 answers drawn exactly
from the policy, and F(KL), the frontier's reward at the point's KL: the most any policy can have there.

Drawn over the points (left panel: E[r] against KL; right: entropy against KL):
- the frontier, pi_ref exp(r/beta) / Z over beta; past its end (all the mass on the best answers) F = max r, and the
  entropy panel continues with the policies that have all the reward and the most entropy at each KL;
- the forward-KL and alpha = 0.5 optima on Y (f-DPO's targets), and IPO's optimum on Y, over beta;
- the reward model's optimum on Y, pi_ref(.|Y) exp(r_RM/beta) / Z, measured with the true r: the target of the methods
  that learn from the reward model (PPO, RLOO, online DPO).
Writes benchmarks/frontier.json and docs/frontier.png (matplotlib, a benchmark-only dependency); docs/frontier.md
reads them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

# name -> (script, Args overrides, a subdirectory of output_dir to measure (stage 1 of sacpo.py), needs the RM)
RUNS = {
    "DPO (β 0.1)": ("dpo", {}, "", False),
    "DPO (β 1)": ("dpo", {"beta": 1.0}, "", False),
    "IPO (β 0.1)": ("ipo", {}, "", False),
    "SLiC-HF": ("slic_hf", {}, "", False),
    "RRHF": ("rrhf", {}, "", False),
    "f-DPO, forward KL (β 0.1)": ("fdpo", {"divergence": "forward_kl"}, "", False),
    "f-DPO, α = 0.5 (β 0.1)": ("fdpo", {}, "", False),
    "KTO (β 0.1)": ("kto", {}, "", False),
    "SACPO stage 1: DPO on r (β 1)": ("sacpo", {}, "reward", False),
    "SACPO, both stages (β 1, λ 0.72)": ("sacpo", {}, "", False),
    "SPIN (3 iterations)": ("spin", {}, "", False),
    "PPO (β 0.1)": ("ppo_rlhf", {}, "", True),
    "RLOO (β 0.1, 16 prompts x 4)": ("ppo_rlhf", {"advantage_estimator": "rloo", "rollout_batch_size": 16}, "", True),
    "online DPO (β 0.1)": ("online_dpo", {}, "", True),
    "GRPO (β 0.04, KL in the loss)": ("grpo", {}, "", False),
    "GRPO, KL in the reward (β 0.5)": ("grpo", {"kl_in": "reward", "scale_rewards": "none", "beta": 0.5}, "", False),
}
CURVE_BETAS = np.geomspace(0.02, 50, 41)
CACHE = Path(tempfile.gettempdir()) / "frontier_policies"  # each run's exact log-probs (2.6 MB each), for --remeasure
SAMPLES = 64


def train_reward_model(out: str) -> str:
    import torch

    import reward_model

    torch.set_num_threads(1)
    reward_model.train(reward_model.Args(output_dir=out, logging_steps=10**6, eval_steps=0, device="cpu"))
    return out


def policy_file(name: str) -> Path:
    """Where a run's exact log-probs are kept, so that --remeasure can measure them again without training."""
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE / ("".join(c if c.isalnum() else "_" for c in name) + ".npz")


def measure(name: str, policy: dict) -> dict:
    import frontier_toy as ft
    import toy

    reference = toy.reference_logprobs()
    f = ft.point(policy, reference)
    f["frontier"], f["frontier_beta"] = ft.frontier_at(f["kl"], reference)
    # the entropy of the reward-optimal policy at this KL; past the frontier's end, where many policies have all the
    # reward, the most entropy any of them has at this KL
    optimal = (ft.point(ft.reverse_optimum(reference, f["frontier_beta"]), reference) if f["frontier_beta"] > 0
               else ft.past_the_end(f["kl"], reference))
    f["frontier_entropy"] = optimal["entropy"]
    script, overrides, subdir, _ = RUNS[name]
    return {"name": name, "script": f"{script}.py", "flags": overrides, "measured": subdir or "output_dir", **f,
            **ft.distinct_n(policy, SAMPLES)}


def run(job: tuple[str, str]) -> dict:
    """Train one RUNS entry into a temporary directory and measure the policy it saved."""
    import importlib

    import torch

    import toy

    torch.set_num_threads(1)
    name, reward_model_path = job
    script, overrides, subdir, needs_rm = RUNS[name]
    module = importlib.import_module(script)
    extra = {"reward_model_path": reward_model_path} if needs_rm else {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        fields = {f.name for f in dataclasses.fields(module.Args)}
        quiet = {k: v for k, v in {"logging_steps": 10**6, "eval_steps": 0}.items() if k in fields}
        args = module.Args(**{"output_dir": out, "device": "cpu", **quiet, **extra, **overrides})
        module.train(args)
        policy = toy.exact_logprobs(os.path.join(out, subdir))
    np.savez(policy_file(name), **policy)
    return {**measure(name, policy), "seconds": time.perf_counter() - start}


def curves(reward_model_path: str) -> dict:
    import frontier_toy as ft
    import toy
    from test_ppo_toy_world import all_reward_model_scores

    reference = toy.reference_logprobs()
    scores = all_reward_model_scores(reward_model_path)
    optima = {"frontier (π_ref exp(r/β)/Z)": lambda b: ft.reverse_optimum(reference, b),
              "forward-KL optimum on Y": ft.divergence_optimum(reference, "forward_kl"),
              "α = 0.5 optimum on Y": ft.divergence_optimum(reference, "alpha", 0.5),
              "IPO optimum on Y": ft.ipo_optimum(reference),
              "reward model's optimum on Y": ft.reward_model_optimum(reference, scores)}
    out = {name: ft.curve(optimum, CURVE_BETAS, reference) for name, optimum in optima.items()}
    out["reference"] = {**ft.point(reference, reference), **ft.distinct_n(reference, SAMPLES)}
    return out | past_the_end_curve()


def past_the_end_curve() -> dict:
    """Past the frontier's end: all the reward, and the most entropy at each KL (pi_ref^t on the best answers)."""
    import frontier_toy as ft
    import toy

    reference = toy.reference_logprobs()
    return {"past the end": [{"t": float(t), **ft.point(ft.best_answers_policy(reference, t), reference)}
                             for t in np.linspace(1, 0, 21)]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    styles = {"frontier (π_ref exp(r/β)/Z)": dict(color="k", lw=2.2, zorder=3),
              "forward-KL optimum on Y": dict(color="C0", ls=":"), "α = 0.5 optimum on Y": dict(color="C2", ls="-."),
              "IPO optimum on Y": dict(color="C4", ls=(0, (5, 2, 1, 2))),
              "reward model's optimum on Y": dict(color="C1", ls="--")}
    for name, points in results["curves"].items():
        if name in ("reference", "past the end"):
            continue
        xs = [p["kl"] for p in points]
        axes[0].plot(xs, [p["reward"] for p in points], label=name, **styles[name])
        axes[1].plot(xs, [p["entropy"] for p in points], label=name, **styles[name])
    # past the frontier's end: F = max r, and the most entropy a policy with all the reward has at each KL
    end = results["curves"]["past the end"]
    right = 1.1 * max([p["kl"] for p in results["points"]] + [end[-1]["kl"]])
    frontier = styles["frontier (π_ref exp(r/β)/Z)"]
    axes[0].plot([end[0]["kl"], right], [end[0]["reward"]] * 2, **frontier)
    axes[1].plot([p["kl"] for p in end] + [right], [p["entropy"] for p in end] + [end[-1]["entropy"]], **frontier)
    ref = results["curves"]["reference"]
    for ax, key in ((axes[0], "reward"), (axes[1], "entropy")):
        ax.scatter([ref["kl"]], [ref[key]], marker="*", s=120, color="gray", zorder=4, label="π_ref")
        for i, p in enumerate(results["points"]):
            ax.scatter([p["kl"]], [p[key]], color=plt.cm.tab20(i % 20), marker="os^Dv<>ph"[i % 9], zorder=5,
                       edgecolors="k", linewidths=0.4, label=p["name"])
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("KL(π ‖ π_ref), nats (mean over prompts)")
    axes[0].set_ylabel("true E[r]")
    axes[1].set_ylabel("entropy of π, nats")
    axes[0].set_title("reward against KL: no policy lies above the black frontier", fontsize=10)
    axes[1].set_title("entropy against KL: what each method costs in diversity", fontsize=10)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot_only", action="store_true")
    parser.add_argument("--remeasure", action="store_true", help="measure the cached policies again, no training")
    parser.add_argument("--runs", nargs="*", default=[], help="RUNS names containing any of these (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "frontier.json"))
    parser.add_argument("--png", default=str(REPO / "docs" / "frontier.png"))
    cli = parser.parse_args()
    path = Path(cli.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    if cli.remeasure and "points" not in results:
        parser.error("--remeasure needs benchmarks/frontier.json from a full run")
    if cli.remeasure:
        os.environ.setdefault("TOY_REFERENCE_LOGPROBS", str(CACHE / "reference.npz"))
        for p in results["points"]:
            with np.load(policy_file(p["name"])) as saved:
                p.update(measure(p["name"], {k: saved[k] for k in saved.files}))
        results["curves"].update(past_the_end_curve())
        path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    elif not cli.plot_only:
        shared = tempfile.mkdtemp()
        CACHE.mkdir(parents=True, exist_ok=True)  # the workers enumerate the reference once, into it (tests/toy.py)
        os.environ.setdefault("TOY_REFERENCE_LOGPROBS", str(CACHE / "reference.npz"))
        names = [n for n in RUNS if not cli.runs or any(r in n for r in cli.runs)]
        rm = os.path.join(shared, "reward_model")
        with ProcessPoolExecutor(2) as pool:
            trained = pool.submit(train_reward_model, rm)  # the runs that need no reward model start beside it
            jobs = [pool.submit(run, (n, rm)) for n in names if not RUNS[n][3]]
            trained.result()
            jobs += [pool.submit(run, (n, rm)) for n in names if RUNS[n][3]]
            done = {p["name"]: p for p in results.get("points", [])}
            done.update({p["name"]: p for p in (job.result() for job in jobs)})
        results["curves"] = curves(rm)
        results["points"] = [done[n] for n in RUNS if n in done]
        path.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    ref = results["curves"]["reference"]
    print(f"{'run':40s} {'KL':>7s} {'E[r]':>6s} {'F(KL)':>6s} {'share':>6s} {'entropy':>7s} {'out of Y':>8s} "
          f"{'dist-1':>6s} {'dist-2':>6s} {'answers':>7s}")
    print(f"{'π_ref':40s} {0:7.3f} {ref['reward']:6.3f} {ref['reward']:6.3f} {'':>6s} {ref['entropy']:7.2f} "
          f"{ref['mass_outside_y']:8.3f} {ref['distinct_1']:6.3f} {ref['distinct_2']:6.3f} "
          f"{ref['distinct_answers']:7.3f}")
    for p in results["points"]:
        share = (p["reward"] - ref["reward"]) / (p["frontier"] - ref["reward"])
        print(f"{p['name']:40s} {p['kl']:7.3f} {p['reward']:6.3f} {p['frontier']:6.3f} {share:6.1%} "
              f"{p['entropy']:7.2f} {p['mass_outside_y']:8.3f} {p['distinct_1']:6.3f} {p['distinct_2']:6.3f} "
              f"{p['distinct_answers']:7.3f}")
    plot(results, Path(cli.png))


if __name__ == "__main__":
    main()
