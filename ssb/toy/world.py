"""The toy world: two-step word problems with planted, wording-tied misconceptions, and its tokenizer.

A small "model organism" of the SSB setting that runs on CPU. Every problem is
``a`` containers of ``b`` items, then a change of ``c`` items (answer ``a*b -/+ c``). Two wordings are traps:

- ``"... with B items each"`` (trigger ``each``): the base model sometimes *adds* ``a + b`` instead of multiplying;
- ``"gives away C"`` (trigger ``gives``): the base model sometimes *adds* ``c`` instead of subtracting.

Neutral wordings (``"A boxes of B pens"``, ``"loses"``, ``"sells"``, ``"buys C more"``) are always handled right.
The bare (student) view writes a short plain solution; in pretraining, solutions of trigger problems follow the
misconception with probability ``MISCONCEPTION_RATE``, so a bare sample fails for a recurring reason. The hinted
(teacher) view writes a *robust* solution in its own style (a goal line, a caution sentence before each trap step,
a closing sentence), never a copy of the shown solution. Pretraining lives in :mod:`ssb.toy.pretrain`
(``python -m ssb.toy pretrain``), measuring in :mod:`ssb.toy.measure`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from ssb.core.files import atomic_write_jsonl

MISCONCEPTION_RATE = 0.5  # share of trigger steps the base model's pretraining data gets wrong
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

NAMES = tuple("Ada Ben Cleo Dev Eli Fay Gus Hana Ivo Jun Kai Lena Milo Nia Omar Pia Quin Rosa Sam Tara".split())
ITEMS = tuple(
    "pens apples stickers marbles cookies books cards shells coins beads stamps eggs pencils buttons candles".split()
)
CONTAINERS = ("boxes", "bags", "packs", "jars", "crates", "baskets")
GROUPS = ("of", "each")  # "each" is a trap
CHANGES = ("gives", "loses", "sells", "buys", "finds")  # "gives" is a trap
SUBTRACT = ("gives", "loses", "sells")
CHANGE_TEXT = {
    "gives": "Then {name} gives away {c} of them.",
    "loses": "Then {name} loses {c} of them.",
    "sells": "Then {name} sells {c} of them.",
    "buys": "Then {name} buys {c} more {item}.",
    "finds": "Then {name} finds {c} more {item}.",
}
CAUTION_EACH = (
    'Careful: "each" means we multiply, not add.',
    "Watch out: with a number of items each, adding would be wrong here, we multiply.",
    'Note that "each" calls for multiplication, not addition.',
)
CAUTION_GIVES = (
    "Careful: giving away makes the total smaller, so we subtract, not add.",
    "Watch out: adding would be wrong, giving away means subtracting.",
    "Note that giving some away leaves fewer, so we subtract.",
)
SPLITS = ("pretrain", "train", "test")


@dataclass(frozen=True)
class ToyProblem:
    """One world problem. ``a`` containers x ``b`` items, then ``change`` by ``c`` items."""

    name: str
    item: str
    container: str
    group: str  # "of" | "each"
    change: str  # one of CHANGES
    a: int
    b: int
    c: int

    @property
    def traps(self) -> tuple[str, ...]:
        return tuple(t for t, on in (("each", self.group == "each"), ("gives", self.change == "gives")) if on)

    def split(self) -> str:
        """Deterministic split from the problem's structure (wording + numbers, not the names): 80/10/10."""
        key = f"{self.group}|{self.change}|{self.a}|{self.b}|{self.c}"
        h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
        return "test" if h == 0 else "train" if h == 1 else "pretrain"

    def question(self) -> str:
        n, it, co = self.name, self.item, self.container
        if self.group == "of":
            first = f"{n} has {self.a} {co} of {self.b} {it}."
        else:
            first = f"{n} has {self.a} {co} with {self.b} {it} each."
        second = CHANGE_TEXT[self.change].format(name=n, c=self.c, item=it)
        return f"{first} {second} How many {it} does {n} have now?"

    def values(self, wrong_each: bool = False, wrong_gives: bool = False) -> tuple[int, str, int, int]:
        """(first-step value, second-step operator, second-step value, answer) under the given misconceptions."""
        p = self.a + self.b if (wrong_each and self.group == "each") else self.a * self.b
        sub = self.change in SUBTRACT and not (wrong_gives and self.change == "gives")
        r = p - self.c if sub else p + self.c
        return p, "-" if sub else "+", r, r

    def answer(self) -> int:
        return self.values()[3]

    def steps(self, wrong_each: bool = False, wrong_gives: bool = False) -> tuple[str, str, int]:
        """The two step lines both styles write (first step, second step) and the answer they reach."""
        p, op, r, _ = self.values(wrong_each, wrong_gives)
        op1 = "+" if (wrong_each and self.group == "each") else "*"
        first = f"{self.name} has {self.a} {op1} {self.b} = {p} {self.item}."
        return first, f"Then {self.name} has {p} {op} {self.c} = {r} {self.item}.", r

    def plain_solution(self, wrong_each: bool = False, wrong_gives: bool = False) -> str:
        """The bare-view style (what the base model writes), optionally following the misconceptions."""
        first, second, r = self.steps(wrong_each, wrong_gives)
        return f"{first}\n{second}\n\\boxed{{{r}}}"

    def robust_solution(self, rng: random.Random, wrong_each: bool = False, wrong_gives: bool = False) -> str:
        """The hinted-view style: a goal line, a caution sentence before each trap step (no numbers in it), the
        steps in the plain wording, and a closing sentence; correct unless a misconception flag is set.

        It stays close to the bare style on purpose: the student must be able to *execute* what it distils (an
        earlier style with labelled "Step 1/2" lines and cautions quoting numbers left students unable to fill
        in the question's numbers), so what the teacher adds is the right operation at each trap and the
        warning before it. It never contains the shown plain solution (the goal and closing lines break it), so
        it is not a copy. The misconception flags make the wrong attempts a student distilled from this style
        writes (the caution written, the wrong operation done anyway); the teacher itself never uses them."""
        first, second, r = self.steps(wrong_each, wrong_gives)
        lines = [f"We need the number of {self.item} {self.name} has at the end."]
        if self.group == "each":
            lines.append(rng.choice(CAUTION_EACH))
        lines.append(first)
        if self.change == "gives":
            lines.append(rng.choice(CAUTION_GIVES))
        lines.append(second)
        lines.append(f"So {self.name} has {r} {self.item} now.\n\\boxed{{{r}}}")
        return "\n".join(lines)

    def misconception_answers(self) -> set[int]:
        """Answers reached by following at least one planted misconception (empty without traps)."""
        out = set()
        for we, wg in ((True, False), (False, True), (True, True)):
            ans = self.values(we, wg)[3]
            if ans != self.answer():
                out.add(ans)
        return out


def sample_problem(rng: random.Random) -> ToyProblem:
    """Draw one problem: ~80% have exactly one trap, ~10% none, ~10% both."""
    u = rng.random()
    if u < 0.4:
        group, change = "each", rng.choice(CHANGES[1:])
    elif u < 0.8:
        group, change = "of", "gives"
    elif u < 0.9:
        group, change = "of", rng.choice(CHANGES[1:])
    else:
        group, change = "each", "gives"
    # Small numbers (every value < 100, c one digit) so that the arithmetic itself is learned reliably.
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    c = rng.randint(1, min(9, a + b - 1))  # keeps every answer (correct or misconceived) positive
    return ToyProblem(rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS), group, change, a, b, c)


def problems(split: str, n: int, seed: int) -> list[ToyProblem]:
    """``n`` distinct problems of one split (by question text), deterministic in ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"toy-{split}-{seed}")
    out: list[ToyProblem] = []
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        p = sample_problem(rng)
        if p.split() == split and p.question() not in seen:
            seen.add(p.question())
            out.append(p)
    raise ValueError(f"could not draw {n} distinct {split} problems (seed {seed})")


def gsm8k_record(p: ToyProblem) -> dict:
    """GSM8K-style record: the answer field ends with ``#### N``."""
    return {"question": p.question(), "answer": f"{p.plain_solution()}\n#### {p.answer()}"}


def write_splits(out_dir: str | Path, n_train: int, n_test: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` / ``test.jsonl`` (GSM8K-style, disjoint in structure, unseen in pretraining)."""
    out = Path(out_dir)
    paths = out / "train.jsonl", out / "test.jsonl"
    atomic_write_jsonl(paths[0], [gsm8k_record(p) for p in problems("train", n_train, seed)])
    atomic_write_jsonl(paths[1], [gsm8k_record(p) for p in problems("test", n_test, seed)])
    return paths


def asset_path() -> Path:
    """Directory of the shipped toy model + tokenizer (loadable with from_pretrained and vLLM)."""
    return Path(__file__).resolve().parents[1] / "assets" / "toy"


# --------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE with single-digit tokens (arithmetic stays learnable), ChatML specials


def build_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """Train a small byte-level BPE on ``corpus`` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tokenizer_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Texts the BPE is trained on: prompts, both solution styles, the hinted template, drills."""
    from ssb.core.prompts import HINTED_TEMPLATE, SYSTEM_PROMPT

    rng = random.Random(f"toy-tokenizer-{seed}")
    texts = [SYSTEM_PROMPT, HINTED_TEMPLATE] * 50
    for _ in range(n):
        p = sample_problem(rng)
        texts += [p.question(), p.plain_solution(), p.plain_solution(True, True), p.robust_solution(rng)]
    return texts
