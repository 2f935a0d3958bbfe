"""SPIN's iteration on a tabular problem where p_data and the starting policy are known exactly.

One iteration's population loss, with real answers y ~ p_data and generations y' ~ pi_t, is
E[-log sigmoid(beta [log pi(y)/pi_t(y) - log pi(y')/pi_t(y')])]. In the policy's logits it is convex (the log-ratio
differences are linear in them), and its minimiser is pi_{t+1} ∝ pi_t (p_data/pi_t)^(1/beta) (Theorem 5.4 of
arXiv:2401.01335): the logistic loss is minimised where the log-ratio difference is the log-odds of "real" against
"generated", log p_data(y)/pi_t(y) - log p_data(y')/pi_t(y'). So in log space, up to a constant,

    e_{t+1} = (1 - 1/beta) e_t,   e_t = log pi_t - log p_data

and the exact iteration converges for beta > 1/2, but for beta < 1/2 (the paper's 0.1) it multiplies the error by
|1 - 1/beta| > 1 and flips its sign every iteration: it overshoots and does not settle. What the practical recipe does
instead, a few gradient steps per iteration from the previous iterate, is a damped step toward p_data.
"""

import numpy as np
import pytest
import torch

from spin import spin_loss

N = 6
RNG = np.random.default_rng(0)
P_DATA = RNG.dirichlet(np.ones(N))  # full support
PI_0 = RNG.dirichlet(np.ones(N))


def population_loss(theta: torch.Tensor, log_opponent: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """sum over (y, y') of p_data(y) pi_t(y') * spin_loss, every pair at once."""
    logp = torch.log_softmax(theta, 0)
    y, y_ = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    y, y_ = y.flatten(), y_.flatten()
    losses, _, _ = spin_loss(logp[y], logp[y_], log_opponent[y], log_opponent[y_], beta)
    return (log_p[y].exp() * log_opponent[y_].exp() * losses).sum()


def minimise(log_opponent: np.ndarray, beta: float) -> np.ndarray:
    """The minimiser of one iteration's population loss, by L-BFGS from the opponent (the loss is convex in the
    logits)."""
    lo, lp = torch.tensor(log_opponent), torch.tensor(np.log(P_DATA))
    theta = lo.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = population_loss(theta, lo, lp, beta)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(theta.detach(), 0).numpy()


def exact_step(log_pi: np.ndarray, beta: float) -> np.ndarray:
    """Theorem 5.4: log pi_{t+1} = log pi_t + (log p_data - log pi_t)/beta, normalised."""
    a = log_pi + (np.log(P_DATA) - log_pi) / beta
    return a - np.logaddexp.reduce(a)


def tv(log_pi: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.exp(log_pi) - P_DATA).sum())


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_one_iteration_minimiser_is_theorem_5_4(beta):
    got = minimise(np.log(PI_0), beta)
    assert 0.5 * np.abs(np.exp(got) - np.exp(exact_step(np.log(PI_0), beta))).sum() < 1e-3


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_p_data_is_a_fixed_point(beta):
    """With pi_t = p_data the real and generated answers are one distribution: the loss is minimised by changing
    nothing."""
    got = minimise(np.log(P_DATA), beta)
    assert tv(got) < 1e-6
    assert tv(exact_step(np.log(P_DATA), beta)) < 1e-12


def centred(e: np.ndarray) -> np.ndarray:
    return e - e.mean()  # log-probabilities are defined up to the normaliser


@pytest.mark.parametrize("beta, iterations", [(0.1, 1), (0.4, 1), (0.75, 4), (2.0, 4)])
def test_the_script_loss_multiplies_the_error_by_one_minus_one_over_beta(beta, iterations):
    """The check on spin.py that the two theorem checks below stand in for: iterating the minimiser of
    spin.spin_loss's population loss (minimise), each iteration with the previous iterate as opponent, multiplies the
    centred log error by 1 - 1/beta and lands on exact_step's iterate. At beta = 0.75 and 2, four iterations in a row
    (measured: within 7e-6 nats of (1 - 1/beta) e_t at every step, TV to exact_step's iterate <= 1e-7); at beta = 0.1
    and 0.4, the first iteration from pi_0 (within 7e-7 nats), which flips the sign of every answer's error. After that
    overshoot the opponent puts almost no mass on some answers, the loss is nearly flat there, and L-BFGS stops short of
    the minimiser (measured: TV 0.99 from exact_step's second iterate at beta = 0.4), so only one iteration is compared
    there."""
    log_pi = np.log(PI_0)
    for _ in range(iterations):
        nxt = minimise(log_pi, beta)
        error, new_error = centred(log_pi - np.log(P_DATA)), centred(nxt - np.log(P_DATA))
        np.testing.assert_allclose(new_error, (1 - 1 / beta) * error, rtol=0, atol=1e-4)
        assert 0.5 * np.abs(np.exp(nxt) - np.exp(exact_step(log_pi, beta))).sum() < 1e-5
        if beta < 0.5:
            assert np.all(np.sign(new_error) == -np.sign(error))
        log_pi = nxt


@pytest.mark.parametrize("beta", [0.75, 1.0, 2.0])
def test_beta_above_one_half_converges(beta):
    """A theorem check on exact_step (Theorem 5.4's closed form; spin.py's own loss is iterated in the test above).
    The centred log error shrinks by exactly (1 - 1/beta) an iteration; after 60 iterations TV < 1e-2
    (at beta = 0.75, |1 - 1/beta| = 1/3, so 60 iterations leave 1e-29 of the starting error; beta = 1 lands on p_data in
    one step)."""
    log_pi = np.log(PI_0)
    for _ in range(60):
        nxt = exact_step(log_pi, beta)
        np.testing.assert_allclose(centred(nxt - np.log(P_DATA)), (1 - 1 / beta) * centred(log_pi - np.log(P_DATA)),
                                   atol=1e-9)
        log_pi = nxt
    assert tv(log_pi) < 1e-2


@pytest.mark.parametrize("beta", [0.1, 0.4])
def test_beta_below_one_half_overshoots_and_does_not_settle(beta):
    """A theorem check on exact_step (spin.py's own loss takes the first of these steps in the test above).
    |1 - 1/beta| = 9 (beta = 0.1) or 1.5 (beta = 0.4): the error grows and flips sign every iteration, so the policy
    swings between near-deterministic distributions on opposite answers instead of settling on p_data."""
    log_pi, errors, tvs = np.log(PI_0), [], []
    for _ in range(12):
        log_pi = exact_step(log_pi, beta)
        errors.append(centred(log_pi - np.log(P_DATA)))
        tvs.append(tv(log_pi))
    for a, b in zip(errors, errors[1:]):
        np.testing.assert_allclose(b, (1 - 1 / beta) * a, rtol=1e-9, atol=1e-9)
        assert np.all(np.sign(a) == -np.sign(b))  # every answer's error flips sign
    assert min(tvs[-4:]) > 0.5  # far from p_data, and getting no closer
    assert np.argmax(errors[-1]) != np.argmax(errors[-2])  # the mode jumps between iterations


def test_practical_recipe_approaches_p_data_at_beta_0_1():
    """The practical recipe: each iteration starts from the previous iterate (pi_t as opponent) and takes a few gradient
    steps on the population loss, not the exact minimum. At h = 0 the gradient in the logits is
    -(beta/2)(p_data - pi_t), so a small budget is a damped step toward p_data. At beta = 0.1, 10 steps of SGD at lr 10
    an iteration: TV falls at every iteration, 0.748 -> 0.026 after 10 (measured). (Larger budgets, lr 30-100, approach
    the exact minimiser and swing like it: TV 0.75 -> 0.48 -> 0.44 -> 0.51 -> ...)"""
    beta, log_pi = 0.1, np.log(PI_0)
    tvs = [tv(log_pi)]
    for _ in range(10):
        lo, lp = torch.tensor(log_pi), torch.tensor(np.log(P_DATA))
        theta = lo.clone().requires_grad_(True)
        opt = torch.optim.SGD([theta], lr=10.0)
        for _ in range(10):
            opt.zero_grad()
            population_loss(theta, lo, lp, beta).backward()
            opt.step()
        log_pi = torch.log_softmax(theta.detach(), 0).numpy()
        tvs.append(tv(log_pi))
    assert all(b < a for a, b in zip(tvs, tvs[1:]))
    assert tvs[-1] < 0.1 * tvs[0]
