"""Shared test setup: `import dpo` works from any working directory, and CPU work stays single-threaded."""

import json
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from filelock import FileLock  # a dependency of torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The test models are tiny: extra intra-op threads only add synchronisation, and on shared cores
# they spin against other processes (measured: 0.73 s vs 0.012 s per toy-model step on 2 busy cores).
# pytest-xdist (pytest.ini) uses the cores instead: one single-threaded worker each.
# Pinned, not defaulted: a value preset in the shell (OMP_NUM_THREADS=8 pytest) would otherwise make the scripts that
# tests run as subprocesses multithreaded while the in-process runs stay on one thread.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # the same for the scripts that tests run as subprocesses



@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory) -> Path:
    """A snapshot of toy_world/model, one per test module."""
    return Path(shutil.copytree(Path(__file__).resolve().parents[1] / "toy_world" / "model",
                                tmp_path_factory.mktemp("toy") / "model"))


def snapshot(tmp_path_factory, name: str) -> Path:
    """The first N_TRAIN / N_TEST rows of toy_world/<name>, as a local dataset with two splits."""
    from helpers import N_TEST, N_TRAIN, TOY, head

    d = tmp_path_factory.mktemp(name)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        head(TOY / name / f"{split}.jsonl", d / f"{split}.jsonl", n)
    return d


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The toy world's conversational pairs, N_TRAIN / N_TEST rows."""
    return snapshot(tmp_path_factory, "pairs")


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    """The toy world's SFT rows (answers from the known p_data), N_TRAIN / N_TEST rows."""
    return snapshot(tmp_path_factory, "sft")


@pytest.fixture(scope="module")
def unpaired_dir(tmp_path_factory) -> Path:
    """The toy world's unpaired rows (answers from the reference, each labelled desirable or not), N_TRAIN / N_TEST."""
    return snapshot(tmp_path_factory, "unpaired")


@pytest.fixture(scope="module")
def safety_dir(tmp_path_factory) -> Path:
    """The toy world's safety pairs (reference answers labelled by Bradley-Terry on the safety score g), N_TRAIN /
    N_TEST rows."""
    return snapshot(tmp_path_factory, "safety_pairs")


@pytest.fixture(scope="module")
def ranked_dir(tmp_path_factory) -> Path:
    """The toy world's ranked groups (k = 2-4 reference samples, true scores), N_TRAIN / N_TEST rows."""
    return snapshot(tmp_path_factory, "ranked")


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory) -> SimpleNamespace:
    """Snapshots of toy_world/model and toy_world/prompts, and a reward model with a random head (seed 0): for the
    scripts that sample and score (ppo_rlhf.py, online_dpo.py) without depending on a trained reward model."""
    from transformers import AutoModelForSequenceClassification

    base = tmp_path_factory.mktemp("toy")
    toy = Path(__file__).resolve().parents[1] / "toy_world"
    model = Path(shutil.copytree(toy / "model", base / "model"))
    prompts = Path(shutil.copytree(toy / "prompts", base / "prompts"))
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).save_pretrained(base / "rm")
    AutoTokenizer.from_pretrained(model).save_pretrained(base / "rm")
    return SimpleNamespace(model=model, prompts=prompts, rm=base / "rm", tokenizer=AutoTokenizer.from_pretrained(model))


@pytest.fixture(scope="module")
def toy_tokenizer(toy_model_dir):
    return AutoTokenizer.from_pretrained(toy_model_dir)


# Figures measured by the end-to-end tests, printed in pytest's closing summary (and so in CI's log). Tests append
# lines here; each test phase's report carries them away as user properties, which pytest-xdist ships from its
# workers to the controller, where the summary is printed.
MEASURED: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    report.user_properties.extend(("measured", line) for line in MEASURED)
    MEASURED.clear()


def pytest_terminal_summary(terminalreporter):
    reports = [r for kind in ("passed", "failed", "error", "") for r in terminalreporter.stats.get(kind, [])]
    lines = [(r.nodeid, line) for r in reports for key, line in getattr(r, "user_properties", ()) if key == "measured"]
    lines.sort(key=lambda pair: pair[0])  # stable: a test's lines keep their order
    if lines:
        terminalreporter.section("measured on the toy world")
        for _, line in lines:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(items):
    """The long end-to-end tests first, so that pytest-xdist's workers do not end on them one after another. Among
    them, one test that needs the session's reward model leads (its worker trains it while the other runs the
    remaining end-to-end tests) and the others that need it come last, when it is there to load rather than wait for."""
    needs_rm = [item for item in items if "toy_reward_model" in item.fixturenames]
    first = needs_rm[0] if needs_rm else None

    def rank(item) -> int:
        if item is first:
            return 0
        if not item.module.__name__.endswith("_toy_world"):
            return 3
        return 2 if item in needs_rm else 1

    items.sort(key=rank)


def session_dir(tmp_path_factory) -> Path:
    """A directory this test session's processes share: under pytest-xdist, the parent of the workers' temp dirs."""
    if os.environ.get("PYTEST_XDIST_WORKER") is not None:
        return tmp_path_factory.getbasetemp().parent
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session", autouse=True)
def shared_reference_enumeration(tmp_path_factory):
    """toy.reference_logprobs() takes about 15 s; with this file the session's workers enumerate it once between
    them."""
    os.environ["TOY_REFERENCE_LOGPROBS"] = str(session_dir(tmp_path_factory) / "reference_logprobs.npz")


@pytest.fixture(scope="session")
def toy_reward_model(tmp_path_factory):
    """`python reward_model.py` with every default, trained once per test session on snapshots of the toy model and
    pairs.

    test_reward_model_toy_world.py measures it; test_ppo_toy_world.py and test_rrhf_toy_world.py train against it, as
    `python reward_model.py && python ppo_rlhf.py` does. Session fixtures are per process, so under pytest-xdist the
    workers share one training through a lock and the session's common temporary directory: the first to need it
    trains it, the others load what it saved. (pytest-xdist's xdist_group marks would keep the users on one worker
    instead, but pytest 9 ignores the node-id suffix they rely on.)
    """
    import reward_model

    root = session_dir(tmp_path_factory)
    d, record = root / "toy_reward_model", root / "toy_reward_model.json"
    with FileLock(str(root / "toy_reward_model.lock")):
        if not record.exists():
            toy = Path(__file__).resolve().parents[1] / "toy_world"
            model_dir, data_dir = (shutil.copytree(toy / name, d / name) for name in ("model", "pairs"))
            args = reward_model.Args(model_name_or_path=str(model_dir), dataset_name=str(data_dir),
                                     output_dir=str(d / "out"), device="cpu")
            start = time.perf_counter()
            metrics = reward_model.train(args)
            record.write_text(json.dumps({"metrics": metrics, "seconds": time.perf_counter() - start}))
    saved = json.loads(record.read_text())
    return SimpleNamespace(path=str(d / "out"), data_dir=d / "pairs", metrics=saved["metrics"],
                           seconds=saved["seconds"])
