"""SACPO on the toy world, every policy measured exactly by enumeration: choosing lambda for a threshold b (the
user's outer loop), the two orders, and P-SACPO's weight merge against training again.

    python benchmarks/sacpo_lambda.py      # 8 stage trainings, 11 enumerations, two at a time: about 5 min on 2 cores

The problem: maximise E[r] - beta KL(pi || pi_ref) subject to E[g] >= b at beta = 1, with g the toy safety score (2
minus the exaggerating words very/great/awful, floored at 0). For a lambda its SACPO target is
pi*_lambda = pi_ref exp((r + lambda g) / beta) / Z, whose E[g] rises with lambda; lambda* for b is where E[g] = b.

Runs, each stage one epoch (512 steps of 32 pairs, lr 3e-4, reference log-probs precomputed, seed 1):
- sacpo.py at lambda = 1, reward first: stage 1 (DPO on the reward pairs at beta 1) and stage 2 (beta / lambda = 1);
- stage 2 again from that stage 1 at lambda = 0.25, 0.5, 0.75 and 2 (stage 1 copied into a new output_dir, then
  sacpo.py --resume_from latest, which skips a finished stage);
- sacpo.py at lambda = 0.75, safety first: its own two stages (the safety stage at beta / lambda = 1.33 first);
- P-SACPO: the lambda = 1 run merged (--resume_from latest --merge) at q = 0.25, 0.5, 0.75, each compared with the
  exact optimum at q lambda = q and with stage 2 trained at lambda = q.
For every policy, on Y (the policy conditioned on it): E[r], E[g], KL(pi || pi_ref), KL(pi || its target) and that
KL as a fraction of the reference's; and the mass outside Y. Printed, and written to benchmarks/sacpo_lambda.json
with the exact E[g] of pi*_lambda over a grid of lambda and lambda* for b = 1.6, 1.7 and 1.8. docs/sacpo.md reads
the results.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

BETA, LAMBDA_BAR, QS = 1.0, 1.0, (0.25, 0.5, 0.75)
STAGE_2_LAMBDAS = (0.25, 0.5, 0.75, 2.0)
BOUNDS = (1.6, 1.7, 1.8)
TRAINING = dict(beta=BETA, learning_rate=3e-4, num_train_epochs=1, precompute_ref_logps=True, eval_steps=0,
                logging_steps=10_000, device="cpu", seed=1)


def measure(path: Path, lambda_: float, reward_weight: float = 1.0) -> dict:
    """Exact figures of the policy saved at `path` against its target pi_ref exp((a r + lambda g) / beta) / Z."""
    import toy
    from test_toy_world_safety import mean, over_answers

    world, reference = toy.world, toy.reference_logprobs()
    full = toy.exact_logprobs(path)
    policy = {x: toy.on_answers(full[x]) for x in world.PROMPTS}
    ref = {x: toy.on_answers(reference[x]) for x in world.PROMPTS}
    target = {x: world.optimum_logprobs(ref[x], reward_weight * over_answers("r", x) + lambda_ * over_answers("g", x),
                                        BETA) for x in world.PROMPTS}
    kl = lambda p, q: float(np.mean([world.kl(p[x], q[x]) for x in world.PROMPTS]))  # noqa: E731
    return {"reward": mean(policy, "r"), "safety": mean(policy, "g"), "kl_from_ref": kl(policy, ref),
            "kl_to_target": kl(policy, target), "kl_to_target_fraction": kl(policy, target) / kl(ref, target),
            "target_reward": mean(target, "r"), "target_safety": mean(target, "g"),
            "mass_outside_y": toy.bottom_mass(full)}


def train(out: str, **overrides) -> None:
    import torch

    import sacpo

    torch.set_num_threads(1)
    sacpo.train(sacpo.Args(**TRAINING, output_dir=out, **overrides))


def first_runs(work: Path, which: str) -> dict:
    """Both stages at lambda-bar, reward first; or both at 0.75, safety first."""
    if which == "reward_first":
        train(str(work / "lambda1"), lambda_=LAMBDA_BAR)
        return {"stage 1 (reward, beta 1)": measure(work / "lambda1" / "reward", 0.0),
                f"stage 2 at lambda {LAMBDA_BAR}": measure(work / "lambda1", LAMBDA_BAR)}
    train(str(work / "safety_first"), lambda_=0.75, order="safety_first")
    return {"safety first, stage 1 (safety, beta/lambda 1.33)": measure(work / "safety_first" / "safety", 0.75, 0.0),
            "safety first, stage 2 at lambda 0.75": measure(work / "safety_first", 0.75)}


def second_stage(work: Path, lambda_: float) -> dict:
    """Stage 2 at lambda_ from the lambda-bar run's stage 1."""
    out = work / f"lambda{lambda_}"
    shutil.copytree(work / "lambda1" / "reward", out / "reward", ignore=shutil.ignore_patterns("checkpoint-*"))
    train(str(out), lambda_=lambda_, resume_from="latest")
    return {f"stage 2 at lambda {lambda_}": measure(out, lambda_)}


def merged(work: Path, q: float) -> dict:
    return {f"P-SACPO q {q} (lambda-bar {LAMBDA_BAR})": measure(work / "lambda1" / f"merged-q{q}", q * LAMBDA_BAR)}


def exact_curve() -> dict:
    import toy
    from test_toy_world_safety import lambda_star, mean, optimum

    reference = toy.reference_logprobs()
    grid = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    return {"safety_of_optimum": {str(lam): mean(optimum(reference, lam), "g") for lam in grid},
            "reward_of_optimum": {str(lam): mean(optimum(reference, lam), "r") for lam in grid},
            "lambda_star": {str(b): lambda_star(reference, b) for b in BOUNDS}}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="sacpo_lambda_"))
    results = {}
    with ProcessPoolExecutor(max_workers=2) as pool:
        for part in pool.map(first_runs, [work] * 2, ["reward_first", "safety_first"]):
            results.update(part)
        train(str(work / "lambda1"), lambda_=LAMBDA_BAR, resume_from="latest", merge=QS)  # merges only
        jobs = [pool.submit(second_stage, work, lam) for lam in STAGE_2_LAMBDAS]
        jobs += [pool.submit(merged, work, q) for q in QS]
        for job in jobs:
            results.update(job.result())
    curve = exact_curve()
    for name, r in results.items():
        print(f"{name:44} E[r] {r['reward']:.3f} E[g] {r['safety']:.3f} KL(pi||pi_ref) {r['kl_from_ref']:.3f}  "
              f"KL to target {r['kl_to_target']:.4f} ({r['kl_to_target_fraction']:.1%} of pi_ref's; target E[r] "
              f"{r['target_reward']:.3f}, E[g] {r['target_safety']:.3f})  outside Y {r['mass_outside_y']:.3f}")
    print("exact lambda* for b:", ", ".join(f"{b}: {lam:.4f}" for b, lam in curve["lambda_star"].items()))
    out = {"training": TRAINING, "runs": results, **curve}
    (REPO / "benchmarks" / "sacpo_lambda.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
