"""GRPO's variants: where each one's fixed point lies, exactly, on tabular problems; and what each reaches on the toy
world in 300 rollouts, measured exactly by enumeration.

    python benchmarks/grpo_variants.py                 # both parts: about 6 min on 2 cores
    python benchmarks/grpo_variants.py --only bandit   # the fixed points alone: about 2 min
    python benchmarks/grpo_variants.py --only toy --runs "beta 0"   # some toy runs, merged into the json

The bandit part uses grpo.py's own update functions through tests/test_grpo_bandit.py (Problem, fixed_point): the
expected update of one on-policy pass, over every multiset of G = 4 responses, followed with Adam to where it stops
(600 steps; 3000 at beta 0.1, where pi* is peaked and the approach slow).
Problems: responses of 0 to 2 words over 2 symbols, then an EOS (7 responses, 1 to 3 tokens), r ~ U[0, 1], random
reference logits; seeds 0-4, beta 0.1, 0.5 and 2. For each variant and each (seed, beta): KL(pi || pi*) at its fixed
point, against the reference's KL(pi_ref || pi*); E[r] and the mean length (tokens) against pi*'s; and the update's
norm where it stopped (0 up to rounding at a fixed point; the group-std variants with the KL in the reward stop only
as the learning rate decays, see test_grpo_bandit.py).

The toy-world part trains grpo.py (seed 1, beta 0.5, 300 rollouts of 8 prompts x 8 responses, the true reward as the
reward function) as each variant, and reports KL(pi || pi*) over Y + BOTTOM and its fraction of the reference's, E[r],
the entropy, the mean answer length in words (overall, and over the answers with r < 2, worse than a neutral answer:
off topic, or unkind without the topic; the toy world's "incorrect" ones), and the mass outside Y. Two runs at beta =
0 compare grpo's per-response means with dr_grpo's constant normaliser, with no KL and no std scaling: Dr. GRPO's
length-bias claim.

Everything is printed and written to benchmarks/grpo_variants.json; docs/grpo.md reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SEEDS, BETAS = (0, 1, 2, 3, 4), (0.1, 0.5, 2.0)
# name -> (kl_in, loss_type, scale_rewards, filter_groups): the variants, with the same beta for all
VARIANTS = {
    "k1 in the reward, grpo, group std": ("reward", "grpo", "group", False),
    "k1 in the reward, dr_grpo, no std": ("reward", "dr_grpo", "none", False),
    "k1 in the reward, dapo, group std, filter": ("reward", "dapo", "group", True),
    "GRPO (k3 in the loss, grpo, group std)": ("loss", "grpo", "group", False),
    "k3 in the loss, grpo, no std": ("loss", "grpo", "none", False),
    "Dr. GRPO with beta > 0 (k3, dr_grpo, no std)": ("loss", "dr_grpo", "none", False),
    "DAPO with beta > 0 (k3, dapo, group std, filter)": ("loss", "dapo", "group", True),
    "k3 in the loss, dapo, group std, no filter": ("loss", "dapo", "group", False),
    "k3 in the loss, dr_grpo, group std": ("loss", "dr_grpo", "group", False),
}
TOY_RUNS = {  # name -> grpo.py flags (beyond --beta 0.5 --num_rollouts 300)
    "k1 in the reward, no std (pi* is its fixed point)": dict(kl_in="reward", scale_rewards="none"),
    "GRPO (k3 in the loss, group std, grpo)": dict(),
    "k3 in the loss, no std, grpo": dict(scale_rewards="none"),
    "Dr. GRPO with beta > 0 (k3, no std, dr_grpo)": dict(loss_type="dr_grpo", scale_rewards="none"),
    "DAPO with beta > 0 (k3, group std, dapo, clip-higher, filter)": dict(loss_type="dapo", epsilon_high=0.28,
                                                                         filter_groups=True),
    "beta 0, no std, grpo (per-response means)": dict(beta=0.0, scale_rewards="none"),
    "beta 0, no std, dr_grpo (Dr. GRPO)": dict(beta=0.0, loss_type="dr_grpo", scale_rewards="none"),
}
TOY_BETA, TOY_ROLLOUTS = 0.5, 300


def bandit_point(job: tuple[str, int, float]) -> dict:
    import torch

    from test_grpo_bandit import Problem, fixed_point

    torch.set_num_threads(1)
    name, seed, beta = job
    kl_in, loss_type, scale_rewards, filter_groups = VARIANTS[name]
    problem = Problem(2, 2, seed)
    logp, grad_norm = fixed_point(problem, steps=3000 if beta < 0.5 else 600, loss_type=loss_type,
                                  scale_rewards=scale_rewards, kl_in=kl_in, filter_groups=filter_groups, beta=beta)
    target, ref = problem.optimum(beta), problem.logp(problem.ref_logits)
    lengths = problem.mask.sum(-1).double()

    def kl(p, q):
        return float((p.exp() * (p - q)).sum())

    return {"variant": name, "seed": seed, "beta": beta, "kl_to_optimum": kl(logp, target),
            "reference_kl_to_optimum": kl(ref, target), "reward": float(logp.exp() @ problem.r),
            "optimum_reward": float(target.exp() @ problem.r), "length": float(logp.exp() @ lengths),
            "optimum_length": float(target.exp() @ lengths), "update_norm": grad_norm}


def conditional_length(logp: np.ndarray, where: np.ndarray) -> float:
    """Mean length in words of the answers in Y where `where` (over Y + BOTTOM) holds, under pi conditioned on them."""
    import toy

    lengths = np.array([len(y) for y in toy.world.RESPONSES], dtype=float)
    weights = np.exp(logp[:-1]) * where[:-1]
    return float(weights @ lengths / weights.sum())


def toy_run(name: str) -> dict:
    import torch

    import grpo
    import toy

    torch.set_num_threads(1)
    world = toy.world
    with tempfile.TemporaryDirectory() as out:
        args = grpo.Args(**{"beta": TOY_BETA, "num_rollouts": TOY_ROLLOUTS, "output_dir": out, "logging_steps": 10_000,
                            "eval_steps": 0, "device": "cpu", "seed": 1, **TOY_RUNS[name]})
        grpo.train(args)
        policy = toy.exact_logprobs(out)
    reference = toy.reference_logprobs()
    optimum = {p: world.optimum_logprobs(reference[p], world.reward_vector(p), TOY_BETA) for p in world.PROMPTS}
    lengths = np.array([len(y) for y in world.RESPONSES], dtype=float)

    def mean_over_prompts(fn) -> float:
        return float(np.mean([fn(p) for p in world.PROMPTS]))

    return {"run": name, "flags": TOY_RUNS[name],
            "kl_to_optimum": toy.kl_to_optimum(policy, reference, TOY_BETA),
            "reference_kl_to_optimum": toy.kl_to_optimum(reference, reference, TOY_BETA),
            "reward": toy.expected_reward(policy), "optimum_reward": toy.expected_reward(optimum),
            "reference_reward": toy.expected_reward(reference),
            "entropy": mean_over_prompts(lambda p: world.summarize(policy[p], world.reward_vector(p))["entropy"]),
            "optimum_entropy": mean_over_prompts(
                lambda p: world.summarize(optimum[p], world.reward_vector(p))["entropy"]),
            "length": mean_over_prompts(lambda p: np.exp(toy.on_answers(policy[p])) @ lengths),
            "length_below_2": mean_over_prompts(lambda p: conditional_length(policy[p], world.reward_vector(p) < 2)),
            "mass_below_2": mean_over_prompts(lambda p: np.exp(policy[p][:-1]) @ (world.reward_vector(p)[:-1] < 2)),
            "reference_length_below_2": mean_over_prompts(
                lambda p: conditional_length(reference[p], world.reward_vector(p) < 2)),
            "optimum_length": mean_over_prompts(lambda p: np.exp(toy.on_answers(optimum[p])) @ lengths),
            "mass_outside_y": toy.bottom_mass(policy)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["bandit", "toy"], default=None)
    parser.add_argument("--runs", nargs="*", default=[], help="toy runs whose names contain any of these (default all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "grpo_variants.json"))
    only, runs = parser.parse_args().only, parser.parse_args().runs
    path = Path(parser.parse_args().out)
    results = json.loads(path.read_text()) if path.exists() else {}
    shared = tempfile.mkdtemp()  # the workers enumerate the reference once, into this file (tests/toy.py)
    os.environ.setdefault("TOY_REFERENCE_LOGPROBS", os.path.join(shared, "reference.npz"))
    with ProcessPoolExecutor(2) as pool:
        if only in (None, "bandit"):
            jobs = [(name, seed, beta) for name in VARIANTS for beta in BETAS for seed in SEEDS]
            points = list(pool.map(bandit_point, jobs))
            results["bandit"] = points
            print(f"{'variant':50s} {'beta':>5s} {'KL(pi||pi*)':>12s} {'pi_ref':>8s} {'E[r]':>7s} {'pi*':>7s} "
                  f"{'length':>6s} {'pi*':>6s}  (means over seeds {SEEDS[0]}-{SEEDS[-1]})")
            for name in VARIANTS:
                for beta in BETAS:
                    rows = [p for p in points if p["variant"] == name and p["beta"] == beta]
                    mean = {k: np.mean([p[k] for p in rows]) for k in rows[0] if k not in ("variant", "seed", "beta")}
                    print(f"{name:50s} {beta:5.1f} {mean['kl_to_optimum']:12.2e} "
                          f"{mean['reference_kl_to_optimum']:8.4f} {mean['reward']:7.4f} {mean['optimum_reward']:7.4f} "
                          f"{mean['length']:6.3f} "
                          f"{mean['optimum_length']:6.3f}  max update norm {max(p['update_norm'] for p in rows):.0e}")
                    ratios = sorted(p["kl_to_optimum"] / p["reference_kl_to_optimum"] for p in rows)
                    print(f"{'':50s}   per seed, KL(pi||pi*) / KL(pi_ref||pi*): "
                          + ", ".join(f"{r:.3g}" for r in ratios)
                          + f"; max KL(pi||pi*) {max(p['kl_to_optimum'] for p in rows):.2e}")
        if only in (None, "toy"):
            names = [n for n in TOY_RUNS if not runs or any(r in n for r in runs)]
            done = {row["run"]: row for row in results.get("toy", [])}
            done.update({row["run"]: row for row in pool.map(toy_run, names)})
            results["toy"] = [done[n] for n in TOY_RUNS if n in done]
            for row in results["toy"]:
                print(f"{row['run']:62s} KL(pi||pi*) {row['kl_to_optimum']:.3f} "
                      f"({row['kl_to_optimum'] / row['reference_kl_to_optimum']:.1%}) E[r] {row['reward']:.3f} "
                      f"(pi* {row['optimum_reward']:.3f}) entropy {row['entropy']:.2f} "
                      f"(pi* {row['optimum_entropy']:.2f}) length {row['length']:.2f} "
                      f"(pi* {row['optimum_length']:.2f}; r < 2: {row['length_below_2']:.2f}, pi_ref "
                      f"{row['reference_length_below_2']:.2f}, mass {row.get('mass_below_2', float('nan')):.4f}) "
                      f"outside Y {row['mass_outside_y']:.3f}")
    path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
