"""``arith``: a generated, graded set of one- and two-step arithmetic word problems in GSM8K format.

For small real models (SmolLM2-135M-Instruct solves about 1 GSM8K problem in 100, by the last number of its
reply) that still need problems they solve part of the time, so that rollouts have both outcomes. Five levels,
taken in turn (a question already drawn is skipped, so the shares are near, not exactly, equal):

1. single-digit addition ("has 3 ..., gets 4 more"),
2. subtraction below 20 ("gives away"),
3. single-digit multiplication ("4 bags with 6 ... in each"),
4. two-digit addition,
5. two steps (add, then give away).

Splits are deterministic: problem ``i`` of a split is drawn from a generator seeded by ``(split, i)``. ``val`` and
``test`` never repeat a question of ``train`` (or of each other), so neither tuning nor testing sees a training
question.
"""

from __future__ import annotations

import random

SIZES = {"train": 2000, "val": 300, "test": 500}
LEVELS = 5
EASY_LEVELS = (1, 2, 3)  # the one-step single-digit levels: the ``arith_easy`` source (SmolLM2-135M: ~26% on val)
NAMES = ("Tom", "Ana", "Li", "Sam", "Mia", "Raj", "Eva", "Ben", "Kim", "Omar", "Zoe", "Ivan")
ITEMS = ("apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles", "stickers", "cookies")


def _problem(rng: random.Random, level: int) -> tuple[str, str, int]:
    """(question, worked solution, answer) of one problem at ``level``."""
    n, it = rng.choice(NAMES), rng.choice(ITEMS)
    if level == 1 or level == 4:
        lo, hi = (1, 9) if level == 1 else (10, 99)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        q = f"{n} has {a} {it}. {n} gets {b} more {it}. How many {it} does {n} have now?"
        return q, f"{n} has {a} + {b} = {a + b} {it}.", a + b
    if level == 2:
        a = rng.randint(5, 19)
        b = rng.randint(1, a - 1)
        q = f"{n} has {a} {it}. {n} gives away {b} {it}. How many {it} does {n} have left?"
        return q, f"{n} has {a} - {b} = {a - b} {it} left.", a - b
    if level == 3:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{n} has {a} bags with {b} {it} in each bag. How many {it} does {n} have?"
        return q, f"{n} has {a} x {b} = {a * b} {it}.", a * b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, a + b - 1)
    q = f"{n} has {a} {it} and gets {b} more. Then {n} gives away {c} {it}. How many {it} does {n} have left?"
    return q, f"{n} has {a} + {b} = {a + b} {it}, then {a + b} - {c} = {a + b - c} {it} left.", a + b - c


def _draw(split: str, n: int, exclude: set[str]) -> list[dict]:
    out: list[dict] = []
    seen = set(exclude)
    i = 0
    while len(out) < n:
        rng = random.Random(f"arith/{split}/{i}")  # str seeds are hashed with sha512: the same in every process
        level = 1 + i % LEVELS
        q, work, ans = _problem(rng, level)
        i += 1
        if q in seen:
            continue
        seen.add(q)
        out.append({"question": q, "answer": f"{work}\n#### {ans}", "level": level})
    return out


def problems(split: str, n: int | None = None) -> list[dict]:
    """The first ``n`` (default: the split's size) GSM8K-format records ``{question, answer, level}`` of ``split``."""
    if split not in SIZES:
        raise ValueError(f"arith: no split {split!r} (has {sorted(SIZES)})")
    n = SIZES[split] if n is None else n
    if split == "train":
        return _draw("train", n, set())
    train = {r["question"] for r in _draw("train", SIZES["train"], set())}
    if split == "val":
        return _draw("val", n, train)
    val = {r["question"] for r in _draw("val", SIZES["val"], train)}
    return _draw("test", n, train | val)
