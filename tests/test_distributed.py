"""Every script under torchrun: 2 CPU processes (gloo) against 1 process with the same global batch.

The scripts cut every global batch into equal per-rank shares (stand-in rows weighted 0 where it does not divide),
scale each rank's loss so that DDP's average is the global mean, and draw each generated row's tokens from that row's
own uniforms. So a 2-process run is the 1-process computation with the float32 sums taken in another order. Checked:
every logged metric of every step (the scripts print 4 significant digits), the final weights (their gap relative to
the distance trained, see helpers.relative_gap), and that what rank 0 saved loads with from_pretrained.

FSDP2 (`fully_shard`) runs on CPU with gloo in the installed torch, so it is tested here, not skipped.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import MEASURED
from helpers import ROOT, TOY, head, relative_gap
from torchrun_many import RUN_END

NPROC = 2
# per-process sizes, given here as global sizes and divided by the process count
PER_PROCESS = ("per_device_train_batch_size", "per_device_eval_batch_size", "rollout_batch_size",
               "per_device_generation_batch_size", "per_device_reward_batch_size", "forward_batch_size")
# A run on one process and on two agree to float32 rounding: measured gaps 1.1e-6 to 4.6e-5 (PPO under FSDP2) of the
# distance trained. The SPIN FSDP2 bug this suite caught (an optimizer holding gathered copies) measured 0.16.
GAP = 1e-4
CHUNKED = ["--logp_chunk_tokens", "7"]  # LM-head chunks that split sequences, recomputed in the backward pass
LORA = ["--lora_r", "8", "--learning_rate", "3e-3", "--merge_lora"]  # a rank-8 adapter, merged when saved


def launch(runs: list[tuple[str, list[str]]], nproc: int) -> list[str]:
    """Each run's printed output. One launch runs them all (tests/torchrun_many.py: start-up paid once): under torchrun
    on nproc CPU processes, as docs/distributed.md launches a script on several GPUs, or as a plain `python` process if
    nproc = 1."""
    runner = [str(ROOT / "tests" / "torchrun_many.py"),
              json.dumps([[script.removesuffix(".py"), argv] for script, argv in runs])]
    if nproc > 1:
        runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *runner]
    done = subprocess.run([sys.executable, *runner], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    outputs = done.stdout.split(RUN_END)[:-1]
    assert len(outputs) == len(runs)
    return outputs


def command(script: str, sizes: dict, nproc: int, out: Path, *extra: str) -> list[str]:
    """The flags of one run: the script's global sizes divided by nproc where they are per process."""
    argv = ["--device", "cpu", "--logging_steps", "1", "--output_dir", str(out), *extra]
    for key, size in sizes.items():
        if key in PER_PROCESS:
            assert size % nproc == 0, key
            size //= nproc
        argv += [f"--{key}", str(size)]
    return argv


def logged_steps(stdout: str) -> list[dict]:
    """Every printed 'step N: k=v, ...' (or 'rollout N:', 'iteration t, step N:', 'stage k, step N:') line, as
    {k: v} without timings."""
    steps = []
    for line in re.split(r"[\r\n]", stdout):
        match = re.match(r"(?:(?:iteration|stage) \d+, )?(?:step|rollout) \d+: (.*)", line)
        if match:
            pairs = (item.split("=") for item in match.group(1).split(", "))
            steps.append({k: float(v) for k, v in pairs if not k.startswith(("perf/", "time/"))})
    return steps


def assert_same_trajectory(one: list[dict], many: list[dict], script: str) -> None:
    assert len(one) == len(many) > 0, script
    for step, (a, b) in enumerate(zip(one, many), 1):
        assert a.keys() == b.keys(), (script, step)
        for k in a:  # two roundings to 4 significant digits are at most 1e-3 apart, relatively
            assert math.isclose(a[k], b[k], rel_tol=2e-3, abs_tol=1e-6), (
                f"{script}, step {step}: {k} = {a[k]} on 1 process, {b[k]} on {NPROC}")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, data_dir, sft_dir, ranked_dir, unpaired_dir, safety_dir) -> dict:
    """Per script: its global sizes and its other flags, on small data. The pairs file for dpo.py has 63 rows: 57 to
    train on (6 held out, a tenth), so the last micro-batch of an epoch (9 pairs) leaves one rank a stand-in row and is
    shorter than the other micro-batch of its step. sacpo.py runs both stages (the second against the first's result,
    which rank 0 saved) and merges them. online_dpo.py splits each round's prompts over the ranks, which share the pairs
    they sampled, scored and labelled. grpo.py runs DAPO's options (the token-level loss over a step's responses on both
    ranks, clip-higher, the group filter), 2 passes a rollout, scored by a reward model plus the toy reward function.
    slic_hf.py runs with gradient checkpointing, and rrhf.py rescores its responses with a reward model split over the
    ranks. kto.py's z0 is a mean over both ranks' rows. dpo.py, slic_hf.py, ppo_rlhf.py, kto.py, online_dpo.py and
    grpo.py score log-probs in chunks of 7 positions (--logp_chunk_tokens), each recomputed in the backward pass, under
    DDP and FSDP2 alike. Not spin.py: its opponent's log-probs come from other batches than the policy's, so at step 1
    (h = 0 up to rounding) a row falls in chunks of other sizes in the two, and on this CPU the LM head's matmul rounds
    some row counts differently from others (1, 2, 3, 6 or 33 rows against 200: ~1e-7): the sign of the margin, and so
    rewards/accuracy, is then rounding noise. (A held reference scores the same batch as the policy, in the same chunks,
    so dpo.py's h is exactly 0 at step 1.)"""
    base = tmp_path_factory.mktemp("dist")
    head(TOY / "pairs" / "train.jsonl", base / "pairs63.jsonl", 63)
    torch.manual_seed(0)  # a reward model for PPO: the toy model with a random head (any scalar scorer will do here)
    AutoModelForSequenceClassification.from_pretrained(TOY / "model", num_labels=1).save_pretrained(base / "rm")
    AutoTokenizer.from_pretrained(TOY / "model").save_pretrained(base / "rm")
    offline = dict(max_steps=3, per_device_train_batch_size=16, per_device_eval_batch_size=6, eval_steps=2)
    return {
        "rm": base / "rm",
        "dpo.py": (dict(max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                        per_device_eval_batch_size=6, eval_steps=2, save_steps=2),
                   ["--dataset_name", str(base / "pairs63.jsonl"), "--eval_holdout", "6", *CHUNKED]),
        "ipo.py": (offline, ["--dataset_name", str(data_dir), "--precompute_ref_logps"]),
        "fdpo.py": (offline, ["--dataset_name", str(data_dir), "--divergence", "js"]),
        "slic_hf.py": (offline, ["--dataset_name", str(data_dir), "--gradient_checkpointing", *CHUNKED]),
        "reward_model.py": (offline, ["--dataset_name", str(data_dir)]),
        "rrhf.py": ({**offline, "per_device_train_batch_size": 8, "per_device_reward_batch_size": 6},
                    ["--dataset_name", str(ranked_dir), "--reward_model_path", str(base / "rm")]),
        "ppo_rlhf.py": (dict(num_rollouts=2, rollout_batch_size=8, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, forward_batch_size=6, num_ppo_epochs=2, eval_steps=1,
                             learning_rate=1e-3, save_steps=1),
                        ["--reward_model_path", str(base / "rm"), "--num_eval_prompts", "7", *CHUNKED]),
        "kto.py": (offline, ["--dataset_name", str(unpaired_dir), *CHUNKED]),
        "sacpo.py": ({**offline, "max_steps": 2}, ["--reward_dataset", str(data_dir), "--safety_dataset",
                                                   str(safety_dir), "--merge", "0.5"]),
        "online_dpo.py": (dict(num_rounds=3, per_device_train_batch_size=8, gradient_accumulation_steps=2,
                               forward_batch_size=6, eval_steps=2, learning_rate=1e-3),
                          ["--reward_model_path", str(base / "rm"), "--num_eval_prompts", "7", *CHUNKED]),
        "grpo.py": (dict(num_rollouts=2, rollout_batch_size=4, num_generations=4, per_device_train_batch_size=6,
                         gradient_accumulation_steps=2, forward_batch_size=6, num_iterations=2, eval_steps=1,
                         learning_rate=1e-3),
                    ["--loss_type", "dapo", "--epsilon_high", "0.28", "--filter_groups", "--reward_model_path",
                     str(base / "rm"), "--reward_fn", "toy_world/world.py:grpo_reward", "--num_eval_prompts", "7",
                     *CHUNKED]),
        "spin.py": (dict(num_iterations=2, per_device_train_batch_size=16, per_device_eval_batch_size=6,
                         per_device_generation_batch_size=10),
                    ["--dataset_name", str(sft_dir)]),
    }


SCRIPTS = ["dpo.py", "ppo_rlhf.py", "spin.py", "ipo.py", "fdpo.py", "slic_hf.py", "rrhf.py", "reward_model.py",
           "kto.py", "sacpo.py", "online_dpo.py", "grpo.py"]
RESUMED = ["dpo.py", "ppo_rlhf.py"]  # their FSDP2 runs save a checkpoint, and a third run resumes from it


@pytest.mark.slow  # starts a process: `torchrun` (and `python`) launches of tests/torchrun_many.py
def test_two_processes_match_one(inputs, tmp_path):
    """DDP (the default) and FSDP2 (--fsdp) on 2 processes, each against 1 process with the same global batch, every
    script; under FSDP2, dpo.py and ppo_rlhf.py also resume from a checkpoint (the optimizer state gathered, then
    sharded again). Under DDP, dpo.py also trains a LoRA adapter (--lora_r 8): the reference is the policy with its
    adapter switched off on each rank, DDP averages the adapter's gradients, and the merged weights (--merge_lora) are
    compared. One test, so that the 1-process runs are made once and the launches' start-up is paid once."""
    sizes, extra = inputs["dpo.py"]
    lora = [("dpo.py", command("dpo.py", sizes, n, tmp_path / f"lora-{n}", *extra, *LORA)) for n in (1, NPROC)]
    one_runs = [(s, command(s, inputs[s][0], 1, tmp_path / "one" / s, *inputs[s][1])) for s in SCRIPTS]
    outputs = launch(one_runs + lora[:1], 1)
    one = {s: (tmp_path / "one" / s, out) for s, out in zip(SCRIPTS, outputs)}
    lora_one = outputs[-1]
    gaps = {}
    for mode, flag in (("ddp", []), ("fsdp", ["--fsdp"])):
        out_dir = tmp_path / mode
        runs = [(s, command(s, inputs[s][0], NPROC, out_dir / s, *inputs[s][1], *flag)) for s in SCRIPTS]
        if mode == "fsdp":
            checkpoints = {"dpo.py": "checkpoint-2", "ppo_rlhf.py": "checkpoint-1"}
            runs += [(s, command(s, inputs[s][0], NPROC, out_dir / f"resumed-{s}", *inputs[s][1], *flag,
                                 "--resume_from", str(out_dir / s / checkpoints[s]))) for s in RESUMED]
        else:
            runs += lora[1:]
        outputs = launch(runs, NPROC)
        for script, out in zip(SCRIPTS, outputs):
            reference, printed = one[script]
            assert_same_trajectory(logged_steps(printed), logged_steps(out), f"{script} ({mode})")
            gaps[script, mode] = relative_gap(reference, out_dir / script, TOY / "model")
            assert gaps[script, mode] < GAP, (script, mode, gaps[script, mode])
            if script == "ppo_rlhf.py":
                assert relative_gap(reference / "value_model", out_dir / script / "value_model",
                                    inputs["rm"]) < GAP, mode
            loader = AutoModelForSequenceClassification if script == "reward_model.py" else AutoModelForCausalLM
            # rank 0 wrote a model that loads (under FSDP2, the shards gathered)
            loader.from_pretrained(out_dir / script)
            if script == "sacpo.py":  # and stage 1's model and the merge
                assert relative_gap(reference / "reward", out_dir / script / "reward", TOY / "model") < GAP, mode
                loader.from_pretrained(out_dir / script / "merged-q0.5")
        if mode == "fsdp":
            for script, out in zip(RESUMED, outputs[len(SCRIPTS):]):
                assert "resumed from" in out
                gaps[script, "resumed"] = relative_gap(out_dir / script, out_dir / f"resumed-{script}", TOY / "model")
                assert gaps[script, "resumed"] < GAP, script
        else:
            assert_same_trajectory(logged_steps(lora_one), logged_steps(outputs[-1]), "dpo.py --lora_r 8 (ddp)")
            gaps["lora"] = relative_gap(tmp_path / "lora-1" / "merged", tmp_path / f"lora-{NPROC}" / "merged",
                                        TOY / "model")
            assert gaps["lora"] < GAP, gaps["lora"]
    MEASURED.append(f"torchrun, {NPROC} CPU processes against 1, weight gap relative to the distance trained "
                    "(DDP / FSDP2): "
                    + "; ".join(f"{s} {gaps[s, 'ddp']:.1e} / {gaps[s, 'fsdp']:.1e}" for s in SCRIPTS)
                    + "; FSDP2 resumed against uninterrupted: "
                    + ", ".join(f"{s} {gaps[s, 'resumed']:.1e}" for s in RESUMED)
                    + f"; dpo.py --lora_r 8 under DDP, merged weights: {gaps['lora']:.1e}")


# --------------------------------------------------------------------------- the pieces that make the runs agree
def test_rank_share_cuts_equal_contiguous_parts_with_stand_ins():
    import dpo

    assert [dpo.rank_share(list("abcde"), r, 2) for r in range(2)] == [(list("abc"), 3), (list("dea"), 2)]
    assert [dpo.rank_share(["x"], r, 3) for r in range(3)] == [(["x"], 1), (["x"], 0), (["x"], 0)]
    items = list(range(11))
    parts = [dpo.rank_share(items, r, 4) for r in range(4)]
    assert {len(share) for share, _ in parts} == {3} and [i for share, n in parts for i in share[:n]] == items


def test_a_generated_row_does_not_depend_on_its_batch(toy_model_dir):
    """Each row's tokens come from its own uniforms: generating 6 prompts together or as 2 + 4 (as two processes would)
    gives the same answers, once cut after their EOS."""
    import ppo_rlhf as ppo

    model = AutoModelForCausalLM.from_pretrained(toy_model_dir).eval()
    prompts = [[2, 6, 7, 3], [2, 3], [2, 9, 3], [2, 5, 6, 7, 8, 3], [2, 10, 3], [2, 11, 12, 3]]
    uniforms = torch.rand(len(prompts), 8, generator=torch.Generator().manual_seed(0))

    def answers(rows):
        query, mask = ppo.left_pad([prompts[i] for i in rows], 0)
        out, keep, _ = ppo.truncate_after_eos(ppo.generate(model, query, mask, 8, 1.0, 4, uniforms[rows]), 4, 0)
        return [o[k].tolist() for o, k in zip(out, keep)]

    together = answers(list(range(6)))
    assert answers([0, 1]) + answers([2, 3, 4, 5]) == together
    assert len({tuple(a) for a in together}) > 1  # the check is not vacuous: the prompts get different answers


def test_inverse_cdf_sampling_draws_from_the_tempered_softmax():
    """20,000 one-token draws from fixed logits at T = 0.7: every frequency within 4.5 standard errors of
    softmax(l / T), and the -inf token never drawn."""
    from types import SimpleNamespace

    from transformers import PretrainedConfig

    import ppo_rlhf as ppo

    logits = torch.tensor([1.0, -0.5, 2.0, float("-inf"), 0.3])

    class Body(torch.nn.Module):
        def forward(self, input_ids, **kwargs):
            return SimpleNamespace(last_hidden_state=logits.expand(len(input_ids), 1, -1), past_key_values=None)

    class Fixed(torch.nn.Module):
        """Its final hidden state is the logits themselves, which an identity LM head reads out."""

        def __init__(self):
            super().__init__()
            self.base_model, self.config = Body(), PretrainedConfig()

        def get_output_embeddings(self):
            return torch.nn.Identity()

    n = 20_000
    query = torch.ones(n, 1, dtype=torch.long)
    draws = ppo.generate(Fixed(), query, query, 1, 0.7, -1,
                         torch.rand(n, 1, generator=torch.Generator().manual_seed(0)))[:, 0]
    p = torch.softmax(logits / 0.7, dim=-1)
    freq = torch.bincount(draws, minlength=len(logits)).double() / n
    assert freq[3] == 0
    assert ((freq - p).abs() <= 4.5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)


def test_fsdp_without_torchrun_says_how_to_launch():
    import dpo

    with pytest.raises(ValueError, match="torchrun"):
        dpo.train(dpo.Args(fsdp=True, device="cpu"))
