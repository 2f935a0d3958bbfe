r"""rewards/exact_match.py, the \boxed{} exact-match reward for grpo.py's --reward_fn: box extraction, normalisation
and matching against answers worked out by hand, and one call through grpo.py's own loader and function_rewards, so
that the calling convention (prompts, completions, completion_ids, the other columns) is checked end to end."""

import pytest
import torch

from grpo import function_rewards, load_reward_function
from rewards.exact_match import boxed_exact_match, last_boxed, normalise


@pytest.mark.parametrize("text, boxed", [
    (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),  # nested braces are read whole
    (r"first \boxed{3}, then on reflection \boxed{4}", "4"),  # the last box wins
    (r"\boxed {7}", "7"),
    (r"\boxed{2} and then \boxed{3", "2"),  # an unclosed box (a truncated response) does not count
    (r"\boxed{5", None),
    ("The answer is 72.", None),
    ("", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("raw, clean", [
    (" $ 72 $ ", "72"),
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"\dfrac{1}{2}.", r"\frac{1}{2}"),
    (r"\tfrac{3}{4}", r"\frac{3}{4}"),
    ("1,234,567", "1234567"),
    ("-1,000.5", "-1000.5"),
    ("(1,234)", "(1,234)"),  # a tuple keeps its comma
    ("12,34", "12,34"),  # not thousands groups
    (r"3\,000", "3000"),
    (r"x \leftarrow y", r"x\leftarrowy"),  # \left is removed only as a command of its own
    (r"\text{Yes}", "Yes"),
    (r"5\text{ cm}", "5cm"),
])
def test_normalise(raw, clean):
    assert normalise(raw) == clean


@pytest.mark.parametrize("completion, solution, reward", [
    (r"The answer is \boxed{\dfrac{1}{2}}.", r"\frac{1}{2}", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),  # equal exact values
    (r"\boxed{1/2}", "0.5", 1.0),
    (r"\boxed{-\frac{3}{4}}", "-0.75", 1.0),
    (r"\boxed{0.333}", r"\frac{1}{3}", 0.0),  # values are compared exactly
    (r"\boxed{$1,000$}", "1000", 1.0),
    (r"\boxed{ 72 }", "72", 1.0),
    (r"\boxed{\left(1, 2\right)}", "(1,2)", 1.0),
    (r"\boxed{7}", r"\boxed{7}", 1.0),  # a boxed solution is unboxed too
    (r"\boxed{10}", 10, 1.0),  # a numeric column
    (r"\boxed{3} is wrong, so \boxed{4}", "3", 0.0),
    (r"\boxed{3} is wrong, so \boxed{4}", "4", 1.0),
    ("The answer is 72.", "72", 0.0),  # no box
    (r"\boxed{}", "", 0.0),  # empty matches nothing
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 0.0),  # exact match, not math_verify
    (r"\boxed{x=3}", "3", 0.0),
    (r"\boxed{\pi}", r"\pi", 1.0),
    (r"\boxed{\text{No}}", "No", 1.0),
    (r"\boxed{e^2}", "e^{2}", 0.0),
    ("Step 1: ...\nTherefore, the final answer is $\\boxed{\\dfrac{\\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}", 1.0),
])
def test_boxed_exact_match_text(completion, solution, reward):
    assert boxed_exact_match(completions=[completion], solution=[solution]) == [reward]


def test_conversational_completions_and_batch():
    completions = [[{"role": "assistant", "content": r"so \boxed{5}"}], [{"role": "assistant", "content": "5"}],
                   [{"role": "assistant", "content": r"\boxed{6}"}]]
    rewards = boxed_exact_match(prompts=[[{"role": "user", "content": "2+3?"}]] * 3, completions=completions,
                                solution=["5", "5", "5"], completion_ids=[[1], [2], [3]], difficulty=[5.0, 5.0, 5.0])
    assert rewards == [1.0, 0.0, 0.0]
    assert all(type(r) is float for r in rewards)


def test_unequal_lengths_are_an_error():
    with pytest.raises(ValueError):
        boxed_exact_match(completions=[r"\boxed{1}", r"\boxed{2}"], solution=["1"])


def test_through_grpo_function_rewards():
    """grpo.py loads the file by its --reward_fn spec and calls it with its rows: a conversational prompt's text
    becomes a one-message assistant turn, and the rows' other columns arrive as lists."""
    reward_fn = load_reward_function("rewards/exact_match.py:boxed_exact_match")  # resolved next to grpo.py
    calls = []

    def spy(**kwargs):
        calls.append(kwargs)
        return reward_fn(**kwargs)

    question = [{"role": "user", "content": "What is 1 + 1?"}]
    rows = [{"prompt": question, "solution": "2", "difficulty": 5.0}] * 3
    texts = [r"1 + 1 = \boxed{2}", r"\boxed{3}", "2"]
    ids = [[11, 12], [13], [14]]
    assert torch.equal(function_rewards(spy, rows, texts, ids), torch.tensor([1.0, 0.0, 0.0]))
    (call,) = calls
    assert call["completions"][0] == [{"role": "assistant", "content": r"1 + 1 = \boxed{2}"}]
    assert call["prompts"] == [question] * 3
    assert call["solution"] == ["2", "2", "2"] and call["difficulty"] == [5.0, 5.0, 5.0]
    assert call["completion_ids"] == ids

    rows = [{"prompt": "Q: 2 + 2 = ?", "solution": "4"}, {"prompt": "Q: 10 / 4 = ?", "solution": r"\frac{5}{2}"}]
    rewards = function_rewards(reward_fn, rows, [r"\boxed{4}", r"\boxed{2.5}"], [[1], [2]])  # text prompts
    assert torch.equal(rewards, torch.tensor([1.0, 1.0]))
