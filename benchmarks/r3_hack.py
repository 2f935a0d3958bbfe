"""R3 on the toy world, every policy measured exactly by enumeration: the relevance hack, and what R3's regularisers
and the missing-EOS penalty do to it.

    python benchmarks/r3_hack.py    # 5 PPO runs and their enumerations, two at a time: about 9 min on 2 cores

Rewards, from the toy relevance encoder (toy_world/relevance_model) on toy_world/r3_prompts (four open-ended prompts,
"how was the food ?", and four constrained ones, "was the food good ?", each with a reference answer):
- relevance alone, r_x = M(x).M(y), at beta 0.1 (`--reward relevance`);
- R3, r_x LI RP on the open-ended prompts and F(r_y) RP on the constrained ones, at beta 0.005 (`--reward r3`); its
  rewards are about 1/30 of the relevance's, since LI = words/100 and a toy answer has at most four words.
Runs: each reward with ppo_rlhf.py's defaults (100 rollouts), and each again with --missing_eos_penalty P (P = 1 for
relevance, 0.05 for R3: about a third of each reward's range), which docks a response that runs out the five-token
budget without <|end|>. And relevance alone for 300 rollouts, to see whether its policy ever finds the copies that
its optimum holds. For the exact optima and every trained policy: the copy mass (answers that are a span of the
prompt at least three words long, plus the whole five-word question without <|end|>, outside Y), the true E[r], the
mean length on Y, the mass outside Y, and KL(pi|Y || pi*|Y) as a fraction of the reference's. Printed, and written to
benchmarks/r3_hack.json; docs/r3.md reads the results.
"""

from __future__ import annotations

import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

BETA = {"relevance": 0.1, "r3": 0.005}
PENALTY = {"relevance": 1.0, "r3": 0.05}
NUM_ROLLOUTS = 100  # ppo_rlhf.py's default


def run(work: Path, reward: str, penalty: float, num_rollouts: int) -> tuple[str, dict]:
    import torch

    import ppo_rlhf
    from test_r3_toy_world import measure

    torch.set_num_threads(1)
    out = work / f"{reward}-{penalty}-{num_rollouts}"
    ppo_rlhf.train(ppo_rlhf.Args(reward=reward, dataset_name="toy_world/r3_prompts", query_type_column="query_type",
                                 beta=BETA[reward], missing_eos_penalty=penalty, num_rollouts=num_rollouts,
                                 output_dir=str(out), logging_steps=10_000, eval_steps=0, device="cpu"))
    name = f"{reward}, missing_eos_penalty {penalty}, {num_rollouts} rollouts"
    return name, clean(measure(out, reward, BETA[reward]))


def clean(f: dict) -> dict:
    return {k: ([round(float(x), 4) for x in v] if k == "lengths" else round(float(v), 4)) for k, v in f.items()}


def exact() -> dict:
    import toy
    from test_r3_toy_world import exact_rewards, figures, optimum, reference_figures

    out = {"reference": clean(reference_figures())}
    for reward, beta in BETA.items():
        out[f"{reward} optimum (beta {beta})"] = clean(figures(optimum(toy.reference_logprobs(),
                                                                       exact_rewards()[reward], beta)))
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="r3_hack_"))
    jobs = [("relevance", 0.0, 3 * NUM_ROLLOUTS)]  # the longest first
    jobs += [(reward, penalty, NUM_ROLLOUTS) for reward in BETA for penalty in (0.0, PENALTY[reward])]
    with ProcessPoolExecutor(max_workers=2) as pool:
        runs = dict(pool.map(run, [work] * len(jobs), *zip(*jobs)))
        optima = pool.submit(exact).result()
    for name, f in {**optima, **runs}.items():
        kl = f" KL to pi* on Y {f['kl_fraction']:.1%} of pi_ref's" if "kl_fraction" in f else ""
        print(f"{name:52} copy {f['copy']:.3f} (open-ended {f['open_ended']:.3f}, constrained {f['constrained']:.3f})"
              f"  E[r] {f['reward']:.3f}  length {f['mean_length']:.2f}  outside Y {f['outside']:.3f}{kl}")
    (REPO / "benchmarks" / "r3_hack.json").write_text(json.dumps(
        {"beta": BETA, "missing_eos_penalty": PENALTY, "num_rollouts": NUM_ROLLOUTS, "exact": optima, "runs": runs},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
