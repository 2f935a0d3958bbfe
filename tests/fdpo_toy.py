"""f-DPO's analytic optima on the toy world, exactly over Y, shared by the trend test, the end-to-end test and
benchmarks/fdpo_sweep.py.

The toy pairs live in Y and are drawn from mu = pi_ref(.|Y), so f-DPO's loss fixes beta f'(u(y)) = r(y) - lambda on Y
only; the optimum is taken over Y with the reference conditioned on Y:

    pi*(y) = pi_ref(y|Y) g((r(y) - lambda)/beta),   g = (f')^{-1},   lambda such that sum_Y pi* = 1.

(For the reverse KL the mass a policy puts outside Y does not change pi(.|Y)'s target; for the other divergences it
would shift lambda, which is why the target is defined on Y, and the mass outside Y is reported beside it.)
"""

import functools

import numpy as np

import toy

world = toy.world


@functools.lru_cache(maxsize=None)
def reward_on_answers(prompt: str) -> np.ndarray:
    return world.reward_vector(prompt)[:-1]


def g(v: np.ndarray, divergence: str, alpha: float | None) -> np.ndarray:
    """(f')^{-1}(v) for the table in fdpo.py's docstring."""
    if divergence == "reverse_kl":
        return np.exp(v - 1)
    if divergence == "forward_kl":
        return -1 / v
    if divergence == "js":
        return np.exp(v) / (2 - np.exp(v))
    return (1 - alpha * v) ** (-1 / alpha)


def v_max(divergence: str, alpha: float | None) -> float:
    """The supremum of f' (g blows up there)."""
    return {"reverse_kl": np.inf, "forward_kl": 0.0, "js": np.log(2)}.get(divergence, 1 / alpha if alpha else np.inf)


def optimum_on_answers(ref_logp_y: np.ndarray, r: np.ndarray, beta: float, divergence: str,
                       alpha: float | None = None) -> np.ndarray:
    """log pi* over Y for one prompt; ref_logp_y is log pi_ref(.|Y). lambda by 100 bisection steps (to 2^-100 of the
    bracket)."""
    if divergence == "reverse_kl":
        a = ref_logp_y + r / beta
        return a - np.logaddexp.reduce(a)
    q = np.exp(ref_logp_y)
    # r takes a few dozen values: sum over them, not over 41,371 answers
    levels, which = np.unique(r, return_inverse=True)
    mass = np.bincount(which, weights=q)
    total = lambda lam: float(mass @ g((levels - lam) / beta, divergence, alpha))  # noqa: E731  decreasing in lam
    lo = r.max() - beta * v_max(divergence, alpha)  # total -> inf as lam -> lo from above
    hi = lo + 1.0
    while total(hi) > 1:
        hi += 2 * (hi - lo)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > 1 else (lo, mid)
    pi = q * g((r - hi) / beta, divergence, alpha)
    return np.log(pi / pi.sum())


def optima(reference: dict, beta: float, divergence: str, alpha: float | None = None) -> dict[str, np.ndarray]:
    return {p: optimum_on_answers(toy.on_answers(reference[p]), reward_on_answers(p), beta, divergence, alpha)
            for p in world.PROMPTS}


def entropy_and_reward(logp_y: dict[str, np.ndarray]) -> tuple[float, float]:
    """Mean over prompts of the entropy and E[r] of distributions over Y."""
    h, er = [], []
    for p, logp in logp_y.items():
        pi = np.exp(logp)
        h.append(float(-(pi * logp).sum()))
        er.append(float(pi @ reward_on_answers(p)))
    return float(np.mean(h)), float(np.mean(er))
