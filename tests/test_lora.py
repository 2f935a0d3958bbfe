"""LoRA and the frozen weights' dtype (issue 18), through the shared machinery every script carries, on dpo.py's copy:
the reference is the policy with its adapter switched off, checkpointing still trains the adapter, what is saved
loads three ways to the same log-probs, and a resumed LoRA run replays the run exactly."""

import math
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

import dpo
from helpers import SHORT_RUN, cached_runner

CPU = dpo.Runtime(rank=0, world=1, device=torch.device("cpu"), bf16=False)


def lora_args(**overrides):
    fields = dict(lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_target_modules="all-linear", dtype="float32",
                  gradient_checkpointing=False, fsdp=False, ref_model_name_or_path=None, merge_lora=False,
                  attn_implementation="sdpa")
    return SimpleNamespace(**{**fields, **overrides})


@pytest.fixture(scope="module")
def batch(toy_tokenizer):
    ids = lambda text: toy_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = [toy_tokenizer.eos_token_id]
    prompts = ["how was the food ?", "was the film good ?", "how was the trip ?", "was the party good ?"]
    answers = [(" great food", " bad"), (" very good", " not good"), (" awful", " good trip"), (" good", " awful")]
    rows = []
    for i, (prompt, (chosen, rejected)) in enumerate(zip(prompts, answers)):
        p = ids(prompt)
        rows.append({"chosen": p + ids(chosen) + eos, "chosen_start": len(p), "rejected": p + ids(rejected) + eos,
                     "rejected_start": len(p), "index": i})
    return dpo.collate(rows, 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_zero_h_is_zero_and_the_loss_is_log_2(toy_model_dir, batch, dtype):
    """The disabled adapter is the reference. At step 0 the adapter adds exact zeros (B = 0), so h = 0 exactly, on a
    float32 or a bf16 base alike (policy and reference share it), and DPO's loss is log 2. No second model exists."""
    args = lora_args(dtype=dtype, model_name_or_path=str(toy_model_dir))
    policy = dpo.load_model(str(toy_model_dir), args, CPU, trained=True)
    reference = dpo.load_reference(args, CPU, policy)
    assert isinstance(reference, dpo.AdapterOff) and reference.policy is policy
    chosen, rejected = policy(dpo.pair_logps, batch)
    ref_chosen, ref_rejected = dpo.ref_pair_logps(reference, None, batch, "train", CPU)
    assert torch.equal(chosen.detach(), ref_chosen) and torch.equal(rejected.detach(), ref_rejected)
    losses, _, _ = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), rtol=0, atol=0)
    base_dtypes = {p.dtype for n, p in policy.named_parameters() if "lora_" not in n}
    adapter = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert base_dtypes == {dpo.DTYPES[dtype]}
    assert adapter and all("lora_" in n and p.dtype == torch.float32 for n, p in adapter.items())


def test_with_gradient_checkpointing_the_adapter_trains(toy_model_dir, batch):
    """PEFT with checkpointing can silently give no gradient when the inputs do not require grad. Here the adapter's
    gradient is nonzero at step 0 (its B factors'; A's is 0 while B = 0), and five AdamW steps lower the loss."""
    args = lora_args(gradient_checkpointing=True, model_name_or_path=str(toy_model_dir))
    policy = dpo.load_model(str(toy_model_dir), args, CPU, trained=True).train()
    reference = dpo.load_reference(args, CPU, policy)
    ref_chosen, ref_rejected = dpo.ref_pair_logps(reference, None, batch, "train", CPU)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(6):
        chosen, rejected = policy(dpo.pair_logps, batch)
        loss = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)[0].mean()
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
            assert sum(g.norm() ** 2 for n, g in grads.items() if "lora_B" in n) > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0] - 1e-3


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, data_dir, toy_model_dir):
    return cached_runner(dpo, tmp_path_factory, dataset_name=str(data_dir), model_name_or_path=str(toy_model_dir),
                         **SHORT_RUN, lora_r=8, learning_rate=3e-3)


def response_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(dpo.pair_logps(dpo.hf_model(model), batch))


def test_the_saved_adapter_and_the_merged_model_give_the_trained_log_probs(train_run, toy_model_dir, batch):
    """output_dir holds the adapter; --merge_lora also writes output_dir/merged, merged in float32. The adapter read
    back by the script's loader, by peft, and by transformers' own from_pretrained, and the merged plain model, give
    the same log-probs to 1e-5; and training moved them (the adapter is not a no-op)."""
    run = train_run(merge_lora=True)
    assert (run.out / "adapter_config.json").is_file() and not (run.out / "model.safetensors").exists()
    trained = dpo.unwrap(dpo.load_model(str(run.out), lora_args(), CPU, trained=True))
    expected = response_logps(trained, batch)
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_model_dir), str(run.out))
    by_transformers = AutoModelForCausalLM.from_pretrained(run.out)
    merged = AutoModelForCausalLM.from_pretrained(run.out / "merged")
    assert not hasattr(merged, "peft_config")  # a plain model: loads without peft
    for model in (by_peft, by_transformers, merged):
        torch.testing.assert_close(response_logps(model.eval(), batch), expected, rtol=0, atol=1e-5)
    start = response_logps(AutoModelForCausalLM.from_pretrained(toy_model_dir), batch)
    assert (expected - start).abs().max() > 1e-2


def test_a_resumed_lora_run_replays_the_run_exactly(train_run):
    """Six steps with a checkpoint at step 3, against the run resumed from it: the same adapter, bit for bit."""
    full = train_run()
    resumed = train_run(fresh=True, resume_from=str(full.out / "checkpoint-3"))
    a, b = (load_file(run.out / "adapter_model.safetensors") for run in (full, resumed))
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    same = lambda metrics: {k: v for k, v in metrics.items() if not k.startswith("perf/")}  # noqa: E731
    assert same(full.metrics) == same(resumed.metrics)


def test_ppo_trains_a_lora_policy_and_value_model_against_a_lora_reward_model(tmp_path, data_dir, toy_model_dir):
    """reward_model.py with --lora_r saves a classifier's adapter (and its config, for the head's size); PPO reads it
    as a frozen reward model (merged, in --dtype), trains its policy and value model as adapters on a bf16 base, and
    a checkpoint of both resumes."""
    import ppo_rlhf
    import reward_model

    reward_model.train(reward_model.Args(dataset_name=str(data_dir), model_name_or_path=str(toy_model_dir),
                                         max_steps=2, lora_r=8, eval_steps=0, output_dir=str(tmp_path / "rm"),
                                         device="cpu"))
    ppo_args = dict(model_name_or_path=str(toy_model_dir), reward_model_path=str(tmp_path / "rm"), num_rollouts=2,
                    rollout_batch_size=8, per_device_train_batch_size=4, lora_r=8, dtype="bfloat16", save_steps=1,
                    eval_steps=0, output_dir=str(tmp_path / "ppo"), device="cpu")
    full = ppo_rlhf.train(ppo_rlhf.Args(**ppo_args))
    for path in (tmp_path / "ppo", tmp_path / "ppo" / "value_model", tmp_path / "ppo" / "checkpoint-1" / "value_model"):
        assert (path / "adapter_model.safetensors").is_file(), path
    resumed = ppo_rlhf.train(ppo_rlhf.Args(**{**ppo_args, "output_dir": str(tmp_path / "again"),
                                              "resume_from": str(tmp_path / "ppo" / "checkpoint-1")}))
    assert resumed["objective/score"] == full["objective/score"] and resumed["loss/value"] == full["loss/value"]


def test_a_classifiers_trained_head_stays_float32_on_a_bf16_base(toy_model_dir, batch):
    """peft trains a sequence classifier's head (`score`: reward_model.py's, ppo_rlhf.py's value model) as a full copy.
    On a bf16 base that copy was bf16, and AdamW's first step at a real model's learning rate, 1e-5 a weight, is under
    half a unit in the last place of any bf16 weight of size 2^-8 or more (half a unit there: 2^-16 = 1.5e-5), so it
    rounded away: measured, 20 of the toy head's 128 weights moved (those under 2^-8, as N(0, 0.02) leads one to
    expect). The copy is float32, as every trained weight is, its input is cast to match (the CPU runs no autocast),
    and one step moves every weight of it. The base stays bf16."""
    args = lora_args(dtype="bfloat16")
    model = dpo.unwrap(dpo.load_model(str(toy_model_dir), args, CPU, trained=True,
                                      model_class=AutoModelForSequenceClassification, num_labels=1, pad_token_id=0))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    head = {n: p.detach().clone() for n, p in trained.items() if "score" in n}
    assert head and all(p.dtype == torch.float32 for p in trained.values())
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and "score" not in n}
    assert frozen == {torch.bfloat16}  # the base; its own head, the copy's original, is float32 too
    optimizer = torch.optim.AdamW(trained.values(), lr=1e-5)
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, 1)
    assert scores.dtype == torch.float32
    (scores[:4] - scores[4:]).sum().backward()
    optimizer.step()
    for name, before in head.items():
        assert (trained[name].detach() != before).all(), name


def test_a_lora_directory_trained_in_full_is_merged_in_float32_and_trains_every_weight(train_run, batch):
    """Without --lora_r, a directory holding an adapter is merged into its base in float32 and trained whole, also with
    --dtype bfloat16 (the dtype of frozen weights): every weight trainable and float32, with the log-probs of
    --merge_lora's merged copy. Frozen, the same directory is merged and cast to --dtype. (A trained one was cast and
    left frozen too, so ppo_rlhf.py's value model, which starts from the reward model, never trained on a LoRA one.)"""
    run = train_run(merge_lora=True)
    args = lora_args(lora_r=0, dtype="bfloat16")
    model = dpo.unwrap(dpo.load_model(str(run.out), args, CPU, trained=True))
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    merged = AutoModelForCausalLM.from_pretrained(run.out / "merged").eval()
    torch.testing.assert_close(response_logps(model, batch), response_logps(merged, batch), rtol=0, atol=1e-6)
    frozen = dpo.unwrap(dpo.load_model(str(run.out), args, CPU, trained=False))
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in frozen.parameters())


def test_a_lora_directory_as_the_policy_with_lora_r_is_refused(train_run, batch):
    """With --lora_r the reference is the policy with its adapter switched off. A run starting from a directory that
    holds an adapter trains that adapter on, so switching it off leaves the bare base, not the starting policy: h would
    not be 0 at step 0 (shown here). Refused, naming the way out; a named reference is taken."""
    run = train_run(merge_lora=True)
    args = lora_args(model_name_or_path=str(run.out))
    policy = dpo.load_model(str(run.out), args, CPU, trained=True)
    with torch.no_grad():
        gap = (torch.cat(policy(dpo.pair_logps, batch)) - torch.cat(dpo.AdapterOff(policy)(dpo.pair_logps, batch)))
    assert gap.abs().max() > 1e-2  # what the reference would get wrong
    with pytest.raises(dpo.UsageError, match="holds a LoRA adapter: with --lora_r the reference would be its base"):
        dpo.load_reference(args, CPU, policy)
    named = lora_args(model_name_or_path=str(run.out), ref_model_name_or_path=str(run.out / "merged"))
    reference = dpo.load_reference(named, CPU, policy)
    with torch.no_grad():  # the merged copy is the starting policy: h = 0 at step 0, to float32's rounding
        got, want = (torch.cat(model(dpo.pair_logps, batch)) for model in (reference, policy))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_an_adapter_for_another_kind_of_model_is_refused(train_run):
    """A causal LM's adapter (dpo.py's) cannot start a classifier (ppo_rlhf.py's value model from a LoRA policy): peft
    would fail deep inside with an AttributeError. Refused, naming the directory."""
    run = train_run(merge_lora=True)
    with pytest.raises(dpo.UsageError, match="holds a CAUSAL_LM adapter, which a .*ForSequenceClassification cannot"):
        dpo.load_model(str(run.out), lora_args(lora_r=0), CPU, trained=True,
                       model_class=AutoModelForSequenceClassification, num_labels=1, pad_token_id=0)


def test_every_module_peft_trains_whole_is_float32(tmp_path):
    """peft trains whole each module of a classifier whose name ends in "classifier" or "score": DistilBERT's
    `pre_classifier` as well as its `classifier` (a tiny one, built here). Both copies are float32 on a bf16 base, and
    the model runs on the CPU. (all-linear would put LoRA on pre_classifier, which peft cannot also copy.)"""
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32,
                              num_labels=1)
    torch.manual_seed(0)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    args = lora_args(dtype="bfloat16", lora_target_modules="q_lin,v_lin")
    model = dpo.unwrap(dpo.load_model(str(tmp_path), args, CPU, trained=True,
                                      model_class=DistilBertForSequenceClassification))
    whole = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert {n.split(".")[2] for n in whole} == {"pre_classifier", "classifier"}
    assert set(whole.values()) == {torch.float32}
    assert model(input_ids=torch.randint(0, 50, (2, 5))).logits.dtype == torch.float32


def test_a_saved_adapter_trained_on_with_other_lora_flags_says_so(train_run, capsys):
    """A directory holding an adapter, loaded to train with --lora_r, trains that adapter on at its saved rank and
    alpha. Other --lora_r / --lora_alpha flags cannot apply to it, and were ignored without a word; the run now names
    both. The same flags as saved (a resumed run's) print nothing."""
    run = train_run()
    model = dpo.unwrap(dpo.load_model(str(run.out), lora_args(lora_r=4, lora_alpha=8.0), CPU, trained=True))
    ranks = {p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert ranks == {8}  # the saved rank, not --lora_r 4
    assert "training its adapter on as saved (r=8, lora_alpha=16" in capsys.readouterr().out
    dpo.load_model(str(run.out), lora_args(), CPU, trained=True)
    assert "as saved" not in capsys.readouterr().out
