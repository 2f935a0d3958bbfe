"""spin.py's data, self-play generation and loop: SFT formats and named errors, the opponent's log-probs, what each
iteration saves, resuming at an iteration, determinism, the previous-iteration flag, non-finite steps and the command
line. Helpers it shares with dpo.py and ppo_rlhf.py are byte-identical copies
(test_copies_identical.py), tested there."""

import json

import pytest
import torch
import wandb
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import spin
from helpers import (
    N_TEST,
    N_TRAIN,
    assert_same_weights,
    cached_runner,
    direct_logp,
    python,
    softplus,
    toy_chat_ids,
    wandb_offline_log,
)

BASE = dict(num_iterations=2, previous_iteration_data=False, max_steps=2, per_device_train_batch_size=16,
            per_device_eval_batch_size=16, logging_steps=1000, device="cpu")


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_model_dir, sft_dir):
    """train_run(fresh=False, **overrides): spin.train on the snapshots, 2 iterations of 2 steps
    (helpers.cached_runner)."""
    return cached_runner(spin, tmp_path_factory, **BASE, model_name_or_path=str(toy_model_dir),
                         dataset_name=str(sft_dir))


def without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def wrap_loss(monkeypatch, edit=lambda call, losses: losses) -> list:
    """Route spin_loss through `edit` on training calls (those with gradients); record their tensor inputs."""
    calls, real = [], spin.spin_loss

    def wrapped(*tensors, **kwargs):
        out = real(*tensors, **kwargs)
        if tensors[0].requires_grad:
            calls.append([t.detach().clone() for t in tensors if torch.is_tensor(t)])
            out = (edit(len(calls), out[0]), *out[1:])
        return out

    monkeypatch.setattr(spin, "spin_loss", wrapped)
    return calls


# --------------------------------------------------------------------------- data
def rows_of(texts, tokenizer):
    return spin.tokenize_sft(Dataset.from_list(texts), tokenizer, 512, 256, 5, "train")


def test_the_three_sft_layouts_give_the_same_tokens(toy_tokenizer):
    """Conversational prompt/completion and a `messages` column render through the chat template alike; text
    prompt/completion, written as the template would render it, tokenizes to the same real sequence."""
    chat = [{"prompt": [{"role": "user", "content": "how was the food ?"}],
             "completion": [{"role": "assistant", "content": "great food"}]}]
    messages = [{"messages": chat[0]["prompt"] + chat[0]["completion"]}]
    text = [{"prompt": "<|user|> how was the food ? <|assistant|>", "completion": " great food <|end|>"}]
    a, b, c = (rows_of(x, toy_tokenizer)[0] for x in (chat, messages, text))
    assert a["real"] == b["real"] == c["real"] and a["prompt"] == b["prompt"] == c["prompt"]
    assert toy_tokenizer.decode(a["real"][a["real_start"]:]) == "great food <|end|>"


@pytest.mark.parametrize("row, match", [
    ({"prompt": [{"role": "user", "content": "how was the food ?"}], "completion": "great food"},
     "row 0: column 'completion' should be a list"),
    ({"messages": [{"role": "user", "content": "how was the food ?"}]}, "row 0: 'messages' should be a list of"),
])
def test_malformed_rows_stop_naming_row_and_column(toy_tokenizer, row, match):
    with pytest.raises(ValueError, match=match):
        rows_of([row], toy_tokenizer)


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="has no column 'completion' and no 'messages' column"):
        spin.check_sft_columns(Dataset.from_dict({"prompt": ["x"], "answer": ["y"]}), "mine")


def test_empty_rows_are_counted(toy_tokenizer, capsys):
    rows = rows_of([{"prompt": "", "completion": "a"}, {"prompt": "how was the food ?", "completion": "good"}],
                   toy_tokenizer)
    out = capsys.readouterr().out
    assert len(rows) == 1 and "train: 1 SFT rows kept of 2" in out and "empty prompt or answer: 1" in out


# --------------------------------------------------------------------------- self-play
def test_generations_are_the_opponents_samples_and_reproducible(toy_model_dir, toy_tokenizer, sft_dir):
    """Each pair is (real, generated) with the generation after the prompt, at most max_new_tokens long, ending at
    <eos> when it has one; the same (seed, iteration) regenerates the same data, another iteration other data."""
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    sft = spin.tokenize_sft(spin.load_splits(str(sft_dir), None, "train", "test", 0, 1)[0], toy_tokenizer, 512, 256,
                            5, "train")
    args = spin.Args(device="cpu")
    runtime = spin.Runtime(0, 1, torch.device("cpu"), bf16=False)
    make = lambda t: spin.self_play_pairs(spin.Forward(model), sft, toy_tokenizer, 0, args, t, "train", runtime)  # noqa: E731
    (pairs, stats), (again, _), (other, _) = make(0), make(0), make(1)
    assert [p["rejected"] for p in pairs] == [p["rejected"] for p in again] != [p["rejected"] for p in other]
    eos = toy_tokenizer.eos_token_id
    for p, row in zip(pairs, sft):
        gen = p["rejected"][p["rejected_start"]:]
        assert p["chosen"] == row["real"] and p["rejected"][: p["rejected_start"]] == row["prompt"]
        assert 1 <= len(gen) <= args.max_new_tokens and (eos not in gen or gen.index(eos) == len(gen) - 1)
    assert stats["generation/length"] == pytest.approx(sum(len(p["rejected"]) - p["rejected_start"] for p in pairs)
                                                       / len(pairs))


def test_each_iteration_starts_at_the_opponent(train_run, monkeypatch):
    """The opponent is the model as the iteration starts, so every pair's first-step loss is log 2 (h = 0)."""
    calls = wrap_loss(monkeypatch)
    train_run(fresh=True)
    for first in (calls[0], calls[2]):  # the first step of iterations 0 and 1
        real, gen, opp_real, opp_gen = first
        torch.testing.assert_close(real, opp_real, rtol=0, atol=1e-5)
        torch.testing.assert_close(gen, opp_gen, rtol=0, atol=1e-5)
    assert not torch.allclose(calls[3][0], calls[3][2], atol=1e-4)  # within an iteration the policy moves away


# --------------------------------------------------------------------------- the loop
def test_each_iteration_is_saved_and_loads(train_run):
    run = train_run()
    for k in (1, 2):
        path = run.out / f"iteration-{k}"
        assert json.loads((path / "spin_state.json").read_text()) == {"next_iteration": k}
        AutoModelForCausalLM.from_pretrained(path)
        lines = [json.loads(line) for line in (path / "generated.jsonl").read_text().splitlines()]
        assert len(lines) == N_TRAIN and set(lines[0]) == {"prompt", "real", "generated"}
    assert_same_weights(run.out, run.out / "iteration-2")
    first, second = (load_file(run.out / f"iteration-{k}" / "model.safetensors") for k in (1, 2))
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_resume_at_an_iteration_replays_the_run(train_run, capsys):
    full = train_run()
    first = train_run(fresh=True, num_iterations=1)
    resumed = train_run(fresh=True, resume_from=str(first.out / "iteration-1"))
    assert f"resumed from {first.out / 'iteration-1'}: iteration 1 next" in capsys.readouterr().out
    assert_same_weights(full.out, resumed.out)
    assert without_timing(resumed.metrics) == without_timing(full.metrics)


def test_same_seed_same_weights(train_run):
    assert_same_weights(train_run().out, train_run(fresh=True).out)


def test_previous_iteration_data_doubles_the_second_iteration(train_run, monkeypatch, capsys):
    calls = wrap_loss(monkeypatch)
    train_run(fresh=True, previous_iteration_data=True, max_steps=-1, num_train_epochs=1)
    out = capsys.readouterr().out
    assert f"iteration 0: training on {N_TRAIN} pairs (0 from iteration -1)" in out
    assert f"iteration 1: training on {2 * N_TRAIN} pairs ({N_TRAIN} from iteration 0)" in out
    assert len(calls) == N_TRAIN // 16 + 2 * N_TRAIN // 16  # one epoch each


def test_metrics(train_run, monkeypatch, sft_dir):
    """The last iteration's metrics, recomputed: its generation statistics from the pairs it generated, and its final
    evaluation by hand, each held-out pair (the real answer, its ids written out from the text, and the opponent's
    generation) scored by plain forwards of the final model and of the opponent pi_1 (saved as iteration-1):
    rewards beta log pi/pi_1, the loss -log sigmoid(margin), the accuracy."""
    made, real_self_play = [], spin.self_play_pairs
    monkeypatch.setattr(spin, "self_play_pairs", lambda *a, **k: made.append(real_self_play(*a, **k)) or made[-1])
    run = train_run(fresh=True)
    m, beta, eos = run.metrics, run.args.beta, AutoTokenizer.from_pretrained(run.out).eos_token_id
    assert m["train/iteration"] == 1
    for split in ("train", "eval"):
        assert m[f"{split}/rewards/margin"] == pytest.approx(
            m[f"{split}/rewards/real"] - m[f"{split}/rewards/generated"], abs=1e-6)
    (train_pairs, _), (eval_pairs, _) = made[-2:]  # iteration 1: its train pairs, then its eval pairs
    generated = [p["rejected"][p["rejected_start"]:] for p in train_pairs]
    assert len(train_pairs) == N_TRAIN and len(eval_pairs) == N_TEST
    assert m["generation/identical"] == sum(p["rejected"] == p["chosen"] for p in train_pairs) / N_TRAIN
    assert m["generation/length"] == pytest.approx(sum(map(len, generated)) / N_TRAIN, abs=1e-12)
    assert m["generation/no_eos"] == sum(eos not in g for g in generated) / N_TRAIN
    policy, opponent = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (run.out, run.out / "iteration-1"))
    rows = [json.loads(line) for line in (sft_dir / "test.jsonl").read_text().splitlines()]
    logps, margins = {"real": [], "generated": []}, []
    for pair, row in zip(eval_pairs, rows):
        prompt_ids, answer_ids = toy_chat_ids(row["prompt"][0]["content"], row["completion"][0]["content"])
        assert pair["chosen"] == prompt_ids + answer_ids and pair["rejected"][: len(prompt_ids)] == prompt_ids
        rewards = {}
        for side, answer in (("real", answer_ids), ("generated", pair["rejected"][len(prompt_ids):])):
            mine = direct_logp(policy, prompt_ids, answer)
            logps[side].append(mine)
            rewards[side] = beta * (mine - direct_logp(opponent, prompt_ids, answer))
        margins.append((rewards["real"], rewards["generated"]))
    assert min(abs(r - g) for r, g in margins) > 1e-5  # no pair on the fence: the accuracy is exact
    want = {"eval/loss": sum(softplus(g - r) for r, g in margins) / N_TEST,
            "eval/rewards/accuracy": sum(r > g for r, g in margins) / N_TEST,
            "eval/rewards/real": sum(r for r, _ in margins) / N_TEST,
            "eval/rewards/generated": sum(g for _, g in margins) / N_TEST,
            "eval/logps/real": sum(logps["real"]) / N_TEST, "eval/logps/generated": sum(logps["generated"]) / N_TEST}
    assert {k: m[k] for k in want} == pytest.approx(want, abs=1e-5)


def test_non_finite_loss_stops_and_names_the_last_iteration(train_run, monkeypatch, tmp_path):
    wrap_loss(monkeypatch, lambda call, losses: losses * float("nan") if call == 4 else losses)
    with pytest.raises(FloatingPointError, match="loss is nan at step 1 of iteration 1") as info:
        train_run(fresh=True, output_dir=str(tmp_path / "run"))
    assert str(tmp_path / "run" / "iteration-1") in str(info.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow  # starts a process: `python spin.py --help`
def test_help_lists_the_method_flags_and_import_is_silent():
    result = python("spin.py", "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: spin.py")
    assert all(f in result.stdout for f in ("--beta", "--num_iterations", "--previous_iteration_data",
                                            "--max_new_tokens", "--temperature"))


@pytest.mark.slow  # starts a process: `python spin.py --max_steps 5 --num_iterations 2`
def test_default_command_runs(tmp_path):
    """The default command on the whole toy world, 2 iterations of 5 steps (the full default run:
    benchmarks/toy_defaults.py)."""
    result = python("spin.py", "--max_steps", "5", "--num_iterations", "2", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train: 2048 SFT rows kept of 2048" in result.stdout and "iteration 1, step 5:" in result.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.slow  # starts a process: wandb.init launches the wandb-core service
def test_track_logs_metrics_and_sample_generations_to_wandb_offline(train_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # wandb keeps the settings of an earlier run in this process (its directory included)
    train_run(fresh=True, track=True)
    wandb_offline_log(tmp_path, ("train/rewards/real", "train/iteration", "eval/rewards/margin", "generation/identical",
                                 "previous_iteration_data"),
                      files=("wandb/offline-run-*/files/media/table/generation/samples_*.table.json",))


def test_merge_lora_writes_the_final_models_merged_copy_only(train_run):
    """With --lora_r --merge_lora every iteration directory also got a merged float32 copy of the base, T + 1 copies in
    all (28 GB each for a 7B model). Only output_dir/merged is written now, and it holds the final adapter merged: the
    same log-probs as the adapter itself."""
    run = train_run(lora_r=8, merge_lora=True, learning_rate=3e-3)
    assert (run.out / "merged" / "model.safetensors").is_file()
    assert not any((run.out / f"iteration-{k}" / "merged").exists() for k in (1, 2))
    assert (run.out / "iteration-2" / "adapter_model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(run.out)
    prompt, answer = toy_chat_ids("how was the food ?", "great food")
    adapter, merged = (AutoModelForCausalLM.from_pretrained(path).eval() for path in (run.out, run.out / "merged"))
    assert tokenizer.eos_token_id == answer[-1]
    assert direct_logp(merged, prompt, answer) == pytest.approx(direct_logp(adapter, prompt, answer), abs=1e-5)
