"""Helpers that several scripts define under one name must be byte-identical (STYLE.md: a diff between two
scripts shows only the algorithm). Scripts never import each other, so this test is what keeps copies in step."""

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["dpo.py", "ipo.py", "slic_hf.py", "rrhf.py", "fdpo.py", "ppo_rlhf.py", "spin.py", "reward_model.py"]


def top_level_functions(source: str) -> dict[str, str]:
    """name -> exact source text of every top-level function and class (decorators included)."""
    tree, lines = ast.parse(source), source.splitlines()
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            out[node.name] = "\n".join(lines[start - 1 : node.end_lineno])
    return out


def drifted(sources: dict[str, str], exempt: set[str]) -> list[str]:
    """'name: a.py != b.py' for each shared helper whose copies differ."""
    functions = {name: top_level_functions(text) for name, text in sources.items()}
    problems = []
    for (a, fa), (b, fb) in itertools.combinations(functions.items(), 2):
        for name in sorted((fa.keys() & fb.keys()) - exempt):
            if fa[name] != fb[name]:
                problems.append(f"{name}: {a} != {b}")
    return problems


# Functions and classes that share a name but are meant to differ: the method itself, and each script's Args.
METHOD_SPECIFIC = {"train", "Args"}


def test_drift_detector_sees_a_one_character_change():
    a = "def collate(rows, pad_id):\n    return rows\n\ndef train(args):\n    pass\n"
    b = "def collate(rows, pad_id):\n    return  rows\n\ndef train(args):\n    return 1\n"
    assert drifted({"a.py": a, "b.py": b}, METHOD_SPECIFIC) == ["collate: a.py != b.py"]
    assert drifted({"a.py": a, "b.py": a}, METHOD_SPECIFIC) == []


def test_shared_helpers_are_identical_across_scripts():
    present = {s: (ROOT / s).read_text() for s in SCRIPTS if (ROOT / s).exists()}
    if len(present) < 2:
        pytest.skip(f"only {list(present)} exists so far: nothing to compare")
    assert drifted(present, METHOD_SPECIFIC) == []
