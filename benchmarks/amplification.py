"""Reward-model error amplification, exactly on the toy world: how far the optimum for an estimated reward r_hat lands
from the optimum for the true reward r, against beta, under the reverse KL (DPO, RLHF) and the forward KL.

    python benchmarks/amplification.py                 # needs runs/reward_model (python reward_model.py): about 1 min
    python benchmarks/amplification.py --plot_only     # re-draw docs/amplification.png from the saved JSON

With J_beta(pi) = E_pi[r] - beta KL(pi || pi_ref), pi* = pi_ref exp(r / beta) / Z maximises it, and the optimum for
r_hat is pi_hat = pi_ref exp(r_hat / beta) / Z_hat. With eps = r_hat - r, centred per prompt under pi* (a constant
shift of r_hat moves no policy), two facts hold exactly and are asserted for every prompt and beta here:

    J_beta(pi*) - J_beta(pi_hat) = beta KL(pi_hat || pi*)        (the identity)
                                 <= E_pi*[exp(eps / beta) eps]    (the bound)

since beta KL(pi_hat || pi*) = E_pi_hat[eps] - beta log E_pi*[exp(eps / beta)], the log is >= 0 (Jensen), and
E_pi_hat[eps] = E_pi*[exp(eps / beta) eps] / E_pi*[exp(eps / beta)] with a denominator >= 1 and a numerator >= 0.

Beside them, the gap in expected true reward E_pi*[r] - E_pi_hat[r], and the source notes' rough estimate of it,
E_pi*[exp(|eps| / beta) |eps|]; and the same two gaps for the forward-KL optima (f-DPO's formula, pi = pi_ref beta /
(lambda - r), which maximise E_pi[r] - beta KL(pi_ref || pi)), whose ratio pi_hat / pi* = (lambda - r) / (lambda_hat -
r_hat) is polynomial in the error, not exponential. Everything is over Y, with pi_ref conditioned on Y, averaged over
the 8 prompts.

r_hat comes from four sources: the toy reward model (python reward_model.py's default run); r plus 1 or plus 3 on the
100 answers per prompt that pi_ref samples least ("rare", 2.4e-5 of its mass on the first prompt); and r plus 1 on
the 100 it samples most ("often", 46%). Results go to benchmarks/amplification.json;
the figure, to docs/amplification.png, needs matplotlib (pip install matplotlib), which is not a project dependency.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "toy_world"))
from world import kl  # noqa: E402  KL(p || q) of log-probability vectors
from world import optimum_logprobs as reverse_optimum  # noqa: E402  log pi_ref exp(r / beta) / Z

BETAS = (0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
PERTURBATIONS = (("rare", 1.0), ("rare", 3.0), ("often", 1.0))  # r + size on the answers pi_ref samples least / most


@dataclasses.dataclass
class Config:
    reward_model_path: str = "runs/reward_model"
    """the toy reward model (python reward_model.py's default run)"""
    errors_on: int = 100
    """answers per prompt that get the +1 error in the 'rare' and 'often' perturbations"""
    out_json: Path = REPO / "benchmarks" / "amplification.json"
    out_png: Path = REPO / "docs" / "amplification.png"
    plot_only: bool = False


def gaps(ref_logp: np.ndarray, r: np.ndarray, r_hat: np.ndarray, beta: float, forward_optimum=None) -> dict:
    """The gaps of one prompt at one beta (see the module docstring); forward_optimum(ref_logp, r, beta) gives the
    forward-KL optimum's log-probs, if given."""
    star, hat = reverse_optimum(ref_logp, r, beta), reverse_optimum(ref_logp, r_hat, beta)
    p_star, p_hat = np.exp(star), np.exp(hat)
    objective = lambda logp: float(np.exp(logp) @ r) - beta * kl(logp, ref_logp)  # noqa: E731
    eps = r_hat - r
    eps = eps - p_star @ eps  # centred under pi*
    out = {"objective_gap": objective(star) - objective(hat), "beta_kl": beta * kl(hat, star),
           "bound": float(p_star @ (np.exp(eps / beta) * eps)), "reward_gap": float(p_star @ r - p_hat @ r),
           "rough_estimate": float(p_star @ (np.exp(np.abs(eps) / beta) * np.abs(eps)))}
    if forward_optimum is not None:
        f_star, f_hat = forward_optimum(ref_logp, r, beta), forward_optimum(ref_logp, r_hat, beta)
        out["forward_reward_gap"] = float(np.exp(f_star) @ r - np.exp(f_hat) @ r)
        forward_objective = lambda logp: float(np.exp(logp) @ r) - beta * kl(ref_logp, logp)  # noqa: E731
        out["forward_objective_gap"] = forward_objective(f_star) - forward_objective(f_hat)
        out["forward_kl_to_optimum"] = kl(f_hat, f_star)
    return out


def check_theorems(g: dict) -> None:
    """The identity to float precision, and the bound (both nonnegative)."""
    scale = max(1.0, abs(g["beta_kl"]))
    assert abs(g["objective_gap"] - g["beta_kl"]) <= 1e-9 * scale, g
    assert -1e-12 <= g["beta_kl"] <= g["bound"] * (1 + 1e-9) + 1e-12, g


def sources(cfg: Config, reference: dict) -> dict:
    """r_hat over Y per prompt for each source."""
    import toy
    from test_ppo_toy_world import all_reward_model_scores

    world = toy.world
    rm_path = Path(cfg.reward_model_path)
    rm_path = rm_path if rm_path.is_absolute() else REPO / rm_path
    if not rm_path.is_dir():
        sys.exit(f"no reward model at {rm_path}: run `python reward_model.py` first, or pass --reward_model_path")
    out = {"reward model": all_reward_model_scores(str(rm_path))}
    for where, size in PERTURBATIONS:
        name = f"{where} +{size:g}"
        out[name] = {}
        for p in world.PROMPTS:
            r, order = world.reward_vector(p)[:-1], np.argsort(reference[p], kind="stable")
            out[name][p] = r.copy()
            out[name][p][order[: cfg.errors_on] if where == "rare" else order[-cfg.errors_on :]] += size
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["sources"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = results["sources"][name]
        betas = [row["beta"] for row in rows]
        for key, label, style in (("beta_kl", "J(π*) − J(π̂) = β KL(π̂‖π*)", "-"),
                                  ("bound", "bound E_π*[exp(ε/β) ε]", "--"),
                                  ("reward_gap", "E_π*[r] − E_π̂[r], reverse KL", "-"),
                                  ("rough_estimate", "rough estimate E_π*[exp(|ε|/β) |ε|]", ":"),
                                  ("forward_reward_gap", "E[r] gap, forward KL", "-.")):
            ax.plot(betas, [abs(row[key]) for row in rows], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("β")
        ax.set_title(f"r̂: {name}", fontsize=10)
    axes[0][0].set_ylabel("mean over prompts (absolute value)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Reward-model error amplification on the toy world, exact over Y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(cfg: Config) -> None:
    if cfg.plot_only:
        return plot(json.loads(cfg.out_json.read_text()), cfg.out_png)
    import fdpo_toy
    import toy

    world = toy.world
    reference = {p: toy.on_answers(logp) for p, logp in toy.reference_logprobs().items()}
    forward = lambda ref, r, beta: fdpo_toy.optimum_on_answers(ref, r, beta, "forward_kl")  # noqa: E731
    results = {"betas": BETAS, "errors_on": cfg.errors_on, "sources": {}}
    for name, r_hat in sources(cfg, reference).items():
        rows = []
        for beta in BETAS:
            per_prompt = [gaps(reference[p], world.reward_vector(p)[:-1], r_hat[p], beta, forward)
                          for p in world.PROMPTS]
            for g in per_prompt:
                check_theorems(g)
            row = {"beta": beta, **{k: float(np.mean([g[k] for g in per_prompt])) for k in per_prompt[0]}}
            rows.append(row)
            print(f"{name:12} beta {beta:<5} J gap = beta KL {row['beta_kl']:.4g} <= bound {row['bound']:.4g}; "
                  f"E[r] gap {row['reward_gap']:.4g} (rough estimate {row['rough_estimate']:.4g}); forward KL: "
                  f"E[r] gap {row['forward_reward_gap']:.4g}")
        results["sources"][name] = rows
    cfg.out_json.write_text(json.dumps(results, indent=1) + "\n")
    try:
        plot(results, cfg.out_png)
        print(f"wrote {cfg.out_json} and {cfg.out_png}")
    except ModuleNotFoundError:
        print(f"wrote {cfg.out_json}; no figure: pip install matplotlib, then --plot_only")


if __name__ == "__main__":
    main(tyro.cli(Config, use_underscores=True))
