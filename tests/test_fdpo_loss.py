"""Hand-computed checks of `fdpo.fdpo_loss` (f-DPO, Wang et al. 2024): loss = softplus(-beta (f'(u_w) - f'(u_l))),
u = pi / pi_ref, from the log-ratios a = log u. f' by hand, with the `math` module only:

    reverse KL  a + 1      forward KL  -e^{-a}      JS  log(2 e^a / (1 + e^a))      alpha  (1 - e^{-alpha a}) / alpha
"""
import math

import pytest
import torch

from dpo import dpo_loss
from fdpo import EXP_CAP, f_prime, fdpo_loss
from helpers import softplus

HAND_F_PRIME = {
    "reverse_kl": lambda a, alpha: a + 1,
    "forward_kl": lambda a, alpha: -math.exp(-a),
    "js": lambda a, alpha: math.log(2 * math.exp(a) / (1 + math.exp(a))),
    "alpha": lambda a, alpha: (1 - math.exp(-alpha * a)) / alpha,
}
DIVERGENCES = [("reverse_kl", None), ("forward_kl", None), ("js", None), ("alpha", 0.3), ("alpha", 0.5), ("alpha", 0.7)]
# (policy_chosen, policy_rejected, ref_chosen, ref_rejected): log-ratios a_w, a_l of both signs and sizes
CASES = [(-12.5, -15.25, -13.0, -14.75), (-3.0, -2.0, -2.5, -3.5), (-40.0, -40.0, -40.0, -40.0),
         (-7.75, -20.5, -9.0, -18.0), (-1.0, -0.5, -6.0, -0.125)]


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES)
def test_matches_hand_values(divergence, alpha, beta, eps):
    """cDPO's smoothing eps weighs in the flipped label: (1 - eps) softplus(-z) + eps softplus(z)."""
    inputs = [torch.tensor(col, dtype=torch.float64) for col in zip(*CASES)]
    losses, chosen_rewards, rejected_rewards = fdpo_loss(*inputs, beta=beta, divergence=divergence, alpha=alpha or 0.5,
                                                         label_smoothing=eps)
    f = HAND_F_PRIME[divergence]
    for k, (pc, pr, rc, rr) in enumerate(CASES):
        fw, fl = f(pc - rc, alpha), f(pr - rr, alpha)
        want = (1 - eps) * softplus(-beta * (fw - fl)) + eps * softplus(beta * (fw - fl))
        assert losses[k].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert chosen_rewards[k].item() == pytest.approx(beta * fw, rel=1e-12, abs=1e-12)
        assert rejected_rewards[k].item() == pytest.approx(beta * fl, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reverse_kl_is_dpo(dtype):
    """With the reverse KL, f'(u_w) - f'(u_l) = a_w - a_l (the +1s cancel): the loss is DPO's, -log sigmoid(beta
    (a_w - a_l)), by hand in float64 on random log-probs; float32 inputs stay within float32 rounding of it."""
    gen = torch.Generator().manual_seed(0)
    inputs = list(-60.0 * torch.rand(4, 257, generator=gen, dtype=torch.float64))
    rtol = 1e-12 if dtype == torch.float64 else 1e-5  # float32: the log-ratios of ~-60 lose ~4e-6 nats
    for beta in (0.1, 0.5, 2.0):
        losses = fdpo_loss(*(x.to(dtype) for x in inputs), beta=beta, divergence="reverse_kl")[0]
        for k, (pc, pr, rc, rr) in enumerate(zip(*(x.to(dtype).tolist() for x in inputs))):
            assert losses[k].item() == pytest.approx(softplus(-beta * ((pc - rc) - (pr - rr))), rel=rtol, abs=rtol)
        for eps in (0.0, 0.2):  # and, with cDPO's smoothing too, dpo.py's loss bit for bit
            args = [x.to(dtype) for x in inputs] + [beta]
            assert torch.equal(fdpo_loss(*args, divergence="reverse_kl", label_smoothing=eps)[0],
                               dpo_loss(*args, label_smoothing=eps)[0])


def test_alpha_interpolates_between_the_two_kls():
    """f'_alpha(u) = (1 - u^-alpha)/alpha -> log u as alpha -> 0 (the reverse KL's f' up to its constant) and = 1 - 1/u
    at alpha = 1 (the forward KL's up to its constant); the constants cancel in f'(u_w) - f'(u_l). So near the ends the
    loss approaches, by hand, softplus(-beta (a_w - a_l)) and softplus(-beta (e^-a_l - e^-a_w)): within O(alpha a^2)
    and O((1 - alpha) a e^-a) respectively, under 1e-5 for these log-ratios (|a| <= 5)."""
    inputs = [torch.tensor(col, dtype=torch.float64) for col in zip(*CASES)]
    ends = {1e-7: lambda aw, al: aw - al, 1 - 1e-7: lambda aw, al: math.exp(-al) - math.exp(-aw)}
    for alpha, difference in ends.items():
        losses = fdpo_loss(*inputs, beta=0.5, divergence="alpha", alpha=alpha)[0]
        for k, (pc, pr, rc, rr) in enumerate(CASES):
            assert losses[k].item() == pytest.approx(softplus(-0.5 * difference(pc - rc, pr - rr)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("alpha", [1e-4, 0.01])
def test_alpha_f_prime_keeps_float32_precision_for_small_alpha(alpha):
    """Issue 17, defect 10. f'(u) = (1 - e^{-alpha a}) / alpha at a = 1e-3: 1 - e^{-x} for x = alpha a ~ 1e-7 cancels
    in float32 (relative error 19% at alpha 1e-4, 1.4e-3 at 0.01), while -expm1(-x) keeps float32's precision. The
    closed form is evaluated here in float64 from the Taylor series 1 - e^{-x} = x - x^2/2 + x^3/6 - ... (x <= 1e-5,
    so four terms are exact to float64), at the float32 value of a."""
    a = torch.tensor([1e-3], dtype=torch.float32)
    x = alpha * a.item()
    want = (x - x**2 / 2 + x**3 / 6 - x**4 / 24) / alpha
    got = f_prime(a, "alpha", alpha)
    assert got.dtype == torch.float32
    assert abs(got.item() - want) / want < 1e-6


# f''(u) * u, the derivative of f'(u) with respect to a = log u, by hand: f' = log u + 1 -> 1/u; f' = -1/u -> 1/u^2;
# f' = log(2u/(1+u)) -> 1/u - 1/(1+u) = 1/(u(1+u)); f' = (1 - u^{-alpha})/alpha -> u^{-alpha-1}; each times u.
HAND_F_SECOND_TIMES_U = {
    "reverse_kl": lambda a, alpha: 1.0,
    "forward_kl": lambda a, alpha: math.exp(-a),
    "js": lambda a, alpha: 1 / (1 + math.exp(a)),
    "alpha": lambda a, alpha: math.exp(-alpha * a),
}


@pytest.mark.parametrize("divergence, alpha", DIVERGENCES)
def test_gradients_match_hand_values(divergence, alpha):
    """With z = beta (f'(u_w) - f'(u_l)) and u = e^a, a = log pi - log pi_ref, the loss -log sigmoid(z) has
    d/d log pi(y_w) = -sigmoid(-z) beta f''(u_w) u_w, d/d log pi(y_l) = +sigmoid(-z) beta f''(u_l) u_l, and the
    reference's log-probs the opposite signs."""
    beta = 0.5
    inputs = [torch.tensor(col, dtype=torch.float64, requires_grad=True) for col in zip(*CASES)]
    losses, _, _ = fdpo_loss(*inputs, beta=beta, divergence=divergence, alpha=alpha or 0.5)
    losses.sum().backward()
    f, f2u = HAND_F_PRIME[divergence], HAND_F_SECOND_TIMES_U[divergence]
    for k, (pc, pr, rc, rr) in enumerate(CASES):
        a_w, a_l = pc - rc, pr - rr
        weight = beta / (1 + math.exp(beta * (f(a_w, alpha) - f(a_l, alpha))))  # beta sigmoid(-z)
        want = [-weight * f2u(a_w, alpha), weight * f2u(a_l, alpha)]
        want += [-want[0], -want[1]]
        for x, w in zip(inputs, want):
            assert x.grad[k].item() == pytest.approx(w, rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence, alpha", DIVERGENCES)
def test_extreme_log_ratios_stay_finite(dtype, divergence, alpha):
    """Log-ratios of +-1e4 nats, where e^{-a} alone would be 1e4343: losses and gradients finite. Below -EXP_CAP/alpha
    the exponentials saturate: the loss is then flat in that answer (gradient 0), which is tested."""
    big = 1e4
    values = [(0.0, -big, -big, 0.0), (-big, 0.0, 0.0, -big), (-big, -big, 0.0, 0.0), (big, big, 0.0, 0.0),
              (-1e4, 5.0, 0.0, 0.0)]
    inputs = [torch.tensor(col, dtype=dtype, requires_grad=True) for col in zip(*values)]
    losses, chosen_rewards, rejected_rewards = fdpo_loss(*inputs, beta=2.0, divergence=divergence, alpha=alpha or 0.5)
    losses.sum().backward()
    assert losses.dtype == dtype
    assert (torch.isfinite(losses).all() and torch.isfinite(chosen_rewards).all()
            and torch.isfinite(rejected_rewards).all())
    assert all(torch.isfinite(x.grad).all() for x in inputs)
    if divergence in ("forward_kl", "alpha"):  # a_w = -1e4 is past the cap: no gradient flows to that chosen answer
        assert inputs[0].grad[4].item() == 0.0 and 1e4 * (alpha or 1.0) > EXP_CAP


def test_bad_alpha_and_divergence_are_named():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="alpha must be in"):
        fdpo_loss(x, x, x, x, beta=0.1, divergence="alpha", alpha=1.0)
    with pytest.raises(ValueError, match="unknown divergence 'tv'"):
        fdpo_loss(x, x, x, x, beta=0.1, divergence="tv")
