"""One copy per idea. Helpers that several scripts define under one name must be byte-identical (STYLE.md: a diff
between two scripts shows only the algorithm), one piece of logic must not live in two places under two names, and
every model family's treatment of its LM-head logits lives in one shared function. Scripts never import each other,
so this test is what keeps copies in step."""

import ast
import difflib
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["dpo.py", "ipo.py", "slic_hf.py", "rrhf.py", "fdpo.py", "ppo_rlhf.py", "spin.py", "reward_model.py",
           "kto.py", "sacpo.py", "online_dpo.py", "grpo.py"]

# Functions and classes that share a name but are meant to differ: the method itself, and each script's Args.
METHOD_SPECIFIC = {"train", "Args"}
# Bodies this alike (difflib's ratio over their statements) count as one helper written twice.
ALIKE = 0.9


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


def body_statements(source: str) -> dict[str, list[str]]:
    """name -> its body as a list of statements, unparsed (so formatting, comments and the docstring do not count), for
    every top-level function with at least three statements."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            statements = [line for statement in body for line in ast.unparse(statement).splitlines()]
            if len(statements) >= 3:
                out[node.name] = statements
    return out


def renamed_copies(sources: dict[str, str], exempt: set[str]) -> list[str]:
    """'a.py:f ~ b.py:g' for each pair of differently named functions whose bodies are ALIKE or more the same: one
    helper kept under two names, in one script or across two."""
    bodies: dict[tuple, list[str]] = {}  # each distinct body once: the shared helpers repeat in every script
    for script, text in sources.items():
        for name, statements in body_statements(text).items():
            if name not in exempt:
                bodies.setdefault(tuple(statements), []).append(f"{script}:{name}")
    problems = []
    for labels in bodies.values():  # one body, several labels
        problems += [f"{a} ~ {b}" for a, b in itertools.combinations(labels, 2) if a.split(":")[1] != b.split(":")[1]]
    for (body_a, labels_a), (body_b, labels_b) in itertools.combinations(bodies.items(), 2):
        pairs = [(a, b) for a in labels_a for b in labels_b if a.split(":")[1] != b.split(":")[1]]
        matcher = difflib.SequenceMatcher(None, body_a, body_b)
        # real_quick_ratio and quick_ratio bound ratio from above, for a fraction of its cost
        if pairs and min(matcher.real_quick_ratio(), matcher.quick_ratio()) >= ALIKE and matcher.ratio() >= ALIKE:
            problems += [f"{a} ~ {b}" for a, b in pairs]
    return sorted(problems)


def lm_head_callers(source: str) -> set[str]:
    """The top-level functions that apply a model's output embeddings (its LM head) themselves."""
    return {name for name, text in top_level_functions(source).items() if "get_output_embeddings" in text}


def present() -> dict[str, str]:
    return {s: (ROOT / s).read_text() for s in SCRIPTS if (ROOT / s).exists()}


def test_drift_detector_sees_a_one_character_change():
    a = "def collate(rows, pad_id):\n    return rows\n\ndef train(args):\n    pass\n"
    b = "def collate(rows, pad_id):\n    return  rows\n\ndef train(args):\n    return 1\n"
    assert drifted({"a.py": a, "b.py": b}, METHOD_SPECIFIC) == ["collate: a.py != b.py"]
    assert drifted({"a.py": a, "b.py": a}, METHOD_SPECIFIC) == []


def test_renamed_copy_detector_sees_a_helper_under_two_names():
    helper = '''def {name}(model, hidden):
    """{doc}"""
    logits = model.head(hidden).float()
    if model.scale:  # {comment}
        logits = logits * model.scale
    return logits
'''
    other = "def other(model, hidden):\n    x = hidden + 1\n    y = x * 2\n    return model(y)\n"
    a = helper.format(name="lm_logits", doc="one", comment="a") + "\n\n" + other
    b = helper.format(name="head_logits", doc="two", comment="b")
    assert renamed_copies({"a.py": a, "b.py": b}, METHOD_SPECIFIC) == ["a.py:lm_logits ~ b.py:head_logits"]
    assert renamed_copies({"a.py": a}, METHOD_SPECIFIC) == []


def test_shared_helpers_are_identical_across_scripts():
    sources = present()
    if len(sources) < 2:
        pytest.skip(f"only {list(sources)} exists so far: nothing to compare")
    assert drifted(sources, METHOD_SPECIFIC) == []


def test_no_helper_lives_under_two_names():
    assert renamed_copies(present(), METHOD_SPECIFIC) == []


def test_the_lm_head_is_applied_in_one_shared_function():
    """Granite's scaling, Cohere's scale and Gemma's soft-cap are applied in lm_logits, and nowhere else."""
    for script, source in present().items():
        assert lm_head_callers(source) <= {"lm_logits"}, script
