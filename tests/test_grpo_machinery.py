"""grpo.py's rollouts and updates: what its reward function is called with, the groups its advantages are taken over,
the loss the optimizer steps on, saving, resuming, determinism, bad inputs and the command line.

The helpers grpo.py shares with ppo_rlhf.py (the sampler, the reward model's scores, prompts, minibatches, saving) are
byte-identical copies (test_copies_identical.py), tested with that script. Everything runs on CPU with the toy model.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo
from helpers import TOY_EOS, assert_same_weights, cached_runner, help_text

# 4 prompts x 4 responses a rollout; 2 passes of 2 minibatches of 8, each one step of 2 micro-batches of 4
BASE_ARGS = dict(num_rollouts=4, save_steps=2, rollout_batch_size=4, num_generations=4, num_iterations=2,
                 per_device_train_batch_size=4, gradient_accumulation_steps=2, forward_batch_size=6, eval_steps=2,
                 num_eval_prompts=5, logging_steps=1000, learning_rate=1e-3, device="cpu",
                 reward_fn="toy_world/world.py:grpo_reward")

SPY = '''
import json
CALLS = []


def reward(prompts, completions, completion_ids, **columns):
    """Scores a response by its length, and records every call."""
    CALLS.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, columns=columns))
    return [float(len(ids)) for ids in completion_ids]
'''


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_dirs):
    return cached_runner(grpo, tmp_path_factory, **BASE_ARGS, model_name_or_path=str(toy_dirs.model),
                         dataset_name=str(toy_dirs.prompts))


@pytest.fixture(scope="module")
def spy(tmp_path_factory, toy_dirs):
    """A reward function in a file of its own, and a copy of the toy prompts with a 'solution' column."""
    base = tmp_path_factory.mktemp("spy")
    (base / "spy.py").write_text(SPY)
    (base / "prompts").mkdir()
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (toy_dirs.prompts / f"{split}.jsonl").read_text().splitlines()]
        (base / "prompts" / f"{split}.jsonl").write_text(
            "".join(json.dumps({**row, "solution": f"s{i}"}) + "\n" for i, row in enumerate(rows)))
    return base


def spied_calls(monkeypatch) -> list:
    """The calls that the next run's reward function (each run loads it anew) will record."""
    calls = []
    real = grpo.load_reward_function
    monkeypatch.setattr(grpo, "load_reward_function",
                        lambda spec: (lambda fn: calls.append(fn.__globals__["CALLS"]) or fn)(real(spec)))
    return calls


def test_the_reward_function_gets_groups_of_the_same_prompt_as_trl_calls_it(train_run, spy, monkeypatch):
    """Rollout calls (every forward_batch_size responses): the dataset's prompts as they are, each G times in a row;
    completions as assistant messages after a conversational prompt; completion_ids ending at the EOS (or running out
    the budget); the other columns by name. The score it returns is what objective/score averages."""
    spied = spied_calls(monkeypatch)
    run = train_run(fresh=True, dataset_name=str(spy / "prompts"), reward_fn=f"{spy / 'spy.py'}:reward",
                    num_rollouts=1, eval_steps=0, save_steps=0)
    rollout = spied[0][:3]  # 16 responses in chunks of 6; then the final evaluation's call
    assert [len(c["prompts"]) for c in rollout] == [6, 6, 4]
    prompts = sum((c["prompts"] for c in rollout), [])
    solutions = sum((c["columns"]["solution"] for c in rollout), [])
    for g in range(4):  # 4 groups of 4 copies of one prompt and its row
        assert all(p == prompts[4 * g] for p in prompts[4 * g : 4 * g + 4])
        assert len(set(solutions[4 * g : 4 * g + 4])) == 1
    assert len({json.dumps(p) for p in prompts}) == 4 and set(rollout[0]["columns"]) == {"solution"}
    for c in rollout:
        for completion, ids in zip(c["completions"], c["completion_ids"]):
            assert completion[0]["role"] == "assistant" and len(completion) == 1
            assert (ids[-1] == TOY_EOS and TOY_EOS not in ids[:-1]) or (len(ids) == 5 and TOY_EOS not in ids)
    lengths = [len(ids) for c in rollout for ids in c["completion_ids"]]
    assert run.metrics["objective/score"] == pytest.approx(sum(lengths) / 16)
    assert run.metrics["rollout/length"] == pytest.approx(sum(lengths) / 16)


def test_each_step_optimises_its_weighted_token_losses(train_run, monkeypatch):
    """DAPO's options (beta 0, clip-higher, the group filter, overlong masking): the loss of an optimizer step is
    sum_it w_it l_it over its 8 responses, its micro-batches' parts adding up, and dapo's weights sum to 1 over each
    step (one over the step's loss tokens). beta = 0 loads no reference model."""
    seen, real = [], grpo.loss_weights
    monkeypatch.setattr(grpo, "loss_weights", lambda *a: seen.append((a[0], real(*a))) or seen[-1][1])
    monkeypatch.setattr(grpo, "load_reference", lambda *a: pytest.fail("beta = 0 needs no reference model"))
    run = train_run(fresh=True, num_rollouts=2, eval_steps=0, save_steps=0, beta=0.0, loss_type="dapo",
                    epsilon_high=0.28, filter_groups=True, mask_truncated_completions=True, max_new_tokens=3)
    assert len(seen) == 8  # 2 rollouts x 2 passes x 2 minibatches
    for mask, weights in seen:
        assert weights.shape[0] == 8
        assert weights.sum().item() == pytest.approx(1.0 if mask.any() else 0.0)
    assert "objective/kl" not in run.metrics and 0 < run.metrics["rollout/no_eos"] < 1


def test_dr_grpo_with_the_kl_in_the_reward(train_run):
    run = train_run(fresh=True, num_rollouts=2, eval_steps=0, save_steps=0, loss_type="dr_grpo",
                    scale_rewards="none", kl_in="reward")
    assert run.metrics["objective/kl"] > 0 and run.metrics["train/lr"] == 0.0


def test_saved_model_loads_and_resuming_replays_the_run(train_run):
    full = train_run()
    resumed = train_run(fresh=True, resume_from=str(full.out / "checkpoint-2"))
    assert_same_weights(full.out, resumed.out)
    assert {k: v for k, v in resumed.metrics.items() if not k.startswith(("perf/", "time/"))} == {
        k: v for k, v in full.metrics.items() if not k.startswith(("perf/", "time/"))}
    for path in (full.out, full.out / "checkpoint-2"):
        AutoModelForCausalLM.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    assert "eval/score" in full.metrics and full.metrics["train/episodes"] == 64


def test_same_seed_same_weights(train_run):
    assert_same_weights(train_run().out, train_run(fresh=True).out)


@pytest.mark.parametrize("flags, match", [
    (dict(num_generations=1), "--num_generations must be >= 2"),
    (dict(epsilon_high=-0.1), "must be >= 0"),
    (dict(num_iterations=0), "--num_iterations must be >= 1"),
])
def test_bad_flags_are_named(flags, match):
    with pytest.raises(grpo.UsageError, match=match):
        grpo.Args(**flags)


@pytest.mark.parametrize("spec, match", [
    ("no_colon", "expected 'file.py:function'"),
    ("missing.py:f", "no file"),
    ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
    ("toy_world/world.py:nothing", "has no function 'nothing'"),
])
def test_bad_reward_function_names(spec, match):
    with pytest.raises(grpo.UsageError, match=match):
        grpo.load_reward_function(spec)


def test_a_reward_file_imports_the_files_beside_it(tmp_path):
    """A reward file that imports a module beside it runs as a script would, from any working directory (it failed
    with a ModuleNotFoundError)."""
    (tmp_path / "grading_helpers_beside.py").write_text("def length(text):\n    return float(len(text))\n")
    (tmp_path / "scorer.py").write_text("from grading_helpers_beside import length\n\n\n"
                                        "def score(completions, **kwargs):\n"
                                        "    return [length(c) for c in completions]\n")
    reward_fn = grpo.load_reward_function(f"{tmp_path / 'scorer.py'}:score")
    assert grpo.function_rewards(reward_fn, [{"prompt": "a"}, {"prompt": "b"}], ["x", "yyy"], [[1], [2]]).tolist() == [
        1.0, 3.0]


@pytest.mark.parametrize("returned, match", [
    ([1.0], "should return a list of 2 floats"),
    ("ab", "should return a list of 2 floats"),
    ([1.0, float("nan")], r"returned nan for completion 1 \('y'\)"),
    ([1.0, None], "returned None for completion 1"),
])
def test_bad_rewards_are_named(returned, match):
    def scorer(**kwargs):
        return returned

    with pytest.raises(grpo.UsageError, match="scorer " + match):
        grpo.function_rewards(scorer, [{"prompt": "a"}, {"prompt": "b"}], ["x", "y"], [[1], [2]])


def test_a_dataset_of_its_own_needs_a_reward(toy_dirs):
    with pytest.raises(grpo.UsageError, match="needs --reward_fn or --reward_model_path"):
        grpo.train(grpo.Args(model_name_or_path=str(toy_dirs.model), dataset_name=str(toy_dirs.prompts), device="cpu"))


def test_help_lists_the_method_flags(monkeypatch, capsys):
    out = help_text("grpo.py", monkeypatch, capsys)
    for flag in ("--num_generations", "--loss_type", "--scale_rewards", "--beta", "--kl_in", "--epsilon",
                 "--epsilon_high", "--filter_groups", "--mask_truncated_completions", "--reward_fn",
                 "--reward_model_path", "--num_iterations"):
        assert flag in out


def test_a_reward_model_and_a_function_add_up(train_run, toy_dirs, spy, monkeypatch):
    """With both, a response's score is the reward model's plus the function's (here its length): the same seed
    samples the same first rollout with the reward model alone and with both."""
    scores, spied = [], spied_calls(monkeypatch)
    real = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda r, *a: scores.append(r.clone()) or real(r, *a))
    for reward_fn in (None, f"{spy / 'spy.py'}:reward"):
        train_run(fresh=True, num_rollouts=1, eval_steps=0, save_steps=0, reward_model_path=str(toy_dirs.rm),
                  reward_fn=reward_fn, dataset_name=str(spy / "prompts"), beta=0.0)
    lengths = torch.tensor([float(len(ids)) for call in spied[0][:3] for ids in call["completion_ids"]])
    assert len(spied) == 1 and scores[1].tolist() == pytest.approx((scores[0] + lengths).tolist(), abs=1e-5)
    assert scores[0].std() > 0  # the random-head reward model scores responses apart
