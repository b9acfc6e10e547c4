"""Answer extraction and equivalence: real GSM8K/MATH answer formats, wrong answers, pathological output."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ssb.core.grading import Verdict, answers_equal, cluster_answers, extract_answer, grade, is_correct, parse_number

# --------------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"So the total is $\boxed{1080}$.", "1080"),
        (r"First \boxed{3}, then corrected: \boxed{4}", "4"),  # the last box is the claim
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are content
        (r"\boxed{\boxed{7}}", "7"),  # doubled box unwrapped
        (r"The answer is \boxed 5.", "5"),  # brace-less argument
        (r"\boxed5", "5"),
        (r"\fbox{12}", "12"),
        (r"\boxed{ \text{(C)} }", r"\text{(C)}"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),  # GSM8K reference style
        ("#### 1,080\nsome trailing words", "1,080"),
        (r"\boxed{2} and #### 3", "2"),  # a box wins over ####
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "no answer here",
        r"\boxed{}",
        r"\boxed{  }",
        r"\boxed{3",
        r"ok \boxed{1} then \boxed{2 + {",
        r"\boxedx{3}",
    ],
)
def test_extract_answer_none(text):
    assert extract_answer(text) is None


# --------------------------------------------------------------------------------------------------
# Equivalence


@pytest.mark.parametrize(
    "pred, gold",
    [
        # GSM8K-style numbers as models write them
        ("1,080", "1080"),
        ("1080", "1,080"),
        (r"\$18", "18"),
        ("$18.00", "18"),
        (r"70\%", "70"),
        ("70%", "70"),
        ("18.0", "18"),
        ("025", "25"),  # AIME: three-digit answers
        ("25", "025"),
        ("-3", "-3"),
        ("\u22123", "-3"),  # unicode minus
        (r"1{,}000", "1000"),
        (r"5 \text{ cm}", "5"),
        (r"18 \text{dollars}", "18"),
        (r"90^\circ", "90"),
        # MATH-style LaTeX
        (r"\dfrac12", r"\frac{1}{2}"),
        ("0.5", r"\frac{1}{2}"),
        (r"\frac{1}{2}", "0.5"),
        ("1/2", r"\frac{1}{2}"),
        (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
        ("[2, 5)", "[2,5)"),
        (r"(-\infty,3]", r"(-\infty, 3]"),
        (r"(-\infty,-2)\cup (3,\infty)", r"(-\infty,-2)\cup(3,\infty)"),
        (r"\{3,2,1\}", r"\{1,2,3\}"),
        ("C", r"\text{(C)}"),
        ("(C)", r"\text{(C)}"),
        (r"\sqrt{12}", r"2\sqrt{3}"),
        (r"\frac{2}{\sqrt{2}}", r"\sqrt{2}"),
        ("(x+1)^2", "x^2+2x+1"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),
    ],
)
def test_equivalent_answers(pred, gold):
    assert answers_equal(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("1,081", "1080"),
        ("18.5", "18"),
        ("71%", "70"),
        ("24", "25"),
        ("250", "025"),
        ("12", "1,2"),  # a comma list is not a thousands separator
        ("-3", "3"),
        (r"\frac{1}{3}", r"\frac{1}{2}"),
        ("0.33", r"\frac{1}{3}"),
        ("[2, 5]", "[2,5)"),  # closed vs half-open interval
        (r"\{1,2\}", r"\{1,2,3\}"),
        ("D", r"\text{(C)}"),
        (r"\sqrt{3}", r"2\sqrt{3}"),
        (None, "5"),
    ],
)
def test_wrong_answers_rejected(pred, gold):
    assert not answers_equal(pred, gold)


@pytest.mark.parametrize(
    "s, value",
    [("1,080", "1080"), (r"\$18", "18"), ("70%", "70"), ("025", "25"), ("18.0", "18"), ("-0.5", "-0.5"), (".5", "0.5")],
)
def test_parse_number(s, value):
    from decimal import Decimal

    assert parse_number(s) == Decimal(value)


@pytest.mark.parametrize("s", ["1,2", r"\frac{1}{2}", "x", "1.2.3", "", "12,34", "-", "."])
def test_parse_number_rejects_non_numbers(s):
    assert parse_number(s) is None


def test_grade_statuses():
    assert grade(r"... so \boxed{\dfrac{1}{2}}", "0.5") == Verdict("correct", r"\dfrac{1}{2}", answer_correct=True)
    assert grade(r"\boxed{3}", "4").status == "wrong"
    no_answer = grade("I think it is 4", "4")
    assert no_answer.status == "unparsed" and no_answer.answer is None and no_answer.reason == "no_answer"
    assert is_correct("Step 1 ...\n#### 1,080", "1080")
    assert not is_correct("Step 1 ...", "1080")


def test_a_truncated_reply_is_never_correct_but_keeps_its_answer():
    cut = grade(r"so the answer is \boxed{4} and then again and again", "4", finish_reason="length")
    assert cut == Verdict("truncated", "4", answer_correct=True) and not cut.correct
    assert grade(r"\boxed{3} and", "4", finish_reason="length") == Verdict("truncated", "3")
    assert grade("no box yet", "4", finish_reason="length") == Verdict("truncated", None, "no_answer")
    assert not is_correct(r"\boxed{4}", "4", finish_reason="length")
    with pytest.raises(ValueError, match="grading.mode: expected one of strict|flexible"):
        grade(r"\boxed{4}", "4", mode="loose")


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("1 + 2 = 3", None, "3"),  # the weak model's way: right, never boxed
        ("So 2+5-3 = 4.", None, "4"),  # trailing period is not part of the number
        ("5-3 leaves 2 or 5-3", None, "3"),  # a minus after a digit is an operator, not a sign
        ("The answer is -7", None, "-7"),
        ("He pays $1,080 in all", None, "$1,080"),
        ("It weighs 2.5 kg.", None, "2.5"),
        ("no numbers here", None, None),
        ("first 10, then \\boxed{9}, then 12", "9", "9"),  # a box always decides
        ("steps 1 2 3\n#### 8", "8", "8"),
    ],
)
def test_flexible_takes_the_box_else_the_last_number(text, strict, flexible):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


def test_flexible_grading_is_graded_like_strict_once_an_answer_is_found():
    assert grade("1 + 2 = 3", "3", mode="flexible").correct
    assert grade("1 + 2 = 3", "3").status == "unparsed"  # strict sees no answer
    assert grade("1,000 + 80 = 1,080", "1080", mode="flexible").correct  # thousands comma, numeric compare
    assert grade("so 4 apples", "5", mode="flexible").status == "wrong"
    assert grade("it is 5 and", "5", mode="flexible", finish_reason="length").status == "truncated"


def test_cluster_answers_groups_equivalent_answers_by_their_first_member():
    answers = ["1/2", "3", None, "0.5", r"\frac{1}{2}", "3", "7"]
    assert cluster_answers(answers) == [0, 1, None, 0, 0, 1, 6]
    assert cluster_answers([]) == [] and cluster_answers([None]) == [None]


# --------------------------------------------------------------------------------------------------
# Pathological output: never crash, never hang (generous bounds; this is not a benchmark)

PATHOLOGICAL = {
    "1MB of text": "word " * 200_000 + r"\boxed{5}",
    "1MB, no answer": "x" * 1_000_000,
    "10k unbalanced braces": r"\boxed{" + "{" * 10_000,
    "10k closing braces": r"\boxed{1" + "}" * 10_000,
    "deep nesting": r"\boxed{" + "2^{" * 300 + "1" + "}" * 300 + "}",
    "redundant braces": r"\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",  # just 1
    "nesting under the cap": r"\boxed{" + r"\frac{" * 40 + "1" + "}{2}" * 40 + "}",
    "10k boxes": r"\boxed{1}" * 10_000,
    "power tower": r"\boxed{9^{9^{9^{9}}}}",
    "huge exponent": r"\boxed{10^{10^{10}}}",
    "huge factorial": r"\boxed{(10^{100})!}",
    "huge binomial": r"\boxed{\binom{10^{9}}{10^{5}}}",
    "python power": r"\boxed{9**9**9**9}",
    "trailing backslash": "\\boxed{" + "\\" * 999,
}


def _grade_within(text: str, gold: str, bound_s: float = 1.0) -> Verdict:
    t0 = time.perf_counter()
    verdict = grade(text, gold)
    assert time.perf_counter() - t0 < bound_s
    return verdict


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_output_returns_quickly(name):
    verdict = _grade_within(PATHOLOGICAL[name], "5")
    expected = {
        "1MB of text": "correct",
        "10k boxes": "wrong",
        "10k closing braces": "wrong",
        "redundant braces": "wrong",
    }  # they box 5 / 1 / 1
    assert verdict.status == expected.get(name, "unparsed")


def test_pathological_gold_is_safe():
    assert not answers_equal("5", "9^{9^{9^{9}}}")
    assert answers_equal("9^{9^{9^{9}}}", "9^{9^{9^{9}}}")  # identical strings need no evaluation


def test_grading_off_the_main_thread():
    """math-verify's signal timeouts only work on the main thread; off it we must still grade (and not raise)."""
    cases = [
        (r"\boxed{\dfrac12}", "0.5", True),
        (r"\boxed{[2,5)}", "[2, 5)", True),
        (r"\boxed{\frac13}", r"\frac{1}{2}", False),
        (PATHOLOGICAL["power tower"], "5", False),
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        t0 = time.perf_counter()
        got = list(pool.map(lambda c: is_correct(c[0], c[1]), cases))
        assert time.perf_counter() - t0 < 5.0
    assert got == [c[2] for c in cases]
