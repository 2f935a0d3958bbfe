"""fdpo.py end to end on the toy world: through its real data, tokenization and log-prob code, measured exactly.

Each divergence is held to its own optimum on Y, pi*(y) = pi_ref(y|Y) (f')^{-1}((r(y) - lambda)/beta) with lambda
normalising over Y (tests/fdpo_toy.py): the loss sees only answers in Y, so, as for DPO, the target is the policy
conditioned on Y, with the mass that leaves Y reported beside it.

How far it gets. Issue 5's target, KL(pi|Y || pi*|Y) at most 20% of the reference's for the forward KL and alpha = 0.5,
is met by benchmarks/fdpo_target.py on 65,536 fresh pairs (1,536 steps of 256 pairs each, 8 times this test's compute;
figures in docs/fdpo.md), which the suite cannot afford. Here, on the toy world's 16k pairs at batch 32, the runs stop
short of it. Measured, lr 3e-4, 16k pairs unless said, KL(pi|Y || pi*|Y) as a share of the reference's:
- beta = 1: forward KL 65.8% (2 epochs), 62.8% (4 epochs, or 1 epoch of 64k fresh pairs: the same 2,048 steps),
  58.8% (2 epochs of 64k); alpha = 0.5: 39.5%, 36.3% (4 epochs). Not the data: four times the pairs for the same steps
  changes nothing. Not the model: fitting pi* directly by maximum likelihood on 65k of its samples, same steps, reaches
  18.2%. The loss: the optimum puts 47% of the mass on the top reward level at u = pi/pi_ref = 15.7, where
  d(beta f'(u))/d log u = beta u^(-alpha) (forward KL: beta/u) is 1/16 of its value at u = 1, so the loss is nearly
  flat along the last stretch; the trained policy stops at u ~ 2.7 there (implied reward gap 0.3 where it should be 1).
- beta = 2: forward 37.7% (3 epochs), 32.8% (8 epochs), 35.3% (6 epochs, batch 128, lr 1e-3); alpha = 0.5 23.1%
  (3 epochs).
- beta = 3 (below): forward 26.2% (25.8% after 5 epochs, 24.8% after 1 epoch of the benchmark's 65k fresh pairs),
  alpha = 0.5 21.0% (19.2% after 1 epoch of those pairs). The KL left is ~0.015 nats. The reverse KL (DPO) reaches
  18.9% at the same setting.
- beta = 5: forward 22.7%, alpha = 0.5 21.2%; beta = 8: forward 23.6% (3 epochs each). A larger beta brings the
  optimum closer to the reference (top-level u near 1, where the loss is not flat) but leaves less to fit.
- beta = 3, forward KL, 3 epochs, what does not help: lr 1e-3 (26.4%), batch 16 (26.3%), both answers drawn from an
  even mixture of pi_ref and pi* (26.2%; the optimum does not depend on where the pairs are drawn). What does: more
  passes at batch 256, lr 1e-3 (24 epochs of the 16k pairs, 20.8%), and more data (6 epochs of 65k fresh pairs, 17.5%;
  alpha = 0.5 at lr 3e-4, 13.0%). The trained implied rewards beta f'(u) are compressed at the top: for "how was the
  food ?", from r = 3 to r = 4 their mean rises by 0.42 where the optimum's rises by 1. Maximum likelihood on fresh
  samples of pi* itself, 1,536 steps, behaves alike: 29.6% from 49k samples (batch 32, lr 3e-4), 18.2% from 393k
  (batch 256, lr 1e-3).
So this test holds each run to a bound set from its run-to-run spread, and reports the figure. Over --seed 1, 2, 3
(the seed draws the batch order; the pairs and the start are fixed), KL(pi|Y || pi*|Y) as a share of the reference's
measured: forward KL 26.18%, 26.07%, 25.87%; alpha = 0.5 20.98%, 21.29%, 21.20%. Each bound is the worst seed plus the
seeds' range (0.31 points for both), rounded up to a whole point: 27% and 22% (for 3 seeds about mean + 3 sd).
"""

import numpy as np
import pytest

import fdpo
import fdpo_toy
import toy
from conftest import MEASURED

pytestmark = pytest.mark.slow  # trains for epochs of the toy pairs and enumerates the toy world

world = toy.world
BETA, EPOCHS = 3.0, 3


@pytest.mark.parametrize("divergence, alpha, bound", [("forward_kl", 0.5, 0.27), ("alpha", 0.5, 0.22)],
                         ids=["forward_kl", "alpha=0.5"])
def test_fdpo_moves_toward_its_own_optimum_on_the_toy_world(tmp_path, divergence, alpha, bound):
    """KL(pi|Y || pi*|Y) falls below `bound` of the reference's (measured, seed 1: forward KL 26.2%, alpha = 0.5 21.0%;
    the bounds come from the spread over seeds, above), and the mass outside Y stays under 5% (measured 0.5%)."""
    reference = toy.reference_logprobs()
    fdpo.train(fdpo.Args(divergence=divergence, alpha=alpha, beta=BETA, learning_rate=3e-4, num_train_epochs=EPOCHS,
                         precompute_ref_logps=True, eval_steps=0, logging_steps=10_000,
                         output_dir=str(tmp_path / "fdpo"), device="cpu"))
    policy = toy.exact_logprobs(tmp_path / "fdpo")
    optimum = fdpo_toy.optima(reference, BETA, divergence, alpha if divergence == "alpha" else None)
    kl = lambda logp: float(np.mean([world.kl(toy.on_answers(logp[p]), optimum[p]) for p in world.PROMPTS]))  # noqa: E731
    kl_ref, kl_trained = kl(reference), kl(policy)
    (h_ref, r_ref), (h, r) = (fdpo_toy.entropy_and_reward({p: toy.on_answers(d[p]) for p in world.PROMPTS})
                              for d in (reference, policy))
    h_opt, r_opt = fdpo_toy.entropy_and_reward(optimum)
    flag = f" --alpha {alpha}" if divergence == "alpha" else ""
    MEASURED.append(f"fdpo.py --divergence {divergence}{flag}, {EPOCHS} epochs (beta={BETA:g}): "
                    f"KL(pi|Y || pi*|Y) {kl_ref:.4f} -> {kl_trained:.4f} "
                    f"({kl_trained / kl_ref:.1%} of the reference's; "
                    "the 20% target is met with more data by benchmarks/fdpo_target.py); "
                    f"entropy on Y {h_ref:.3f} -> {h:.3f} (optimum {h_opt:.3f}); "
                    f"E[r] on Y {r_ref:.3f} -> {r:.3f} (optimum {r_opt:.3f}); "
                    f"mass outside Y {toy.bottom_mass(policy):.3f}")
    assert kl_trained <= bound * kl_ref
    assert abs(r - r_opt) < abs(r_ref - r_opt)
    assert toy.bottom_mass(policy) < 0.05
