"""dpo.py end to end on the toy world: through its real data, tokenization and log-prob code, measured exactly.

What DPO can pin down. The data's answers all lie in Y (at most four words, then <|end|>), so the DPO loss sees
pi only through ratios pi(y)/pi(y') of answers in Y: its population minimisers are exactly the policies with
pi(.|Y) = pi*(.|Y), whatever mass they put outside Y (BOTTOM). So the target is KL(pi(.|Y) || pi*(.|Y)); the
KL over the full space, which also charges the mass that leaves Y, and that mass itself are reported beside it.
The distance from pi to that set of minimisers, min KL(pi || pi') over them, is (1 - m) KL(pi(.|Y) || pi*(.|Y)) with m
the mass pi puts outside Y: the conditional KL is what DPO's loss can see and be held to.
"""

import subprocess
import sys

import numpy as np
import pytest

import dpo
import toy
from conftest import MEASURED

# trains for epochs of the toy pairs and enumerates the toy world (toy.exact_logprobs); one test starts `python dpo.py`
pytestmark = pytest.mark.slow

ROOT = toy.ROOT


@pytest.fixture(scope="module")
def reference():
    return toy.reference_logprobs()


def measure(name: str, policy: dict, reference: dict, beta: float) -> dict:
    figures = {
        "kl_y_ref": toy.kl_to_optimum_on_answers(reference, reference, beta),
        "kl_y": toy.kl_to_optimum_on_answers(policy, reference, beta),
        "kl_full_ref": toy.kl_to_optimum(reference, reference, beta),
        "kl_full": toy.kl_to_optimum(policy, reference, beta),
        "reward_ref": toy.expected_reward(reference),
        "reward": toy.expected_reward(policy),
        "reward_opt": toy.expected_reward({p: toy.world.optimum_logprobs(reference[p], toy.world.reward_vector(p), beta)
                                           for p in reference}),
        "bottom": toy.bottom_mass(policy),
        "kl_from_ref": float(np.mean([toy.world.kl(policy[p], reference[p]) for p in reference])),
    }
    MEASURED.append(
        f"{name} (beta={beta}): KL(pi|Y || pi*|Y) {figures['kl_y_ref']:.3f} -> {figures['kl_y']:.3f} "
        f"({figures['kl_y'] / figures['kl_y_ref']:.1%} of the reference's); "
        f"full-space KL {figures['kl_full_ref']:.3f} -> {figures['kl_full']:.3f}; "
        f"E[r] {figures['reward_ref']:.3f} -> {figures['reward']:.3f} (optimum {figures['reward_opt']:.3f}); "
        f"mass outside Y {figures['bottom']:.3f}; KL(pi || pi_ref) {figures['kl_from_ref']:.3f}")
    return figures


def test_dpo_reaches_the_analytic_optimum_on_the_toy_world(tmp_path, reference):
    """Target: KL to the optimum falls to at most 20% of the reference's.

    beta = 1 puts the optimum E[r] well above the reference's while 16k Bradley-Terry pairs still pin r/beta down;
    at beta = 0.1 (the default run below) the optimum is nearly deterministic and the fit is noise-limited.
    Measured: 17.1% on Y after 3 epochs (15.8% after 5). With 8k pairs it stalled at 21-22% whatever the epochs,
    learning rate or batch: the labels' noise, not the optimiser, set the floor.
    """
    beta = 1.0
    dpo.train(dpo.Args(beta=beta, learning_rate=3e-4, num_train_epochs=3, eval_steps=0, logging_steps=10_000,
                       precompute_ref_logps=True, output_dir=str(tmp_path / "dpo"), device="cpu"))
    f = measure("dpo.py, 3 epochs", toy.exact_logprobs(tmp_path / "dpo"), reference, beta)
    assert f["kl_y"] <= 0.2 * f["kl_y_ref"]
    assert f["reward"] > f["reward_ref"]


def test_lora_dpo_moves_toward_the_analytic_optimum(tmp_path, reference):
    """The same target as above with a rank-8 LoRA adapter (--lora_r 8) whose reference is the base with the adapter
    off, for 128 steps at lr 3e-3 (a quarter of an epoch: LoRA's cost here is the suite's, not the method's).

    Measured over seeds 1, 2, 3: 34.4%, 33.4%, 35.0% of the reference's KL on Y (E[r] 2.29-2.33 against 1.85). The
    bound is the worst seed plus the seeds' range, rounded up to a whole point: 37%. Full fine-tuning reaches 17.1%
    in 3 epochs; 256 LoRA steps reached 28.0-32.2%, and one epoch 22.4% (lr 3e-3) and 23.6% (lr 1e-3).
    """
    beta = 1.0
    dpo.train(dpo.Args(beta=beta, learning_rate=3e-3, max_steps=128, eval_steps=0, logging_steps=10_000, lora_r=8,
                       output_dir=str(tmp_path / "lora"), device="cpu"))
    f = measure("dpo.py --lora_r 8, 128 steps", toy.exact_logprobs(tmp_path / "lora"), reference, beta)
    assert f["kl_y"] <= 0.37 * f["kl_y_ref"]
    assert f["reward"] > f["reward_ref"]


def test_default_command_runs_and_moves_toward_the_optimum(tmp_path, reference):
    """`python dpo.py` with its defaults (beta = 0.1), capped at 100 steps, completes, saves a loadable model and gets
    closer to pi*. The full default run (1,024 steps) is measured by benchmarks/toy_defaults.py, not here: at about
    70 s it would cost the suite more than it checks beyond this."""
    out = tmp_path / "default"
    run = subprocess.run([sys.executable, "dpo.py", "--max_steps", "100", "--output_dir", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train: 16384 pairs kept of 16384" in run.stdout
    f = measure("python dpo.py --max_steps 100 (defaults otherwise)", toy.exact_logprobs(out), reference,
                dpo.Args().beta)
    assert f["kl_y"] < 0.7 * f["kl_y_ref"]  # measured: 51% of the reference's after 100 steps
