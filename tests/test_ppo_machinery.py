"""The machinery of ppo_rlhf.py: truncation after EOS, left-padded generation and log-probs against unbatched
computations, reward scores against the reward model's own forward, prompt formats, bad inputs, and what the training
loop promises about saving, resuming, non-finite steps, the RLOO mode and wandb. (The method's math has its own tests:
test_ppo_loss.py, test_ppo_bandit.py.)

Everything runs on CPU with the toy world's model copied once per module and a reward model with a random, seeded
head made from it (conftest's toy_dirs), so no test depends on a trained reward model or on what any model has learnt.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import wandb
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

import ppo_rlhf as ppo
from helpers import (
    CONFIGS,
    ROOT,
    TINY,
    TOY,
    assert_same_weights,
    cached_runner,
    help_text,
    relative_gap,
    wandb_offline_log,
)

# --------------------------------------------------------------------------- shared fixtures
# 8 prompts a rollout in chunks of 3 (so chunks stop generating at different widths), 2 minibatches of 2 micro-batches
BASE_ARGS = dict(num_rollouts=4, save_steps=2, rollout_batch_size=8, per_device_train_batch_size=2,
                 gradient_accumulation_steps=2, num_ppo_epochs=2, forward_batch_size=3, eval_steps=2,
                 logging_steps=1000, learning_rate=1e-3, device="cpu")


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, toy_dirs):
    """train_run(fresh=False, **overrides): ppo.train on the snapshots (helpers.cached_runner)."""
    return cached_runner(ppo, tmp_path_factory, **BASE_ARGS, model_name_or_path=str(toy_dirs.model),
                         reward_model_path=str(toy_dirs.rm), dataset_name=str(toy_dirs.prompts))


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(("perf/", "time/"))}


# --------------------------------------------------------------------------- 1. truncation after EOS
E, P = 9, 0  # eos and pad ids in these cases


@pytest.mark.parametrize("sampled, kept, has_eos", [
    ([5, 6, E, 7, E], [5, 6, E, P, P], True),  # cut after the first EOS, later ones included
    ([E, 5, 6, 7, 8], [E, P, P, P, P], True),  # an empty answer is its EOS alone
    ([5, 6, 7, 8, 4], [5, 6, 7, 8, 4], False),  # no EOS within the budget: kept whole
    ([5, 6, 7, 8, E], [5, 6, 7, 8, E], True),
])
def test_truncate_after_eos(sampled, kept, has_eos):
    responses, mask, eos = ppo.truncate_after_eos(torch.tensor([sampled, [1, 2, 3, 4, 5]]), E, P)
    assert responses[0].tolist() == kept and responses[1].tolist() == [1, 2, 3, 4, 5]
    assert mask[0].tolist() == [i <= kept.index(E) if has_eos else True for i in range(5)]
    assert eos.tolist() == [has_eos, False]


# --------------------------------------------------------------------------- 2. left padding against unbatched passes
# CONFIGS: tiny random Llama (untied head), Gemma 2 (soft-capped logits), Granite and Cohere (scaled logits): every
# branch of lm_logits. TINY is their shared size, pad 0, eos 2. They all use rotary embeddings, which see only position
# differences, so a left-padded row whose positions were not shifted back to 0 would still score the same: GPT-2's
# absolute position embeddings are what catch that.
MODELS = {**CONFIGS, "gpt2": lambda: GPT2Config(vocab_size=37, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                bos_token_id=1, eos_token_id=2, pad_token_id=0)}


@pytest.fixture(scope="module", params=["toy", *MODELS])
def causal_lm(request, toy_dirs):
    if request.param == "toy":
        return AutoModelForCausalLM.from_pretrained(toy_dirs.model).eval()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MODELS[request.param]()).eval()
    if request.param == "gpt2":  # large position embeddings, so that a position off by the padding changes the argmax
        model.transformer.wpe.weight.data.mul_(25.0)
    return model


PROMPT_LENGTHS, RESPONSE_LENGTHS = [1, 4, 2, 7], [3, 1, 5, 2]


def random_rollout(vocab_size: int, pad_id: int = 0):
    """Left-padded queries and right-padded responses of different lengths, random ids (never pad)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    responses = [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in RESPONSE_LENGTHS]
    query, query_mask = ppo.left_pad(prompts, pad_id)
    width = max(RESPONSE_LENGTHS) + 1  # one all-padding column, which the passes cut
    response = torch.full((len(responses), width), pad_id)
    mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for b, r in enumerate(responses):
        response[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), True
    return prompts, responses, (query, query_mask, response, mask)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_left_padded_logps_match_unbatched(causal_lm, temperature):
    prompts, responses, batch = random_rollout(causal_lm.config.vocab_size)
    with torch.no_grad():
        logps, entropy = ppo.response_logps(causal_lm, *batch, temperature, with_entropy=True)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            # (len(r), V)
            logits = causal_lm(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : -1].float() / temperature
            logp = logits.log_softmax(-1)
            want = torch.zeros(batch[2].shape[1])
            want[: len(r)] = logp.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            want_entropy = torch.zeros(batch[2].shape[1])
            want_entropy[: len(r)] = -(logp.exp() * logp).sum(-1)
            # float32 log-softmax of <= 7-token rows: rounding ~1e-6; a shifted position or a prompt token is >= 1e-2
            torch.testing.assert_close(logps[b], want, rtol=0, atol=1e-5)
            torch.testing.assert_close(entropy[b], want_entropy, rtol=0, atol=1e-5)


def test_batched_generation_matches_unbatched_greedy(causal_lm):
    """At a temperature near 0, sampling with left padding and the KV cache gives each prompt's greedy answer,
    computed here one prompt at a time by full forwards without a cache."""
    prompts, _, (query, query_mask, _, _) = random_rollout(causal_lm.config.vocab_size)
    sampled = ppo.generate(causal_lm, query, query_mask, 6, 1e-6, eos_ids=[-1], uniforms=torch.rand(len(query), 6))
    for b, p in enumerate(prompts):
        ids = list(p)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(causal_lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert sampled[b].tolist() == ids[len(p) :]


def test_generation_stops_once_every_row_has_an_eos(toy_dirs):
    model = AutoModelForCausalLM.from_pretrained(toy_dirs.model).eval()
    query, query_mask = ppo.left_pad([[2, 6, 7, 3], [2, 3]], toy_dirs.tokenizer.pad_token_id)
    eos = toy_dirs.tokenizer.eos_token_id
    out = ppo.generate(model, query, query_mask, 50, 1.0, eos,
                       torch.rand(len(query), 50, generator=torch.Generator().manual_seed(0)))
    assert out.shape[1] < 50 and (out == eos).any(-1).all() and (out[:, -1] == eos).any()


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_reward_scores_match_the_reward_models_own_forward(pad_is_eos):
    """reward_scores reads the score where model(**inputs).logits does (reward_model.py trains it there): the EOS, or,
    where pad and eos are one token, the token before it."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "pad_token_id": 2 if pad_is_eos else 0}, num_labels=1)
    rm = LlamaForSequenceClassification(config).eval()
    prompts, responses, (query, query_mask, response, mask) = random_rollout(config.vocab_size,
                                                                             pad_id=config.pad_token_id)
    for b, r in enumerate(responses):
        response[b, len(r) - 1] = 2  # every response ends with its EOS
    with torch.no_grad():
        scores = ppo.reward_scores(rm, query, query_mask, response, mask)
        want = [rm(input_ids=torch.tensor([p + response[b, : len(r)].tolist()])).logits[0, 0]
                for b, (p, r) in enumerate(zip(prompts, responses))]
    torch.testing.assert_close(scores, torch.stack(want), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- 3. prompts
def test_prompt_formats_give_identical_ids(toy_dirs, capsys):
    tok = toy_dirs.tokenizer
    messages = [[{"role": "user", "content": "how was the food ?"}],
                [{"role": "user", "content": "was the trip good ?"}]]
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages]
    conversational = ppo.tokenize_prompts(Dataset.from_dict({"prompt": messages}), tok, 256, "train")
    assert conversational == ppo.tokenize_prompts(Dataset.from_dict({"prompt": texts}), tok, 256, "train")
    assert tok.convert_ids_to_tokens(conversational[0]) == ["<|user|>", "how", "was", "the", "food", "?",
                                                            "<|assistant|>"]
    # keeps the end
    assert ppo.tokenize_prompts(Dataset.from_dict({"prompt": texts}), tok, 3, "train")[0] == conversational[0][-3:]
    assert "train: 2 prompts kept of 2; 2 truncated to their last 3 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("data, match", [
    ({"question": ["how ?"]}, "no column 'prompt'"),
    ({"prompt": [3]}, "should be a string or a list"),
    ({"prompt": [""]}, "no usable prompts"),
])
def test_bad_prompts_raise(toy_dirs, data, match):
    with pytest.raises(ValueError, match=match):
        ppo.tokenize_prompts(Dataset.from_dict(data), toy_dirs.tokenizer, 256, "train")


# --------------------------------------------------------------------------- 4. training runs
def test_saved_models_load(train_run, toy_dirs):
    run = train_run()
    for path in (run.out, run.out / "checkpoint-2"):
        assert json.loads((path / "args.json").read_text()) == asdict(run.args)
        AutoModelForCausalLM.from_pretrained(path)
        assert AutoTokenizer.from_pretrained(path).get_vocab() == toy_dirs.tokenizer.get_vocab()
        value_model = AutoModelForSequenceClassification.from_pretrained(path / "value_model")
        saved = load_file(path / "value_model" / "model.safetensors")
        assert all(torch.equal(value_model.state_dict()[name], w) for name, w in saved.items())
    assert (run.out / "checkpoint-2" / "training_state.pt").exists() and not (run.out / "training_state.pt").exists()
    for before, after in ((toy_dirs.model, run.out), (toy_dirs.rm, run.out / "value_model")):  # both trained
        a, b = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_metrics_are_logged_under_their_names(train_run, capsys):
    metrics = train_run().metrics
    for key in ("objective/kl", "objective/score", "objective/rlhf_reward", "objective/entropy", "policy/approxkl",
                "policy/clipfrac", "loss/policy", "loss/value", "val/error", "perf/tokens_per_sec", "train/lr",
                "train/grad_norm", "time/generate", "time/update", "eval/score"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["objective/rlhf_reward"] == pytest.approx(metrics["objective/score"]
                                                             - train_run().args.beta * metrics["objective/kl"])
    assert metrics["objective/kl"] != 0 and metrics["policy/approxkl"] > 0  # the policy moved away from the reference


def test_resume_replays_the_run_exactly(train_run, capsys):
    full = train_run()
    checkpoint = full.out / "checkpoint-2"
    resumed = train_run(fresh=True, resume_from=str(checkpoint))
    assert f"resumed from {checkpoint} at step 2" in capsys.readouterr().out
    assert_same_weights(full.out, resumed.out)
    assert_same_weights(full.out / "value_model", resumed.out / "value_model")
    assert without_timings(full.metrics) == without_timings(resumed.metrics)


def test_accumulation_splits_do_not_change_the_update(train_run):
    """Losses are token means over the minibatch whatever its micro-batches: 2 x 2 and 1 x 4 give the same run, up to
    float32 rounding (measured gap 7.8e-6 of the distance trained; a weight-by-weight atol of 1e-5 sat at the rounding
    edge)."""
    a, b = train_run(), train_run(gradient_accumulation_steps=1, per_device_train_batch_size=4)
    assert relative_gap(a.out, b.out, Path(a.args.model_name_or_path)) < 1e-4


@pytest.mark.parametrize("bad_call, last_good", [(21, 2), (1, None)])
def test_non_finite_loss_stops_and_names_the_last_checkpoint(train_run, monkeypatch, tmp_path, bad_call, last_good):
    """8 micro-batches a rollout: call 21 is in rollout 2 (counted from 0, so after checkpoint-2), call 1 in
    rollout 0."""
    calls, real = [], ppo.ppo_policy_loss

    def poisoned(*args, **kwargs):
        calls.append(1)
        losses, clipped, approxkl = real(*args, **kwargs)
        return (losses * float("nan") if len(calls) == bad_call else losses), clipped, approxkl

    monkeypatch.setattr(ppo, "ppo_policy_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=f"loss is nan at rollout {(bad_call - 1) // 8}") as info:
        train_run(fresh=True, output_dir=str(out))
    assert not (out / "model.safetensors").exists()
    assert (str(out / f"checkpoint-{last_good}") if last_good else "none saved") in str(info.value)


@pytest.mark.parametrize("config", [{"advantage_estimator": "rloo", "rloo_k": 2},
                                    {"value_model_init": "policy", "kl_estimator": "k3"}],
                         ids=["rloo", "value_from_policy-k3"])
def test_options_run(train_run, config, monkeypatch):
    """Each option reaches the code it names: the estimator kl_per_token is called with, the model the critic starts
    from."""
    estimators, loaded = [], []
    real_kl, real_load = ppo.kl_per_token, ppo.AutoModelForSequenceClassification.from_pretrained
    monkeypatch.setattr(ppo, "kl_per_token", lambda *a: estimators.append(a[2]) or real_kl(*a))
    monkeypatch.setattr(ppo.AutoModelForSequenceClassification, "from_pretrained",
                        lambda path, **kw: loaded.append(path) or real_load(path, **kw))
    run = train_run(fresh=True, num_rollouts=2, save_steps=0, **config)
    rloo = config.get("advantage_estimator") == "rloo"
    assert (run.out / "value_model").exists() == (not rloo)
    assert ("loss/value" in run.metrics) == (not rloo)
    assert set(estimators) == {config.get("kl_estimator", "k1")}
    if rloo:
        assert run.metrics["train/episodes"] == 2 * BASE_ARGS["rollout_batch_size"] * 2
        assert loaded == [run.args.reward_model_path]  # the reward model only: no critic
    else:
        assert loaded == [run.args.reward_model_path, run.args.model_name_or_path]  # the critic starts from the policy
        assert run.metrics["objective/kl"] >= 0  # k3 is non-negative token by token


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalised"])
def test_rloo_advantages_reach_the_loss_unwhitened(train_run, monkeypatch, normalize):
    """Issue 17, defect 6. Every token of a response gets its leave-one-out advantage, R_i minus the other answer's
    return (k = 2), computed here from the rollout's own per-token rewards; with --rloo_normalize_advantages, divided
    by their std over the responses, each counted once. The advantages were whitened over tokens, which weighs each
    response by its length. Each micro-batch's rows are found in the rollout by their sampled log-probs."""
    seen = {}
    real_rewards, real_loss = ppo.token_rewards, ppo.ppo_policy_loss

    def token_rewards(*args, **kwargs):
        seen["rewards"], _ = out = real_rewards(*args, **kwargs)
        seen["mask"] = args[2]
        return out

    def ppo_policy_loss(logps, old_logps, advantages, cliprange):
        seen.setdefault("micro", []).append((old_logps.detach().clone(), advantages.detach().clone()))
        return real_loss(logps, old_logps, advantages, cliprange)

    monkeypatch.setattr(ppo, "token_rewards", token_rewards)
    monkeypatch.setattr(ppo, "ppo_policy_loss", ppo_policy_loss)
    monkeypatch.setattr(ppo, "kl_per_token", lambda logps, *a, real=ppo.kl_per_token: seen.update(logps=logps)
                        or real(logps, *a))
    train_run(fresh=True, num_rollouts=1, save_steps=0, eval_steps=0, advantage_estimator="rloo", rloo_k=2,
              rloo_normalize_advantages=normalize)
    mask, logps = seen["mask"], seen["logps"]
    returns = (seen["rewards"] * mask).sum(-1).tolist()
    assert len(set(mask.sum(-1).tolist())) > 1  # responses of different lengths, where whitening over tokens differs
    want = [returns[i] - returns[i ^ 1] for i in range(len(returns))]  # k = 2: rows 2g and 2g + 1 share a prompt
    if normalize:
        std = (sum(a * a for a in want) / (len(want) - 1)) ** 0.5
        want = [a / (std + 1e-8) for a in want]
    checked = set()
    for old_logps, advantages in seen["micro"]:
        for row_logps, row_advantages in zip(old_logps, advantages):
            (i,) = [i for i in range(len(logps)) if torch.equal(logps[i], row_logps)]
            torch.testing.assert_close(row_advantages, want[i] * mask[i].to(row_advantages.dtype), rtol=1e-5,
                                       atol=1e-6)
            checked.add(i)
    assert checked == set(range(len(logps)))


def test_r3_runs_without_a_reward_model_and_resumes_exactly(train_run, toy_dirs, monkeypatch, capsys):
    """--reward r3 on the toy world's relevance encoder and r3_prompts (half open-ended, half constrained): no reward
    model is read, the critic starts from the policy, R3's parts are logged and shown in the sample table, the
    constrained prompts are scored against their reference answers, and a resumed run replays the run."""
    loaded, scored = [], []
    real_load, real_scores = ppo.AutoModelForSequenceClassification.from_pretrained, ppo.r3_scores
    monkeypatch.setattr(ppo.AutoModelForSequenceClassification, "from_pretrained",
                        lambda path, **kw: loaded.append(path) or real_load(path, **kw))
    monkeypatch.setattr(ppo, "r3_scores", lambda *a: scored.append((a[2], a[3])) or real_scores(*a))
    r3 = dict(reward="r3", reward_model_path="no/such/reward/model", dataset_name=str(ROOT / "toy_world/r3_prompts"),
              query_type_column="query_type", relevance_model=str(ROOT / "toy_world/relevance_model"))
    full = train_run(fresh=True, **r3)
    assert loaded == [full.args.model_name_or_path]  # the critic, from the policy; no reward model
    for key in ("objective/relevance", "objective/length_incentive", "objective/repetition"):
        assert key in full.metrics and torch.isfinite(torch.tensor(full.metrics[key])), key
    assert "(prompt | response | score | relevance | length_incentive | repetition)" in capsys.readouterr().out
    queries = [q for picked, _ in scored for q in picked]
    assert {(q.text, q.open_ended) for q in queries} >= {("how was the food ?", True), ("was the film good ?", False)}
    assert all(q.reference == f"the {q.text.split()[2]} was good" for q in queries if not q.open_ended)
    resumed = train_run(fresh=True, resume_from=str(full.out / "checkpoint-2"), **r3)
    assert_same_weights(full.out, resumed.out)
    assert without_timings(full.metrics) == without_timings(resumed.metrics)


def test_rloo_needs_two_samples(train_run):
    with pytest.raises(ValueError, match="rloo_k >= 2"):
        train_run(fresh=True, advantage_estimator="rloo", rloo_k=1)


def test_resume_from_a_final_model_says_what_it_needs(train_run):
    with pytest.raises(ValueError, match="checkpoint directory written with --save_steps"):
        train_run(fresh=True, resume_from=str(train_run().out))


@pytest.mark.slow  # starts a process: wandb.init launches the wandb-core service
def test_track_logs_metrics_and_sample_table_to_wandb_offline(train_run, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.teardown()  # wandb keeps the settings of an earlier run in this process (its directory included)
    train_run(fresh=True, track=True, num_rollouts=2, save_steps=0)
    wandb_offline_log(tmp_path, ("objective/kl", "objective/rlhf_reward", "policy/clipfrac", "perf/tokens_per_sec",
                                 "eval/samples", "kl_estimator"),
                      files=("wandb/offline-run-*/files/media/table/eval/samples_*.table.json",))


# --------------------------------------------------------------------------- 5. the command line
def test_help_lists_the_method_flags(monkeypatch, capsys):
    out = help_text("ppo_rlhf.py", monkeypatch, capsys)
    for flag in ("--beta", "--kl_estimator", "--advantage_estimator", "--rloo_k", "--missing_eos_penalty",
                 "--value_model_init", "--reward", "--relevance_model", "--query_type_column", "--reference_column"):
        assert flag in out


@pytest.mark.slow  # starts a process: `python -c 'import ppo_rlhf'`
def test_import_is_silent():
    result = subprocess.run([sys.executable, "-c", "import ppo_rlhf"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def other_tokenizer_dir(path: Path) -> Path:
    """The toy tokenizer with two of its words' ids swapped: the same specials, another vocabulary."""
    source = AutoTokenizer.from_pretrained(TOY / "model")
    backend = json.loads(source.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    vocab["food"], vocab["trip"] = vocab["trip"], vocab["food"]
    other = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(backend)),
                                    eos_token=source.eos_token, pad_token=source.pad_token)
    other.save_pretrained(path)
    return path


def test_a_reward_model_with_another_tokenizer_is_refused_locally(tmp_path, toy_tokenizer):
    """The reward model scores the policy's token ids, so its own tokenizer must have the policy's vocabulary."""
    ppo.check_same_tokenizer(str(TOY / "model"), toy_tokenizer)  # the same: accepted
    with pytest.raises(ppo.UsageError, match="has another tokenizer than the policy"):
        ppo.check_same_tokenizer(str(other_tokenizer_dir(tmp_path / "rm")), toy_tokenizer)


@pytest.mark.slow  # starts a process, with a hub cache of its own
def test_a_hub_reward_model_with_another_tokenizer_is_refused(tmp_path):
    """A hub name is no local file: the check looked for tokenizer_config.json on disk only, so a reward model from
    the hub with another vocabulary scored the policy's ids as its own, without a word. Here the hub is an offline
    cache holding such a repository (someorg/other-rm), laid out as a download leaves it."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someorg--other-rm"
    snapshot = other_tokenizer_dir(repo / "snapshots" / commit)
    (snapshot / "config.json").write_text((TOY / "model" / "config.json").read_text())  # as a model repository has
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = ("import ppo_rlhf as p, transformers as t; "
            "p.check_same_tokenizer('someorg/other-rm', t.AutoTokenizer.from_pretrained('toy_world/model'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "has another tokenizer than the policy" in result.stderr, result.stderr[-2000:]
