"""Where ppo_rlhf.py spends its time: the share of each rollout phase, and rollout tokens per second.

    python benchmarks/bench_ppo.py                        # the toy world, 20 rollouts, CPU
    python benchmarks/bench_ppo.py --device cuda --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/tldr \\
        --max-new-tokens 53 --rollout-batch-size 64 --rollouts 10

The reward model's head is random unless --reward-model is given: the phase times do not depend on what it learnt.
The figures are those of the last rollout (the first ones include warm-up), read from ppo_rlhf.py's own `time/*`
and `perf/*` metrics.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo_rlhf  # noqa: E402

PHASES = ("generate", "score", "policy_forward", "ref_forward", "value_forward", "update")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy_world/model")
    p.add_argument("--reward-model", default=None)
    p.add_argument("--dataset", default="toy_world/prompts")
    p.add_argument("--rollouts", type=int, default=20)
    p.add_argument("--rollout-batch-size", type=int, default=ppo_rlhf.Args.rollout_batch_size)
    p.add_argument("--max-new-tokens", type=int, default=ppo_rlhf.Args.max_new_tokens)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        rm_path = a.reward_model
        if rm_path is None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            rm_path = os.path.join(tmp, "rm")
            torch.manual_seed(0)
            model_path = ppo_rlhf.resolve_path(a.model)
            AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1).save_pretrained(rm_path)
            AutoTokenizer.from_pretrained(model_path).save_pretrained(rm_path)
        args = ppo_rlhf.Args(model_name_or_path=a.model, reward_model_path=rm_path, dataset_name=a.dataset,
                             num_rollouts=a.rollouts, rollout_batch_size=a.rollout_batch_size,
                             max_new_tokens=a.max_new_tokens, device=a.device, eval_steps=0, logging_steps=10_000,
                             output_dir=os.path.join(tmp, "ppo"))
        start = time.perf_counter()
        m = ppo_rlhf.train(args)
        wall = time.perf_counter() - start
    step = m["time/step"]
    print(f"{a.rollouts} rollouts of {a.rollout_batch_size} prompts, max_new_tokens {a.max_new_tokens}, {a.device}: "
          f"{wall:.1f} s in all")
    print(f"last rollout: {step:.3f} s; "
          f"rollout tokens/s (prompt + response, whole step) {m['perf/tokens_per_sec']:.0f}; "
          f"generated tokens/s during generation {m['perf/generated_tokens_per_sec']:.0f}")
    for k in PHASES:
        print(f"  {k:15s} {m.get(f'time/{k}', 0.0):7.3f} s  {m.get(f'time/{k}', 0.0) / step:6.1%}")


if __name__ == "__main__":
    main()
