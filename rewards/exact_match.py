r"""Exact-match reward for math: 1.0 when a completion's last \boxed{...} equals the ground truth, else 0.0.

    python grpo.py --dataset_name trl-lib/DeepMath-103K --reward_fn rewards/exact_match.py:boxed_exact_match ...

The ground truth is the `solution` column, as in trl-lib/DeepMath-103K (DeepMath's `final_answer`, bare LaTeX); a
solution holding a \boxed{...} is read the same way as a completion. Completions are text, or a one-message assistant
turn after a conversational prompt (grpo.py's and TRL's calling convention).

What matches: the contents of the last complete \boxed{...} (braces balanced, so \boxed{\frac{1}{2}} is read whole;
an unclosed box, as in a truncated response, does not count) and the solution are equal as strings once normalised:
whitespace, `$`, LaTeX spacing (\, \; \: \! \ ) and \left / \right removed, one trailing period dropped, \dfrac and
\tfrac read as \frac, \text{...} unwrapped, and the commas of a thousands-grouped number removed (1,234,567). Or both
are numbers of equal exact value: integers, decimals, a/b and \frac{a}{b} with integer a, b (so 0.5, 1/2 and
\frac{1}{2} match; 0.333 and 1/3 do not).

What does not: this is exact match, not math_verify (TRL's accuracy_reward). Equal values written differently score 0:
\sqrt{8} vs 2\sqrt{2}, x+1 vs 1+x, \frac{\pi}{2} vs \pi/2, e^2 vs e^{2}, x=3 vs 3, 5\text{ cm} vs 5, \boxed 5 (no
braces), reordered sets or intervals. So it can score a right answer 0, and scores a wrong one 1 only through the
normalisation above (a pair written 1,234 reads as 1234). An empty box or solution matches nothing. Standard library
only.
"""

import re
from fractions import Fraction

BOX = re.compile(r"\\boxed\s*\{")
SPACES = re.compile(r"\s|\$|\\[,;:! ]|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])")


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} whose braces close, or None if there is none."""
    found = None
    for match in BOX.finditer(text):
        depth = 1
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found = text[match.end() : end]
                break
    return found


def normalise(answer: str) -> str:
    answer = SPACES.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").removesuffix(".")
    answer = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer)  # \text{Yes} -> Yes
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", answer):  # 1,234,567.5 -> 1234567.5
        answer = answer.replace(",", "")
    return answer


def as_number(answer: str) -> Fraction | None:
    """The exact value of a normalised integer, decimal, a/b or \\frac{a}{b}; None for anything else."""
    frac = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if frac:
        answer = f"{frac[1]}{frac[2]}/{frac[3]}"
    try:
        return Fraction(answer)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, truth: str) -> bool:
    predicted, truth = normalise(predicted), normalise(truth)
    if predicted == truth:
        return predicted != ""
    a, b = as_number(predicted), as_number(truth)
    return a is not None and a == b


def boxed_exact_match(completions: list, solution: list, **kwargs) -> list[float]:
    """1.0 for each completion whose last \\boxed{...} matches its row's solution, else 0.0 (TRL's signature:
    prompts, completion_ids and the other columns arrive in kwargs and are not used)."""
    rewards = []
    for completion, truth in zip(completions, solution, strict=True):
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        predicted, truth = last_boxed(text), str(truth)
        truth = last_boxed(truth) or truth
        rewards.append(float(predicted is not None and answers_match(predicted, truth)))
    return rewards
