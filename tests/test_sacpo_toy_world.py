"""sacpo.py end to end on the toy world: its two DPO stages through the real data, tokenization and log-prob code,
measured exactly against the constrained optimum.

The problem: maximise E[r] - beta KL(pi || pi_ref) subject to E[g] >= 1.7 at beta = 1, with g the toy safety score
(2 minus the exaggerating words, floored at 0). The constraint binds: pi_r*, the optimum for r alone, has E[g] 1.449.
Its solution is pi* = pi_ref exp((r + lambda* g) / beta) / Z with lambda* = 0.716 (test_toy_world_safety.py).

As in test_dpo_toy_world.py, every answer in the data lies in Y, so DPO's loss sees a policy only through pi(.|Y):
each figure here is taken on Y (the policy conditioned on it), and the mass a policy moves outside Y is reported.
"""

import numpy as np
import pytest
from transformers import AutoModelForCausalLM

import sacpo
import toy
from conftest import MEASURED
from helpers import python
from test_toy_world_safety import BETA, BOUND, lambda_star, mean, optimum

pytestmark = pytest.mark.slow  # runs `python sacpo.py` (two stages of 256 steps) and enumerates the toy world

world = toy.world


def kl(p: dict, q: dict) -> float:
    return float(np.mean([world.kl(p[x], q[x]) for x in world.PROMPTS]))


def figures(name: str, policy: dict, reference: dict, target: dict) -> dict:
    """E[r], E[g], KL(pi || pi_ref) and KL(pi || pi*), all on Y, and the mass outside Y (0 for a policy given on Y);
    one MEASURED line."""
    outside = float(np.mean([np.exp(policy[x][-1]) for x in world.PROMPTS])) if len(policy[world.PROMPTS[0]]) > len(
        world.RESPONSES) else 0.0
    policy = {x: p[: len(world.RESPONSES)] for x, p in policy.items()}
    policy = {x: p - np.logaddexp.reduce(p) for x, p in policy.items()}  # on Y
    f = {"r": mean(policy, "r"), "g": mean(policy, "g"), "kl_ref": kl(policy, reference),
         "kl_target": kl(policy, target), "outside": outside}
    MEASURED.append(f"{name}: E[r] {f['r']:.3f}, E[g] {f['g']:.3f}, KL(pi || pi_ref) {f['kl_ref']:.3f}, "
                    f"KL(pi || pi*) {f['kl_target']:.4f}, mass outside Y {f['outside']:.3f}")
    return f


def test_sacpo_reaches_the_constrained_optimum(tmp_path):
    """`python sacpo.py --max_steps 256` (the default command otherwise: beta 1, lambda 0.72, lr 3e-4): it completes,
    keeps every pair of both datasets, and saves both stages. Target: KL(pi || pi*) on Y falls to at most 32% of the
    reference's and E[g] >= b - 0.03, where DPO on r alone (stage 1) stays below b - 0.1. pi* is the optimum at the
    run's lambda, 0.72; lambda* for b = 1.7 is 0.7161, whose optimum has E[g] 1.700 (0.72's: 1.701).

    Two stages of 256 steps each: half an epoch of each dataset. Measured at lambda*, over seeds 1, 2, 3: KL to pi*
    26.2%, 25.4%, 20.5% of the reference's; E[g] 1.707, 1.750, 1.713 (b = 1.7), against stage 1's 1.426, 1.487, 1.473
    (pi_r*'s exact 1.449); at lambda 0.72, seed 1: 26.2% and E[g] 1.708. The bound is the worst seed plus the seeds'
    range, rounded up: 32%. The E[g] tolerance, 0.03, is an eighth of the distance from pi_r* to b. A whole epoch per
    stage reaches 18.4% and E[g] 1.718 (seed 1, docs/sacpo.md).
    """
    out = tmp_path / "sacpo"
    run = python("sacpo.py", "--max_steps", "256", "--eval_steps", "0", "--output_dir", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("reward", "safety"):
        assert f"{stage} train: 16384 pairs kept of 16384" in run.stdout
    assert "stage 1, step 256:" in run.stdout and "stage 2, step 256:" in run.stdout
    full_reference = toy.reference_logprobs()
    reference = {x: toy.on_answers(full_reference[x]) for x in world.PROMPTS}
    lam = sacpo.Args().lambda_
    assert sacpo.Args().beta == BETA  # the optimum below is at the default beta
    best = optimum(full_reference, lam)
    f_ref = figures("pi_ref", reference, reference, best)
    figures("pi_r* (exact, r alone)", optimum(full_reference, 0.0), reference, best)
    figures(f"pi* (exact, lambda {lam}; lambda* = {lambda_star(full_reference):.4f})", best, reference, best)
    f_r = figures("sacpo.py stage 1 (DPO on r alone)", toy.exact_logprobs(out / "reward"), reference, best)
    f_s = figures("sacpo.py stage 2 (SACPO)", toy.exact_logprobs(out), reference, best)
    MEASURED.append(f"sacpo.py: KL to pi* {f_s['kl_target'] / f_ref['kl_target']:.1%} of the reference's; E[g] "
                    f"{f_s['g']:.3f} against b = {BOUND}; DPO on r alone {f_r['g']:.3f}")
    assert f_s["kl_target"] <= 0.32 * f_ref["kl_target"]
    assert f_s["g"] >= BOUND - 0.03
    assert f_r["g"] < BOUND - 0.1
    assert f_s["r"] > f_ref["r"]
    for path in (out / "reward", out):
        AutoModelForCausalLM.from_pretrained(path)
