"""kto.py end to end on the toy world: through its real data, tokenization and log-prob code, measured exactly.

The unpaired/ rows are answers from the reference, each labelled desirable with probability s = sigmoid(r - 2). KTO has
no closed-form optimum. For a fixed z0 its population minimiser (tests/test_kto_optimum.py) drops every answer with
s <= 1/2, that is r <= 2 (68% of the reference's mass), and orders the rest by reward; at the fixed point z0 = 0.
Here, with the data's answers drawn from pi_ref(.|Y), that minimiser (kto_minimiser) is computed exactly over Y by
the same bisection. The checks: E[r] rises, KL(pi|Y || pi*|Y) falls (pi* = pi_ref exp(r/beta) / Z, as the issue asks),
and the mass on the answers KTO's minimiser drops falls. KL(pi_KTO || pi|Y) to KTO's own minimiser is reported.
"""

import numpy as np
import pytest
import torch

import kto
import toy
from conftest import MEASURED
from test_kto_optimum import tabular_optimum

pytestmark = pytest.mark.slow  # trains 400 steps and enumerates the toy world
world = toy.world
BETA = 1.0


@pytest.fixture(scope="module")
def reference():
    return toy.reference_logprobs()


def kto_minimiser(reference: dict, beta: float) -> dict:
    """KTO's population minimiser over Y for unpaired/'s data (equal weights, z0 = 0), per prompt: log-probs over Y."""
    out = {}
    for x in world.PROMPTS:
        ref = torch.from_numpy(toy.on_answers(reference[x]))[None]
        p_good = torch.sigmoid(torch.from_numpy(world.reward_vector(x)[:-1]) - 2)[None]
        out[x] = tabular_optimum(ref, p_good - (1 - p_good), beta)[0].numpy()
    return out


def dropped_mass(policy: dict) -> float:
    return float(np.mean([np.exp(policy[x][:-1])[world.reward_vector(x)[:-1] <= 2].sum() for x in world.PROMPTS]))


def kl_from_minimiser(minimiser: dict, policy: dict) -> float:
    """KL(pi_KTO || pi|Y): finite, since pi has full support (0 log 0 = 0 where the minimiser drops an answer)."""
    with np.errstate(invalid="ignore"):
        return float(np.mean([world.kl(minimiser[x], toy.on_answers(policy[x])) for x in world.PROMPTS]))


def test_kto_moves_toward_pi_star_and_its_own_minimiser(tmp_path, reference):
    """beta = 1, lr 3e-5, 400 steps (0.78 epoch) of 32 rows.

    Measured over seeds 1, 2, 3: KL(pi|Y || pi*|Y) 61.3%, 58.6%, 60.1% of the reference's; E[r] 2.449, 2.444, 2.436
    (1.849 for the reference); mass on r <= 2 answers 0.342, 0.360, 0.371 (0.680); KL(pi_KTO || pi|Y) 0.696, 0.711,
    0.724 (1.174), where KTO's minimiser has E[r] 3.112. Bounds: the worst seed plus the seeds' range, 64%, 0.40 and
    0.76. At lr 1e-4 seeds 1 and 3 got closer (48.6%, 51.5%), but seed 2 went the other way
    (238.6%: the log-ratios of both labels pushed down together, z0 clamped at 0 throughout), so this trains at 3e-5.
    """
    kto.train(kto.Args(beta=BETA, learning_rate=3e-5, max_steps=400, eval_steps=0, logging_steps=10_000,
                       output_dir=str(tmp_path / "kto"), device="cpu"))
    policy = toy.exact_logprobs(tmp_path / "kto")
    minimiser = kto_minimiser(reference, BETA)
    figures = {
        "kl_y_ref": toy.kl_to_optimum_on_answers(reference, reference, BETA),
        "kl_y": toy.kl_to_optimum_on_answers(policy, reference, BETA),
        "reward_ref": toy.expected_reward(reference), "reward": toy.expected_reward(policy),
        "dropped_ref": dropped_mass(reference), "dropped": dropped_mass(policy),
        "kto_kl_ref": kl_from_minimiser(minimiser, reference), "kto_kl": kl_from_minimiser(minimiser, policy),
        "kto_reward": float(np.mean([np.exp(minimiser[x]) @ world.reward_vector(x)[:-1] for x in world.PROMPTS])),
        "kl_from_ref": float(np.mean([world.kl(policy[x], reference[x]) for x in world.PROMPTS])),
        "bottom": toy.bottom_mass(policy),
    }
    MEASURED.append(
        f"kto.py, beta=1, 400 steps: KL(pi|Y || pi*|Y) {figures['kl_y_ref']:.3f} -> {figures['kl_y']:.3f} "
        f"({figures['kl_y'] / figures['kl_y_ref']:.1%} of the reference's); E[r] {figures['reward_ref']:.3f} -> "
        f"{figures['reward']:.3f} (KTO's minimiser {figures['kto_reward']:.3f}); mass on r <= 2 "
        f"{figures['dropped_ref']:.3f} -> {figures['dropped']:.3f}; KL(pi_KTO || pi|Y) "
        f"{figures['kto_kl_ref']:.3f} -> {figures['kto_kl']:.3f}; KL(pi || pi_ref) {figures['kl_from_ref']:.3f}; "
        f"mass outside Y {figures['bottom']:.3f}")
    assert figures["reward"] > figures["reward_ref"]
    assert figures["kl_y"] <= 0.64 * figures["kl_y_ref"]
    assert figures["dropped"] <= 0.40
    assert figures["kto_kl"] <= 0.76
