"""The two theorems benchmarks/amplification.py asserts on the toy world, on random tabular problems with its own
functions: J_beta(pi*) - J_beta(pi_hat) = beta KL(pi_hat || pi*), and beta KL(pi_hat || pi*) <= E_pi*[exp(eps / beta)
eps] with eps = r_hat - r centred under pi*. Also that the check it runs would catch a wrong identity or bound."""

import importlib.util
import sys

import numpy as np
import pytest

from helpers import ROOT

spec = importlib.util.spec_from_file_location("amplification", ROOT / "benchmarks" / "amplification.py")
amplification = sys.modules["amplification"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(amplification)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.05, 0.3, 1.0, 5.0])
def test_identity_and_bound_on_random_problems(seed, beta):
    """K = 50 answers, pi_ref = softmax(2 N(0, 1)), r ~ U[0, 4], r_hat = r + N(0, s) with s up to 2 and a shift
    (which moves no policy): the identity to float precision and the bound."""
    rng = np.random.default_rng(seed)
    logits = 2 * rng.normal(size=50)
    ref = logits - np.logaddexp.reduce(logits)
    r = rng.uniform(0, 4, size=50)
    r_hat = r + rng.normal(0, 0.5 * (seed + 1) / 2.5, size=50) + 7.0
    g = amplification.gaps(ref, r, r_hat, beta)
    amplification.check_theorems(g)
    # the identity, recomputed here with plain numpy: J(pi) = E_pi[r] - beta KL(pi || pi_ref)
    star, hat = ref + r / beta, ref + r_hat / beta
    star, hat = star - np.logaddexp.reduce(star), hat - np.logaddexp.reduce(hat)
    j = lambda lp: np.exp(lp) @ r - beta * np.exp(lp) @ (lp - ref)  # noqa: E731
    assert g["objective_gap"] == pytest.approx(j(star) - j(hat), rel=1e-9, abs=1e-12)
    assert g["beta_kl"] == pytest.approx(beta * np.exp(hat) @ (hat - star), rel=1e-9, abs=1e-12)


def test_the_check_catches_a_broken_identity_or_bound():
    good = {"objective_gap": 0.2, "beta_kl": 0.2, "bound": 0.3}
    amplification.check_theorems(good)
    for bad in ({**good, "objective_gap": 0.21}, {**good, "bound": 0.19}):
        with pytest.raises(AssertionError):
            amplification.check_theorems(bad)
