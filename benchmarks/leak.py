"""The leak outside the data, measured and remedied: offline DPO, DPO with RPO's NLL term (--rpo_alpha) and online
DPO at beta = 0.5, every policy enumerated exactly on the toy world.

    python reward_model.py && python benchmarks/leak.py      # 3 runs, two at a time: about 11 min on 2 cores

Offline DPO sees only ratios of answers in Y (the toy pairs' answers are all well formed), so the mass it puts
outside Y, on malformed answers, is unconstrained and can grow. RPO's NLL term holds the chosen answers' likelihood
up; online DPO samples the malformed answers itself, and its judge scores them. Runs (lr 3e-4, seed 1):
- dpo.py --beta 0.5 --num_train_epochs 3 on toy_world/pairs (Bradley-Terry on the true r);
- the same with --rpo_alpha 1 (the value TRL's documentation suggests);
- online_dpo.py --beta 0.5 --num_rounds 512 (16,384 pairs, as many labels as one epoch of the offline pairs), judged
  by the toy reward model.
For each: the mass outside Y; KL(pi || pi*) on Y to the true reward's optimum and to the run's own target (pi*_RM for
online DPO); the full-space KL to the true reward's pi* (whose outside-Y mass is pi_ref's, reweighted by r = 0); E[r];
and, from 4,096 of the policy's own answers, the reward model's mean score of those in Y and of those outside it.
Results go to benchmarks/leak.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

BETA = 0.5
RM = str(REPO / "runs" / "reward_model")
RUNS = {"offline DPO": ("dpo", {"num_train_epochs": 3}),
        "offline DPO + RPO (alpha 1)": ("dpo", {"num_train_epochs": 3, "rpo_alpha": 1.0}),
        "online DPO": ("online_dpo", {"num_rounds": 512, "reward_model_path": RM})}


def judge_own_answers(path: str, n: int = 4096) -> dict:
    """The reward model's mean score of the policy's own answers in Y and outside it, over n samples."""
    from transformers import AutoModelForSequenceClassification

    import online_dpo
    import toy

    args = online_dpo.Args(model_name_or_path=path, reward_model_path=RM, device="cpu")
    runtime = online_dpo.setup(args)
    tokenizer, pad_id = online_dpo.load_tokenizer(path)
    policy = online_dpo.load_model(path, args, runtime, trained=False)
    rm = online_dpo.load_model(RM, args, runtime, trained=False, model_class=AutoModelForSequenceClassification)
    prompts = online_dpo.round_prompts(online_dpo.load_prompts(args, tokenizer)[0], n // 2, 0, args.seed)
    rows, _ = online_dpo.online_pairs(policy, rm, prompts, args, online_dpo.eos_token_ids(policy, tokenizer), pad_id,
                                      12345, runtime)
    words = set(tokenizer.convert_tokens_to_ids(toy.world.WORDS))
    scores = {True: [], False: []}
    for row in rows:
        for part, score in zip(("chosen", "rejected"), row["scores"]):
            answer = row[part][row[f"{part}_start"]:]
            in_y = answer[-1] == tokenizer.eos_token_id and len(answer) <= 5 and set(answer[:-1]) <= words
            scores[in_y].append(score)
    return {"sampled_outside_y": len(scores[False]) / (2 * len(rows)),
            "rm_score_in_y": float(np.mean(scores[True])) if scores[True] else None,
            "rm_score_outside_y": float(np.mean(scores[False])) if scores[False] else None}


def run(name: str, out: str) -> tuple[str, dict]:
    import torch

    import toy
    from test_ppo_toy_world import all_reward_model_scores, optimum_on_answers

    torch.set_num_threads(1)
    script, overrides = RUNS[name]
    module = __import__(script)
    module.train(module.Args(beta=BETA, learning_rate=3e-4, output_dir=out, logging_steps=10**9, eval_steps=0,
                             device="cpu", **overrides))
    world, reference, policy = toy.world, toy.reference_logprobs(), toy.exact_logprobs(out)
    true_optimum = {p: world.optimum_logprobs(toy.on_answers(reference[p]), world.reward_vector(p)[:-1], BETA)
                    for p in world.PROMPTS}
    r_rm = all_reward_model_scores(RM)
    own = true_optimum if script == "dpo" else {p: optimum_on_answers(reference[p], r_rm[p], BETA)
                                                for p in world.PROMPTS}
    on_y = lambda target: float(np.mean([world.kl(toy.on_answers(policy[p]), target[p])  # noqa: E731
                                         for p in world.PROMPTS]))
    ref_on_y = lambda target: float(np.mean([world.kl(toy.on_answers(reference[p]), target[p])  # noqa: E731
                                             for p in world.PROMPTS]))
    return name, {"script": script, **{k: v for k, v in overrides.items() if k != "reward_model_path"},
                  "mass_outside_y": toy.bottom_mass(policy),
                  "kl_on_y_true_optimum": on_y(true_optimum), "kl_on_y_true_optimum_ref": ref_on_y(true_optimum),
                  "kl_on_y_own_target": on_y(own), "kl_on_y_own_target_ref": ref_on_y(own),
                  "kl_full_true_optimum": toy.kl_to_optimum(policy, reference, BETA),
                  "kl_full_true_optimum_ref": toy.kl_to_optimum(reference, reference, BETA),
                  "reward": toy.expected_reward(policy), **judge_own_answers(out)}


def main() -> None:
    if not Path(RM).is_dir():
        sys.exit(f"no reward model at {RM}: run `python reward_model.py` first")
    work = Path(tempfile.mkdtemp(prefix="leak_"))
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, list(RUNS), [str(work / f"run{i}") for i in range(len(RUNS))]))
    for name, r in results.items():
        print(f"{name:28} outside Y {r['mass_outside_y']:.3f}; KL on Y to pi* {r['kl_on_y_true_optimum']:.3f} "
              f"({r['kl_on_y_true_optimum'] / r['kl_on_y_true_optimum_ref']:.1%} of pi_ref's), to its own target "
              f"{r['kl_on_y_own_target'] / r['kl_on_y_own_target_ref']:.1%}; full-space KL to pi* "
              f"{r['kl_full_true_optimum']:.3f} (pi_ref {r['kl_full_true_optimum_ref']:.3f}); E[r] {r['reward']:.3f}; "
              f"reward model on its own answers: in Y {r['rm_score_in_y']}, outside Y {r['rm_score_outside_y']} "
              f"({r['sampled_outside_y']:.1%} of them)")
    (REPO / "benchmarks" / "leak.json").write_text(json.dumps({"beta": BETA, "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
