"""Dataset loading: benchmarks through ``datasets`` offline (mirror + saved datasets), local files, malformed input."""

import json

import pytest

from ssb.core.data import Problem, ProblemList, load_problems
from ssb.core.files import InputError
from ssb.core.grading import answers_equal

# Rows in the hub datasets' own column layout (values modelled on real records).
GSM8K_ROWS = [
    {"question": "Tom buys 3 packs of 360 cards. How many cards?", "answer": "3 * 360 = <<3*360=1080>>1080\n#### 1080"},
    {"question": "A shirt costs $20 ...", "answer": "20 - 2 = <<20-2=18>>18\n#### 18"},
    {"question": "What share ...?", "answer": "7/10 = 70%\n#### 70"},
]
MATH500_ROWS = [
    {
        "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
        "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    {
        "problem": "What is $\\frac{2}{4}$?",
        "solution": "...",
        "answer": "\\frac{1}{2}",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
]
AIME_ROWS = [
    {"id": 60, "problem": "Find the remainder ...", "solution": "...", "answer": "025", "url": "u", "year": "2024"}
]


def _hub_repo(root, hub_path, files: dict[str, list[dict]], readme: str | None = None):
    """A local copy of a hub dataset repository: data files (+ README config block), as on the hub."""
    import datasets

    repo = root / hub_path
    for rel, rows in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(repo / rel))
    if readme:
        (repo / "README.md").write_text(readme)
    return repo


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """SSB_DATASETS_MIRROR with GSM8K (config "main"), MATH-500 and AIME 2024 laid out as their hub repos."""
    import datasets

    root = tmp_path / "mirror"
    gsm_readme = "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
    gsm_readme += "  - split: test\n    path: main/test-*\n---\n"
    _hub_repo(
        root, "openai/gsm8k", {"main/train-0.parquet": GSM8K_ROWS[:1], "main/test-0.parquet": GSM8K_ROWS}, gsm_readme
    )
    _hub_repo(root, "HuggingFaceH4/MATH-500", {"test.parquet": MATH500_ROWS})
    _hub_repo(root, "HuggingFaceH4/aime_2024", {"data/train-0.parquet": AIME_ROWS})
    monkeypatch.setenv("SSB_DATASETS_MIRROR", str(root))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    return root


def test_gsm8k_through_load_dataset(mirror):
    problems = load_problems("gsm8k")  # default split: test
    assert isinstance(problems, ProblemList) and problems.skipped == []
    assert [p.answer for p in problems] == ["1080", "18", "70"]  # gold = text after ####
    assert problems[0].id == "gsm8k/test/0" and problems[0].source == "gsm8k"
    assert problems[0].meta["solution"].endswith("#### 1080")
    assert [p.question for p in load_problems("openai/gsm8k", "train")] == [GSM8K_ROWS[0]["question"]]


def test_math500_and_aime_through_load_dataset(mirror):
    math = load_problems("math500")
    assert [p.id for p in math] == ["test/precalculus/807.json", "test/prealgebra/1.json"]
    assert math[0].meta["level"] == 2 and math[0].meta["subject"] == "Precalculus"
    assert answers_equal("(3, \\frac{\\pi}{2})", math[0].answer) and answers_equal("0.5", math[1].answer)
    aime = load_problems("aime2024")
    assert aime[0].id == "60" and aime[0].meta["year"] == "2024"
    assert answers_equal("25", aime[0].answer)  # "025" == "25"
    assert len(load_problems("math500", limit=1)) == 1


def test_hub_name_calls_load_dataset_with_the_benchmark_config(monkeypatch):
    """Without a mirror, aliases resolve to the real hub repositories and configs."""
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kw):
        calls.append((path, name))
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(GSM8K_ROWS)})

    monkeypatch.delenv("SSB_DATASETS_MIRROR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_problems("gsm8k", "test")) == 3
    assert len(load_problems("someone/other", "test", subset="cfg")) == 3  # generic hub name, default fields
    assert calls == [("openai/gsm8k", "main"), ("someone/other", "cfg")]
    with pytest.raises(InputError, match="no split 'validation'"):
        load_problems("gsm8k", "validation")


def test_saved_dataset_directory(tmp_path):
    import datasets

    dsd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(MATH500_ROWS), "test": datasets.Dataset.from_list(MATH500_ROWS[:1])}
    )
    dsd.save_to_disk(str(tmp_path / "saved"))
    problems = load_problems(tmp_path / "saved", "train")
    assert [p.answer for p in problems] == [r["answer"] for r in MATH500_ROWS]
    assert problems[1].id == "test/prealgebra/1.json"  # unique_id is an id column by default
    datasets.Dataset.from_list(GSM8K_ROWS).save_to_disk(str(tmp_path / "single"))
    assert [p.answer for p in load_problems(tmp_path / "single")] == ["1080", "18", "70"]


# --------------------------------------------------------------------------------------------------
# Local files


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_local_jsonl_json_parquet_agree(tmp_path):
    import datasets

    rows = [{"prompt": r["question"], "target": r["answer"], "tag": i} for i, r in enumerate(GSM8K_ROWS)]
    _write_lines(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    (tmp_path / "p.json").write_text(json.dumps({"data": rows}))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    loaded = [
        load_problems(tmp_path / f"p.{ext}", question="prompt", answer="target") for ext in ("jsonl", "json", "parquet")
    ]
    for problems in loaded:
        assert [(p.question, p.answer, p.meta["tag"]) for p in problems] == [
            (r["prompt"], gsm, i) for i, (r, gsm) in enumerate(zip(rows, ["1080", "18", "70"]))
        ]
    assert [p.id for p in loaded[0]] == ["p-1", "p-2", "p-3"]  # file stem + line number


def test_local_json_lines_in_a_json_file_and_numeric_answers(tmp_path):
    rows = [{"id": "a", "problem": "p", "answer": 25}, {"id": "b", "problem": "q", "answer": 2.5}]
    path = _write_lines(tmp_path / "x.json", [json.dumps(r) for r in rows])
    assert load_problems(path) == [Problem("a", "p", "25", str(path), {}), Problem("b", "q", "2.5", str(path), {})]


def test_toy_source_matches_its_split_files(tmp_path):
    toy = pytest.importorskip("ssb.toy.world")
    toy.write_splits(tmp_path, n_train=3, n_test=4, seed=0)
    from_files = load_problems(tmp_path / "test.jsonl")
    in_memory = load_problems("toy", "test", limit=4)
    assert [(p.question, p.answer) for p in in_memory] == [(p.question, p.answer) for p in from_files]
    assert in_memory[0].id == "toy/test/0" and all(p.answer.lstrip("-").isdigit() for p in in_memory)
    assert len(load_problems("toy", "train", limit=1500)) == 1500  # a limit beyond the default size is honoured


def test_toy_val_split_is_held_out_from_rollouts_and_test():
    pytest.importorskip("ssb.toy.world")
    val = load_problems("toy_val")
    assert len(val) == 500 and val[0].id == "toy/val/0"
    assert [p.question for p in load_problems("toy", "val", limit=50)] == [p.question for p in val[:50]]
    # the val split continues the train sequence past the 1,000 problems any rollout can reach
    train_tail = load_problems("toy", "train", limit=1010)[1000:]
    assert [p.question for p in train_tail] == [p.question for p in val[:10]]
    rollout_reach = {p.question for p in load_problems("toy", "train")}
    test = {p.question for p in load_problems("toy", "test")}
    assert rollout_reach.isdisjoint(p.question for p in val) and test.isdisjoint(p.question for p in val)


# --------------------------------------------------------------------------------------------------
# Malformed input: errors name file and line; skip_invalid skips, counts and reports


BAD_LINES = [
    json.dumps({"question": "q1", "answer": "#### 1"}),  # line 1 ok
    '{"question": "q2", "answer": ',  # line 2 bad JSON
    json.dumps({"answer": "3"}),  # line 3 missing question
    json.dumps({"question": "q4", "answer": "  "}),  # line 4 empty answer
    json.dumps({"question": "q5", "answer": "text\n####   "}),  # line 5 empty after ####
    "",  # line 6 blank: ignored
    json.dumps({"question": "q7", "answer": {"x": 1}}),  # line 7 wrong type
    json.dumps({"question": "q8", "answer": "8", "id": "dup"}),  # line 8 ok
    json.dumps({"question": "q9", "answer": "9", "id": "dup"}),  # line 9 duplicate id
    "[1, 2]",  # line 10 not an object
    json.dumps({"question": "q11", "answer": "11"}),  # line 11 ok
]


@pytest.mark.parametrize(
    "first_bad, message",
    [(2, "invalid JSON"), (3, "missing field"), (4, "empty answer"), (5, "empty answer"), (7, "must be text")],
)
def test_malformed_line_raises_with_file_and_line(tmp_path, first_bad, message):
    lines = [json.dumps({"question": f"q{i}", "answer": "1"}) for i in range(first_bad - 1)] + [
        BAD_LINES[first_bad - 1]
    ]
    path = _write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(InputError, match=rf"bad\.jsonl:{first_bad}: .*{message}"):
        load_problems(path)


def test_skip_invalid_counts_and_reports(tmp_path, caplog):
    path = _write_lines(tmp_path / "bad.jsonl", BAD_LINES)
    with caplog.at_level("WARNING", logger="ssb.core.data"):
        problems = load_problems(path, skip_invalid=True)
    assert [p.question for p in problems] == ["q1", "q8", "q11"]
    assert [s.where.rsplit(":", 1)[1] for s in problems.skipped] == ["2", "3", "4", "5", "7", "9", "10"]
    assert "duplicate id 'dup'" in str(problems.skipped[5]) and str(path) in str(problems.skipped[0])
    assert "skipped 7 invalid record(s)" in caplog.text
    assert len(load_problems(path, skip_invalid=True, limit=2)) == 2


def test_bad_sources_and_arguments(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unsupported file type"):
        load_problems(tmp_path / "x.csv")
    (tmp_path / "broken.json").write_text('[{"question": "q",\n "answer": }]')
    with pytest.raises(InputError, match=r"broken\.json:2: invalid JSON"):
        load_problems(tmp_path / "broken.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"broken\.parquet: cannot read parquet"):
        load_problems(tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match="unknown field mapping \\['solution'\\]"):
        load_problems(tmp_path / "missing.jsonl", solution="x")
    with pytest.raises(InputError, match="toy: no split 'dev'"):
        load_problems("toy", "dev")


def test_arith_splits_are_deterministic_disjoint_graded_and_right():
    import re

    from ssb.core import arith
    from ssb.core.grading import grade

    train, val, test = (load_problems("arith", s) for s in ("train", "val", "test"))
    assert [len(train), len(val), len(test)] == [arith.SIZES[s] for s in ("train", "val", "test")]
    q = [{p.question for p in ps} for ps in (train, val, test)]
    assert not (q[0] & q[1] or q[0] & q[2] or q[1] & q[2])  # no question is in two splits
    assert [p.question for p in load_problems("arith_val", limit=7)] == [p.question for p in val[:7]]
    assert [p.meta["level"] for p in test[:10]] == [1, 2, 3, 4, 5] * 2
    for p in train[:200] + test[:200]:  # the worked solution's arithmetic gives the gold answer
        steps = re.findall(r"(\d+) ([-+x]) (\d+) = (\d+)", p.meta["solution"])
        assert steps
        for a, op, b, c in steps:
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "x": a * b}[op] == c
        assert int(p.answer) == int(steps[-1][3]) >= 0
        assert grade(p.meta["solution"], p.answer).correct
    with pytest.raises(InputError, match="arith: limit 501 is more than the test split's 500"):
        load_problems("arith", "test", limit=501)


def test_arith_easy_is_levels_1_to_3_of_the_same_splits_with_the_same_ids():
    full = {p.id: p for p in load_problems("arith", "test")}
    easy = load_problems("arith_easy", "test")
    assert {p.meta["level"] for p in easy} == {1, 2, 3}
    assert len(easy) == sum(p.meta["level"] <= 3 for p in full.values())  # every easy problem, no other
    assert all(full[p.id].question == p.question for p in easy)  # same problem, same id as in `arith`
    val = load_problems("arith_easy_val", limit=5)
    assert [p.id for p in val] == [p.id for p in load_problems("arith", "val") if p.meta["level"] <= 3][:5]
    with pytest.raises(InputError, match=f"limit 999 is more than the test split's {len(easy)} problems"):
        load_problems("arith_easy", "test", limit=999)
