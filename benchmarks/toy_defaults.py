"""Each offline script's default command on the toy world, timed and measured exactly: the default-run rows of
docs/dpo_ipo_slic.md.

    python benchmarks/toy_defaults.py                   # dpo, ipo, slic_hf, rrhf; a few minutes
    python benchmarks/toy_defaults.py --scripts dpo     # one of them

Each script runs as a user runs it, `python X.py --output_dir <tmp>` with every other flag at its default, in a
fresh process with --threads intra-op threads. The trained policy is then enumerated over all 41,371 answers of
each toy prompt (tests/toy.py) and compared with the reference: E[r], KL(pi || pi_ref), the mass outside Y and,
where the method has one, the KL on Y to its own analytic optimum (DPO: pi_ref exp(r/beta)/Z; IPO:
pi_ref exp(p(y > mu)/beta)/Z). The tests check shorter runs; this measures the full default ones.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
import toy  # noqa: E402

world = toy.world


@dataclasses.dataclass
class Config:
    scripts: tuple[str, ...] = ("dpo", "ipo", "slic_hf", "rrhf")
    threads: int = 2


def optimum_on_answers(script: str, reference: dict, beta: float):
    if script == "dpo":
        return {p: world.optimum_logprobs(toy.on_answers(reference[p]), world.reward_vector(p)[:-1], beta)
                for p in world.PROMPTS}
    if script == "ipo":
        return toy.ipo_optimum_on_answers(reference, beta)
    return None


def main(cfg: Config) -> None:
    reference = toy.reference_logprobs()
    rows = []
    for script in cfg.scripts:
        module = __import__(script)
        with tempfile.TemporaryDirectory() as tmp:
            env = os.environ | {"OMP_NUM_THREADS": str(cfg.threads), "WANDB_MODE": "disabled"}
            start = time.perf_counter()
            subprocess.run([sys.executable, f"{script}.py", "--output_dir", tmp], cwd=REPO, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            policy = toy.exact_logprobs(tmp)
        beta = getattr(module.Args(), "beta", None)
        optimum = optimum_on_answers(script, reference, beta)
        kl_y = "" if optimum is None else " → ".join(
            f"{np.mean([world.kl(toy.on_answers(d[p]), optimum[p]) for p in world.PROMPTS]):.3f}"
            for d in (reference, policy))
        kl_ref = np.mean([world.kl(policy[p], reference[p]) for p in world.PROMPTS])
        rows.append(f"| `python {script}.py` | {seconds:.0f} | {kl_y or 'no closed form'} | "
                    f"{toy.expected_reward(reference):.3f} → {toy.expected_reward(policy):.3f} | {kl_ref:.3f} | "
                    f"{toy.bottom_mass(policy):.1%} |")
        print(rows[-1], flush=True)
    print("\n| command | wall s | KL on Y to its own optimum: reference → trained | E[r] | KL(π ‖ π_ref) "
          "| mass outside Y |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(tyro.cli(Config))
