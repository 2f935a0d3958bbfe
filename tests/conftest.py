"""Shared test setup: `import dpo` works from any working directory, and CPU work stays single-threaded."""

import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The test models are tiny: extra intra-op threads only add synchronisation, and on shared cores
# they spin against other processes (measured: 0.73 s vs 0.012 s per toy-model step on 2 busy cores).
torch.set_num_threads(1)



@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory) -> Path:
    """A snapshot of toy_world/model, one per test module."""
    return Path(shutil.copytree(Path(__file__).resolve().parents[1] / "toy_world" / "model", tmp_path_factory.mktemp("toy") / "model"))


@pytest.fixture(scope="module")
def toy_tokenizer(toy_model_dir):
    return AutoTokenizer.from_pretrained(toy_model_dir)


# Figures measured by the end-to-end tests, printed in pytest's closing summary (and so in CI's log).
MEASURED: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured on the toy world")
        for line in MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def toy_reward_model(tmp_path_factory):
    """`python reward_model.py` with every default, trained once per session on snapshots of the toy model and pairs.

    test_reward_model_toy_world.py measures it; test_ppo_toy_world.py trains PPO against it, as
    `python reward_model.py && python ppo_rlhf.py` does.
    """
    import reward_model

    d = tmp_path_factory.mktemp("reward_model")
    toy = Path(__file__).resolve().parents[1] / "toy_world"
    model_dir, data_dir = (shutil.copytree(toy / name, d / name) for name in ("model", "pairs"))
    args = reward_model.Args(model_name_or_path=str(model_dir), dataset_name=str(data_dir), output_dir=str(d / "out"), device="cpu")
    start = time.perf_counter()
    metrics = reward_model.train(args)
    return SimpleNamespace(path=args.output_dir, data_dir=data_dir, metrics=metrics, seconds=time.perf_counter() - start)
