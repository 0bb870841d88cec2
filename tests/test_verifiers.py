import pytest

from opcd_cli.errors import OpcdError
from opcd_cli.verifiers import choice_letter, is_correct, last_boxed, verifier_for


@pytest.mark.parametrize(
    "response, answer, ok",
    [
        ("dcba", "dcba", True),
        ("  dcba.\n", "dcba", True),
        ('"dcba"', "dcba", True),
        ("DCBA", "dcba", False),  # case is kept: an `upper` rule depends on it
        ("dcb", "dcba", False),
        ("<think>maybe abcd</think>\ndcba", "dcba", True),
    ],
)
def test_exact(response, answer, ok):
    assert is_correct(response, answer, None, "auto") is ok


@pytest.mark.parametrize(
    "response, answer, ok",
    [
        ("so the total is \\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{3}", "4", False),
        ("first \\boxed{1} then \\boxed{2}", "2", True),
        ("no box at all, the answer is 7", "7", True),
    ],
)
def test_math(response, answer, ok):
    assert is_correct(response, answer, None, "math") is ok


def test_last_boxed_balances_braces():
    assert last_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert last_boxed("nothing") is None


@pytest.mark.parametrize(
    "response, letter",
    [("The answer is C.", "C"), ("Answer: (b)", "B"), ("\\boxed{D}", "D"), ("A) because\nB. no", "B"), ("unsure", None),
     ("Rationale... <answer>(C)</answer> since A is wrong", "C"), ("<answer>b</answer>", "B"),  # the official tags
     ("<answer>(A)</answer> then <answer>D. Both</answer>", "D")],
)
def test_choice_letter(response, letter):
    assert choice_letter(response) == letter


def test_choice_and_yesno():
    assert is_correct("After thought, the answer is B", "B", None, "choice")
    assert not is_correct("the answer is A", "B", None, "choice")
    assert is_correct("reasoning... <answer>yes</answer>", "yes", None, "yesno")
    assert is_correct("<answer> NO </answer>", "<answer>no</answer>", None, "yesno")
    assert not is_correct("yes", "yes", None, "yesno")  # the tags are the required format


def test_row_verifier_used_under_auto_and_flag_wins():
    assert is_correct("\\boxed{2}", "2", "math", "auto")
    assert not is_correct("\\boxed{2}", "2", "math", "exact")
    with pytest.raises(OpcdError, match="unknown verifier"):
        verifier_for("fuzzy", "auto")
