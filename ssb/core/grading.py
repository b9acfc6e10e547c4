"""Grading by final answer: extract the last ``\\boxed{...}`` (or ``\\fbox``, or GSM8K ``#### N``), then decide
equivalence with a fast exact numeric normaliser and, for LaTeX, math-verify (gold first).

Pure and thread-safe. math-verify bounds its work with ``signal.alarm``, which only works on the main thread;
off the main thread we pass ``parsing_timeout=None`` / ``timeout_seconds=None`` (its documented way to disable
them) and rely on our own guards instead: every input is length-capped, brace matching is iterative, and answers
whose evaluation could explode (nested powers, huge exponents or factorials, deep nesting) never reach sympy.
Such answers, like text without any final answer, grade as ``"unparsed"``.

:func:`grade` is the one verdict every stage uses (rollout, curation, eval): a reply that hit its token limit
(``finish_reason="length"``) is never correct, whatever its text says, because it never committed to a final
answer. ``mode`` names how the final answer is found, and is recorded with every result that depends on it:

- ``"strict"`` (default): the last ``\\boxed{}``, else the text after ``####``; no box, no answer.
- ``"flexible"``: the strict answer when there is one, else the last number of the reply, like lm-eval's GSM8K
  "flexible-extract". Weak models that compute right but never box (SmolLM2-135M boxes about 1 reply in 50)
  are visible under it; reports show both, so a student that only learned to box stands out.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Literal

MAX_ANSWER_CHARS = 1_000  # a boxed answer longer than this is not an answer
MAX_VERIFY_CHARS = 250  # longer answers are compared as normalised strings only (no sympy)
MAX_BRACE_DEPTH = 12  # deeper nesting is compared as a string only (antlr/sympy recursion)
MAX_EXPONENT = 10_000  # a literal exponent above this (or any nested power) never reaches sympy
MAX_FACTORIAL = 1_000
MV_TIMEOUT_S = 2  # math-verify's own signal timeouts, used only on the main thread

Status = Literal["correct", "wrong", "unparsed", "truncated"]
GRADING_MODES = ("strict", "flexible")  # grading.mode (config.py validates against this)


@dataclass(frozen=True)
class Verdict:
    """Outcome of grading one model output against a gold answer."""

    status: Status
    answer: str | None  # the extracted final answer (None when nothing was found), truncated replies too
    reason: str = ""  # why "unparsed": "no_answer" or "too_complex"
    answer_correct: bool = False  # the answer alone matches the gold (True for a truncated reply with a right box)

    @property
    def correct(self) -> bool:
        return self.status == "correct"


# --------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_TOKEN_RE = re.compile(r"[ \t]*([^\s$]+)")  # \boxed 5  (no braces: one whitespace-delimited token)


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == "{"``; None if unbalanced within the cap.

    Escaped braces (``\\{``) are content, not structure. Iterative, so deep nesting cannot overflow.
    """
    depth = 0
    i = start
    end = min(len(text), start + MAX_ANSWER_CHARS + 2)
    while i < end:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def _box_content(text: str, pos: int) -> str | None:
    """The argument of the ``\\boxed``/``\\fbox`` command ending at ``pos``."""
    j = pos
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        return _braced(text, j)
    m = _BARE_TOKEN_RE.match(text, pos)
    return m.group(1).rstrip(".,;:") if m else None


def _rfind_command(text: str, name: str) -> int:
    """End offset of the last ``name`` command (not a prefix of a longer name like ``\\boxedx``), or -1."""
    end = len(text)
    while (i := text.rfind(name, 0, end)) >= 0:
        j = i + len(name)
        if j >= len(text) or not text[j].isalpha():
            return j
        end = i
    return -1


def _whole_box(s: str) -> str | None:
    """``X`` when ``s`` is exactly ``\\boxed{X}`` (or ``\\fbox{X}``), else None."""
    m = _BOX_RE.match(s)
    if m is None:
        return None
    j = m.end() + len(s[m.end() :]) - len(s[m.end() :].lstrip())
    if j < len(s) and s[j] == "{" and _braced(s, j) == s[j + 1 : -1]:
        return s[j + 1 : -1]
    return None


# 12, -3, $1,080, 2.5; no trailing dot or comma; "5-3" ends in 3, not -3 (a minus after a digit is an operator)
_LAST_NUMBER_RE = re.compile(r"(?:(?<![\w)\]])-)?\$?\d(?:[\d,]*\d)?(?:\.\d+)?")


def extract_answer(text: str | None, mode: str = "strict") -> str | None:
    """The final answer of a model output under grading ``mode``, or None.

    ``flexible``: when the text has no box and no ``####`` answer, the last number in the text.

    The last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces; also ``\\boxed 5``) decides; if it is unbalanced
    or empty the output has no answer (an earlier box is not a fallback: the final one is the claim). Without
    any box, the text after the last ``####`` on its line (GSM8K style). Nested boxes are unwrapped.
    """
    if not text:
        return None
    last = max(_rfind_command(text, "\\boxed"), _rfind_command(text, "\\fbox"))
    if last >= 0:
        content = _box_content(text, last)
        while content is not None and (inner := _whole_box(content.strip())) is not None:  # \boxed{\boxed{5}}
            content = inner
        content = content.strip() if content is not None else None
        return content if content and len(content) <= MAX_ANSWER_CHARS else None
    hashes = text.rfind("####")
    if hashes >= 0:
        line = text[hashes + 4 :].split("\n", 1)[0].strip()
        if line and len(line) <= MAX_ANSWER_CHARS:
            return line
    if mode == "flexible":
        numbers = _LAST_NUMBER_RE.findall(text[-20_000:])  # the tail: a runaway reply is not scanned whole
        return numbers[-1] if numbers else None
    return None


# --------------------------------------------------------------------------------------------------
# Numeric normaliser: exact decimal comparison of plain numbers ("1,080", "$18", "70%", "025", "18.0")

_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_UNIT_SUFFIX_RE = re.compile(r"^(.*?\d)\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}$")
_NUMBER_RE = re.compile(r"^[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$")


def _clean(s: str) -> str:
    """Whitespace- and wrapper-insensitive form used for string equality and the numeric parser."""
    s = s.strip().replace("\u2212", "-").replace("{,}", ",")
    for tok in ("\\!", "\\,", "\\;", "\\:", "\\left", "\\right", "\\displaystyle"):
        s = s.replace(tok, "")
    s = s.replace("\\ ", " ")
    s = s.strip().strip("$").strip()
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _braced(s, 0) == s[1:-1]:
        s = s[1:-1].strip()
    return " ".join(s.split())


def parse_number(s: str) -> Decimal | None:
    """Decimal value of a plain number with optional ``$``/``\\$``, thousands commas, ``%``, degree sign or a
    ``\\text{unit}`` suffix; None for anything else (fractions and LaTeX go to math-verify)."""
    s = _clean(s)
    m = _UNIT_SUFFIX_RE.match(s)
    if m:
        s = m.group(1)
    s = _TEXT_WRAP_RE.sub(r"\1", s).replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\u00b0", "").replace(" ", "")
    if not s or len(s) > 60 or not _NUMBER_RE.match(s) or not any(c.isdigit() for c in s):
        return None
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:
        return None


# --------------------------------------------------------------------------------------------------
# math-verify, behind guards


def _too_costly(s: str) -> bool:
    """Could parsing/simplifying ``s`` with sympy take unbounded time or recursion? (cheap, conservative)."""
    if len(s) > MAX_VERIFY_CHARS:
        return True
    depth = max_depth = 0
    for c in s:
        depth += (c == "{") - (c == "}")
        max_depth = max(max_depth, depth)
    if max_depth > MAX_BRACE_DEPTH:
        return True
    t = s.replace("**", "^")
    for m in re.finditer(r"\^", t):
        rest = t[m.end() :].lstrip()
        expo = _braced(rest, 0) if rest.startswith("{") else re.match(r"[^\s^{}]*", rest).group(0)
        if expo is None or any(x in expo for x in ("^", "!", "binom", "choose")):
            return True
        if rest[len(expo) + 2 * rest.startswith("{") :].lstrip().startswith("^"):  # chained a^b^c
            return True
        if any(int(d) > MAX_EXPONENT for d in re.findall(r"\d+", expo[:40])) or len(expo) > 40:
            return True
    for m in re.finditer(r"!", t):
        digits = re.search(r"(\d+)\s*$", t[: m.start()])
        if digits is None or len(digits.group(1)) > 6 or int(digits.group(1)) > MAX_FACTORIAL:
            return True
    if ("binom" in t or "choose" in t) and ("^" in t or any(len(d) > 4 for d in re.findall(r"\d+", t))):
        return True
    return False


_silence_filter_installed = False


def _silence_timeout_notice() -> None:
    """math-verify logs a warning the first time timeouts are disabled; we disable them on purpose."""
    global _silence_filter_installed
    if _silence_filter_installed:
        return

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Timeout is disabled" not in record.getMessage()

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_Drop())
    _silence_filter_installed = True


def _math_verify_equal(pred: str, gold: str) -> bool:
    from math_verify import parse, verify

    _silence_timeout_notice()
    t = MV_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"${gold}$", parsing_timeout=t)
        p = parse(f"${pred}$", parsing_timeout=t)
        return bool(g and p and verify(g, p, timeout_seconds=t))
    except Exception:  # noqa: BLE001 - a grader never crashes on model output; unparseable means not equal
        return False


# --------------------------------------------------------------------------------------------------
# Public API


def _compare(pred: str, gold: str) -> Status:
    pc, gc = _clean(pred), _clean(gold)
    if pc == gc and pc:
        return "correct"
    pn, gn = parse_number(pred), parse_number(gold)
    if pn is not None and gn is not None:  # both plain numbers: exact and decisive
        return "correct" if pn == gn else "wrong"
    if _too_costly(pc) or _too_costly(gc):
        return "unparsed"
    return "correct" if _math_verify_equal(pc, gc) else "wrong"


def answers_equal(pred: str | None, gold: str | None) -> bool:
    """Are two final answers equivalent? ``gold`` is the reference (math-verify is not symmetric)."""
    if pred is None or gold is None or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    return _compare(pred, gold) == "correct"


def grade(text: str | None, gold: str, *, finish_reason: str = "stop", mode: str = "strict") -> Verdict:
    """Grade one model reply: "correct", "wrong", "unparsed" (no final answer, or one too complex to check) or
    "truncated" (``finish_reason == "length"``: never correct; ``answer`` and ``answer_correct`` still say what
    its last box held, so a protocol can report both counts).
    """
    if mode not in GRADING_MODES:
        raise ValueError(f"grading.mode: expected one of {'|'.join(GRADING_MODES)}, got {mode!r}")
    pred = extract_answer(text, mode)
    if pred is None:
        status: Status = "unparsed"
        reason = "no_answer"
    else:
        status = _compare(pred, gold)
        reason = "too_complex" if status == "unparsed" else ""
    if finish_reason == "length":
        return Verdict("truncated", pred, reason, answer_correct=status == "correct")
    return Verdict(status, pred, reason, answer_correct=status == "correct")


def is_correct(text: str | None, gold: str, *, finish_reason: str = "stop", mode: str = "strict") -> bool:
    """Shorthand for ``grade(...).correct``."""
    return grade(text, gold, finish_reason=finish_reason, mode=mode).correct


def cluster_answers(answers: list[str | None]) -> list[int | None]:
    """Group equivalent final answers: per answer, the index of the first earlier (or same) answer equivalent to
    it; None for a missing answer. Curation's "most common wrong answer" and eval's maj@k both vote with this.

    Equivalence is :func:`answers_equal` with the group's first answer as the reference, tried in order of
    first appearance; identical strings are one answer without asking the grader.
    """
    reps: list[int] = []
    out: list[int | None] = []
    for i, ans in enumerate(answers):
        if ans is None:
            out.append(None)
            continue
        home = next((r for r in reps if answers[r] == ans or answers_equal(ans, answers[r])), None)
        if home is None:
            reps.append(i)
            home = i
        out.append(home)
    return out
