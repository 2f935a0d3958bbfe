"""The shared machinery every script carries (byte-identical copies: tests/test_copies_identical.py), tested once on
dpo.py's copy unless a script's use of it differs: dropout, the LM-head check, the gradient of an optimizer step,
small datasets, safe checkpoint loading, crash-safe saving, and how the scripts stop on bad input.

Each test here pins one defect of issue 17 (named in its docstring) and failed before that fix.
"""

import importlib
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconH1Config,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    HyperCLOVAXConfig,
    LlamaConfig,
)

import dpo
from helpers import TINY

SCRIPTS = ["dpo", "ipo", "slic_hf", "rrhf", "fdpo", "ppo_rlhf", "spin", "reward_model"]
CPU = dpo.Runtime(rank=0, world=1, device=torch.device("cpu"), bf16=False)
ARGS = SimpleNamespace(gradient_checkpointing=False, fsdp=False, lora_r=0, dtype="float32",
                       attn_implementation="sdpa")


# --------------------------------------------------------------------------- defect 1: dropout off in every model
DROPOUT = {
    "gpt2": lambda: GPT2Config(vocab_size=37, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.3,
                               embd_pdrop=0.3, attn_pdrop=0.3),  # nn.Dropout modules
    "llama": lambda: LlamaConfig(**TINY, attention_dropout=0.3),  # the attention's functional dropout
}


@pytest.fixture(scope="module", params=list(DROPOUT))
def dropout_model_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    AutoModelForCausalLM.from_config(DROPOUT[request.param]()).save_pretrained(path)
    return path


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_trained_model_in_train_mode_has_no_dropout(script, dropout_model_dir):
    """Defect 1. A model loaded for training, in train mode, gives the same logits twice and the same as the frozen
    (eval-mode) copy of it, so that the policy starts exactly at its reference. With dropout 0.3 left on, two passes
    differ by O(1) in the logits."""
    module = importlib.import_module(script)
    trained = module.load_model(str(dropout_model_dir), ARGS, CPU, trained=True).train()
    frozen = module.load_model(str(dropout_model_dir), ARGS, CPU, trained=False)
    ids = torch.randint(3, 37, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = lambda model: model(lambda m, x: m(input_ids=x).logits, ids)  # noqa: E731
    with torch.no_grad():
        first, second, reference = logits(trained), logits(trained), logits(frozen)
    assert torch.equal(first, second)
    assert torch.equal(first, reference)


@pytest.mark.parametrize("script", SCRIPTS)
def test_attn_implementation_reaches_from_pretrained(script, toy_model_dir):
    """Issue 18: --attn_implementation is the attention kernel load_model asks from_pretrained for, in every script.
    Its default, None, leaves the choice to transformers: sdpa for the toy model, eager for a model without sdpa
    (Gemma 2, which refuses an explicit sdpa)."""
    module = importlib.import_module(script)
    assert module.Args.attn_implementation is None
    for kernel, used in (("eager", "eager"), ("sdpa", "sdpa"), (None, "sdpa")):
        args = SimpleNamespace(**{**vars(ARGS), "attn_implementation": kernel})
        model = module.unwrap(module.load_model(str(toy_model_dir), args, CPU, trained=False))
        assert model.config._attn_implementation == used


def test_the_default_attention_loads_a_model_without_sdpa(tmp_path):
    """Gemma 2 refuses attn_implementation="sdpa" (the old default, which stopped every script loading it); the
    default, None, gets it eager. A tiny Gemma 2, built here, through dpo.py's copy of load_model."""
    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not support"):
        dpo.load_model(str(tmp_path), SimpleNamespace(**{**vars(ARGS), "attn_implementation": "sdpa"}), CPU,
                       trained=False)
    args = SimpleNamespace(**{**vars(ARGS), "attn_implementation": dpo.Args.attn_implementation})
    model = dpo.unwrap(dpo.load_model(str(tmp_path), args, CPU, trained=False))
    assert model.config._attn_implementation == "eager"


def test_step_zero_dpo_loss_is_log_2_on_a_model_with_dropout(toy_model_dir, toy_tokenizer, tmp_path):
    """Defect 1, as the issue measured it: on a copy of the toy model with attention_dropout = 0.3, DPO's loss at
    step 0 is log 2 exactly (h = 0 for every pair), not 0.7002."""
    model = AutoModelForCausalLM.from_pretrained(toy_model_dir)
    model.config.attention_dropout = 0.3
    model.save_pretrained(tmp_path)
    policy = dpo.load_model(str(tmp_path), ARGS, CPU, trained=True).train()
    reference = dpo.load_model(str(tmp_path), ARGS, CPU, trained=False)
    ids = lambda text: toy_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, eos = ids("how was the food ?"), [toy_tokenizer.eos_token_id]
    chosen, rejected = prompt + ids(" great food") + eos, prompt + ids(" bad") + eos
    rows = [{"chosen": chosen, "chosen_start": len(prompt), "rejected": rejected, "rejected_start": len(prompt),
             "index": i} for i in range(8)]
    batch = dpo.collate(rows, 0)
    chosen, rejected = policy(dpo.pair_logps, batch)
    with torch.no_grad():
        ref_chosen, ref_rejected = reference(dpo.pair_logps, batch)
    losses, _, _ = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    torch.testing.assert_close(losses, torch.full((8,), math.log(2)), rtol=0, atol=1e-7)


# --------------------------------------------------------------------------- defect 2: every LM head's scaling
TINY_SSM = dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16)
SCALED_HEADS = {
    "hyperclovax": lambda: HyperCLOVAXConfig(**TINY, logits_scaling=4.0),  # multiplies, where Granite divides
    "falcon_h1": lambda: FalconH1Config(**TINY, **TINY_SSM, lm_head_multiplier=3.0),
}


@pytest.mark.parametrize("family", list(SCALED_HEADS))
def test_lm_logits_follows_the_models_own_head(family):
    """Defect 2. The log-probs of the scripts' route (the body, then lm_logits) equal log_softmax of the model's own
    logits, token by token, computed here straight from model(...).logits. Before the fix HyperCLOVA X's logits were
    divided by logits_scaling instead of multiplied, and Falcon-H1's lm_head_multiplier was ignored (gaps of 1.4 and
    2 nats a token in the issue)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(SCALED_HEADS[family]()).eval()
    ids = torch.randint(3, 37, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, :-1]
        got = dpo.lm_logits(model, hidden).log_softmax(-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_start_up_check_stops_an_unknown_head_and_names_it(tmp_path):
    """Defect 2's guard: a model whose logits lm_logits treats wrongly stops the run before training, with a message
    naming its class and model_type. Here a Llama is given a Granite-style logits_scaling that Llama's forward
    ignores, so lm_logits divides by 4 where the model does not: a gap of nats a token, far above the 0.05 limit."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY))
    model.save_pretrained(tmp_path)
    policy = dpo.load_model(str(tmp_path), ARGS, CPU, trained=True)
    sequence = torch.randint(3, 37, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    dpo.check_log_probs(policy, sequence, 5, CPU)  # a head lm_logits knows passes
    dpo.unwrap(policy).config.logits_scaling = 4.0
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(model_type 'llama'\).* nats a token"):
        dpo.check_log_probs(policy, sequence, 5, CPU)


# --------------------------------------------------------------------------- defect 3: the optimizer step's mean
def batches_for(n_rows: int, batch_size: int, accumulation: int, epochs: int = 1):
    args = SimpleNamespace(per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, seed=0,
                           group_by_length=False, max_steps=0, num_train_epochs=epochs)
    rows = [{"index": i, "chosen": [1], "rejected": [2]} for i in range(n_rows)]
    return dpo.TrainBatches(rows, args, CPU)


@pytest.mark.parametrize("batch_size,accumulation", [(16, 3), (32, 2), (8, 5), (7, 2)])
def test_each_step_gradient_is_the_mean_over_its_rows(batch_size, accumulation):
    """Defect 3. On 40 rows, a step whose micro-batches include the epoch's short one still gets the plain mean of
    its rows' gradients: with loss_i = w * c_i, the accumulated gradient must be mean(c_i) over the step's rows. Each
    micro-batch used to be normalised by its own size (relative gradient error 0.21 at 16 x 3, 0.47 at 32 x 2)."""
    c = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batches = batches_for(40, batch_size, accumulation)
    for step in range(batches.total_steps):
        w = torch.zeros((), dtype=torch.float64, requires_grad=True)
        seen = []
        for micro in batches.of_step(step):
            index = torch.tensor([r["index"] for r in micro.rows])
            micro.global_mean(w * c[index]).backward()
            seen += index[: micro.n].tolist()
        assert w.grad.item() == pytest.approx(c[seen].mean().item(), rel=1e-12)


@pytest.mark.parametrize("batch_size,accumulation,epochs", [(16, 2, 2), (16, 3, 1), (8, 2, 3), (40, 1, 2)])
def test_every_micro_batch_of_every_epoch_is_trained_on(batch_size, accumulation, epochs):
    """Defect 3, second part: 40 rows in micro-batches of 16 make 3 a epoch; with 2 accumulation steps the old
    steps_per_epoch = 3 // 2 = 1 dropped the third micro-batch of each epoch. Now each row is seen once an epoch."""
    batches = batches_for(40, batch_size, accumulation, epochs)
    seen = [r["index"] for step in range(batches.total_steps) for micro in batches.of_step(step)
            for r in micro.rows[: micro.n]]
    assert sorted(seen) == sorted(list(range(40)) * epochs)
    assert batches.total_steps == math.ceil(math.ceil(40 / batch_size) * epochs / accumulation)


def test_the_logged_epoch_counts_the_micro_batches_trained():
    """train/epoch is the number of epochs trained when the step ends: 40 rows in micro-batches of 8 make 5 an epoch,
    and steps of 2 micro-batches end at 0.4, 0.8, then 1.2 (the third runs across the epoch's end), 1.6 and 2.0. It
    was where each step's last micro-batch starts (0.2, 0.6, 1.0, 1.4, 1.8): one micro-batch behind."""
    batches = batches_for(40, 8, 2, epochs=2)
    logged = [[micro.epoch for micro in batches.of_step(step)][-1] for step in range(batches.total_steps)]
    assert logged == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])


# --------------------------------------------------------------------------- defect 7 (offline half): the turn's end
def gemma_like_tokenizer():
    """A word-level tokenizer whose chat template closes each turn with its own special token, <end_of_turn>, which is
    not its <eos> (as Gemma's and Llama 3's templates do)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<end_of_turn>", "<start_of_turn>", "user", "model", "hi",
                                         "yes", "no", "\n", "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|<[a-z_]+>|[a-z]+"), behavior="isolated")
    tok.add_special_tokens(["<pad>", "<eos>", "<end_of_turn>", "<start_of_turn>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}<start_of_turn>{{ 'user' if m['role'] == 'user' else 'model' }}\n"
                          "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                          "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    return fast


@pytest.mark.parametrize("script", ["dpo", "spin", "reward_model"])
def test_a_templated_response_ends_once(script):
    """Defect 7, offline half. A response the chat template already closed with its own turn-end token is not given
    <eos> as well (it used to end '<end_of_turn> <eos>', training every response to end twice). A plain-text response
    still gets its <eos>."""
    module = importlib.import_module(script)
    tok = gemma_like_tokenizer()
    prompt, responses = module.chat_texts(tok, [{"role": "user", "content": "hi"}],
                                          [[{"role": "assistant", "content": "yes"}]], 0)
    _, response_ids = module.tokenize_response(tok, prompt, responses[0], templated=True)
    assert tok.convert_ids_to_tokens(response_ids) == ["yes", "<end_of_turn>"]
    _, plain_ids = module.tokenize_response(tok, "hi\n", "yes", templated=False)
    assert tok.convert_ids_to_tokens(plain_ids) == ["yes", "<eos>"]


# --------------------------------------------------------------------------- defect 8: a small dataset, no test split
@pytest.mark.parametrize("rows,holdout,expected", [(24, 512, 2), (24, 1, 1), (9, 512, 0), (5000, 512, 500),
                                                   (6000, 512, 512), (24, 0, 0)])
def test_a_small_dataset_holds_out_at_most_a_tenth(tmp_path, capsys, rows, holdout, expected):
    """Defect 8. A 24-row file without a test split used to end in a traceback from datasets (test_size=512 larger
    than the data). Now at most a tenth of the rows (floor) is held out, the count is printed, and a dataset too small
    to spare a row trains on all of them without evaluation."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(f'{{"prompt": "p{i}", "chosen": "a", "rejected": "b"}}\n' for i in range(rows)))
    train, held_out = dpo.load_splits(str(path), None, "train", "test", holdout, seed=0)
    assert len(train) == rows - expected
    assert (len(held_out) if held_out is not None else 0) == expected
    out = capsys.readouterr().out
    assert (f"holding out {expected} of its {rows}" in out) if expected else ("no evaluation" in out)


# --------------------------------------------------------------------------- defect 11: checkpoints run no code
class Payload:
    """Unpickling this runs Payload.mark: what a crafted training_state.pt could do with an arbitrary command."""

    ran = False

    @staticmethod
    def mark():
        Payload.ran = True

    def __reduce__(self):
        return (Payload.mark, ())


@pytest.mark.parametrize("script", ["dpo", "ppo_rlhf", "reward_model"])
def test_a_crafted_checkpoint_is_refused(script, tmp_path):
    """Defect 11. training_state.pt is loaded with weights_only=True: a pickle that calls a function is refused
    before the call (it used to run it), and a real state with every RNG, optimizer and scheduler entry still loads."""
    module = importlib.import_module(script)
    torch.save({"step": 3, "rng": [Payload()]}, tmp_path / "training_state.pt")
    Payload.ran = False
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        module.load_training_state(str(tmp_path), str(tmp_path))
    assert not Payload.ran
    w = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([w])
    w.grad = torch.ones(2)
    optimizer.step()
    scheduler = module.linear_schedule(optimizer, 0.1, 10)
    state = {"step": 3, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": module.rank_rng_states(1)}
    torch.save(state, tmp_path / "training_state.pt")
    loaded = module.load_training_state(str(tmp_path), str(tmp_path))
    before = (torch.rand(3), __import__("numpy").random.rand(3), __import__("random").random())
    module.set_rng_state(loaded["rng"][0])
    after = (torch.rand(3), __import__("numpy").random.rand(3), __import__("random").random())
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all() and before[2] == after[2]


# --------------------------------------------------------------------------- defect 14: a kill during a save
KILL_ON_SECOND_WEIGHTS_FILE = """
import os, runpy, signal, sys
import safetensors.torch
write = safetensors.torch.save_file
calls = []
def write_then_die(*args, **kwargs):  # the second weights file is checkpoint-4's: die right after writing it
    write(*args, **kwargs)
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save_file = write_then_die  # before transformers imports it
sys.argv = ["dpo.py", *sys.argv[1:]]
runpy.run_path("dpo.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_the_last_whole_checkpoint(data_dir, toy_model_dir, tmp_path):
    """Defect 14, deterministically: the process SIGKILLs itself right after writing checkpoint-4's weights (the
    save's first file). No checkpoint-4 may then exist, `--resume_from latest` must pick checkpoint-2, and the resumed
    run must end with exactly the weights of the run that was never interrupted. Before the fix, checkpoint-4/ held
    the weights alone and looked like a checkpoint."""
    from helpers import assert_same_weights, python

    flags = ["--dataset_name", str(data_dir), "--model_name_or_path", str(toy_model_dir), "--max_steps", "6",
             "--save_steps", "2", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "16",
             "--eval_steps", "0", "--logging_steps", "1000", "--device", "cpu"]
    killed = python("-c", KILL_ON_SECOND_WEIGHTS_FILE, *flags, "--output_dir", str(tmp_path / "run"))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2", "checkpoint-4.tmp"]
    written = {p.name for p in (tmp_path / "run" / "checkpoint-4.tmp").iterdir()}
    assert "model.safetensors" in written and not written & {"args.json", "training_state.pt", "tokenizer.json"}
    assert (tmp_path / "run" / "checkpoint-2" / "training_state.pt").is_file()

    resumed = python("dpo.py", *flags, "--output_dir", str(tmp_path / "run"), "--resume_from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {tmp_path / 'run' / 'checkpoint-2'} at step 2" in resumed.stdout
    whole = python("dpo.py", *flags, "--output_dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert_same_weights(tmp_path / "run", tmp_path / "whole")
    assert not (tmp_path / "run" / "checkpoint-4.tmp").exists()  # the next save of checkpoint-4 cleared it


@pytest.mark.slow
def test_resume_from_latest_with_no_checkpoint_starts_a_new_run(data_dir, toy_model_dir, tmp_path):
    """--resume_from latest on an empty output_dir is a new run (a preemptible job's first start)."""
    from helpers import python

    run = python("dpo.py", "--dataset_name", str(data_dir), "--model_name_or_path", str(toy_model_dir), "--max_steps",
                 "1", "--per_device_train_batch_size", "16", "--eval_steps", "0", "--device", "cpu", "--output_dir",
                 str(tmp_path / "new"), "--resume_from", "latest")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--resume_from latest: no checkpoint in" in run.stdout
    assert (tmp_path / "new" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- bad input: the message alone, status 2
@pytest.mark.slow
@pytest.mark.parametrize("script", ["dpo.py", "reward_model.py"])
def test_bad_data_stops_with_the_message_alone(script, tmp_path):
    """A dataset without a 'rejected' column stops the run with exit status 2 and the message naming the column, and
    no Python traceback before it (there was one, ending in the same message)."""
    from helpers import python

    (tmp_path / "bad.jsonl").write_text('{"prompt": "how was the food ?", "chosen": "good"}\n' * 30)
    run = python(script, "--dataset_name", str(tmp_path / "bad.jsonl"), "--output_dir", str(tmp_path / "out"),
                 "--device", "cpu")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert any(line.startswith("error: dataset") and "no column 'rejected'" in line for line in run.stderr.splitlines())


def test_publishing_into_a_used_directory_removes_the_model_an_earlier_run_left(tmp_path):
    """The final output_dir is reused (it holds the checkpoints), and its files were replaced one by one, so a model
    another run left stayed beside the new one: after a full run, a LoRA run's adapter sat next to the old config.json
    and weights, and a stale merged/ copy outlived the run that made it. Such files now go first; checkpoints and
    other files stay."""
    path, staging = tmp_path / "out", tmp_path / "out.tmp"
    for name in ("config.json", "generation_config.json", "model.safetensors", "merged/model.safetensors",
                 "checkpoint-3/model.safetensors", "notes.txt", "tokenizer.json"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text("old")
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        (staging / name).write_text("new")
    dpo.publish(str(staging), str(path))
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "adapter_config.json", "adapter_model.safetensors", "checkpoint-3/model.safetensors", "notes.txt",
        "tokenizer.json"]
    assert (path / "tokenizer.json").read_text() == "new" and not staging.exists()
