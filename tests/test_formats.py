"""Data in the field's formats: any saved or hub-named Hugging Face dataset through ``data.field_map``, and the
curated pairs exported as a Hugging Face dataset (``curate.export_hf``) that loads back equal to student.jsonl."""

from __future__ import annotations

import json

import datasets
import pytest
from test_curation import make_run

from ssb.config import load_config
from ssb.core.files import InputError
from ssb.curate import run_curation
from ssb.rollout import load_stage_problems

ROWS = [
    {"prompt": "What is 2 + 3?", "target": "5", "qid": "a"},
    {"prompt": "What is 4 * 5?", "target": "#### 20", "qid": "b"},
    {"prompt": "", "target": "1", "qid": "c"},  # invalid: empty question
]
FIELD_MAP = ["data.field_map.question=prompt", "data.field_map.answer=target", "data.field_map.id=qid"]


def stage_problems(source, *extra):
    cfg = load_config(None, [f"data.source={source}", "data.split=train", *FIELD_MAP, *extra])
    return load_stage_problems(cfg)


def test_saved_dataset_with_field_map_and_skip_invalid(tmp_path):
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(InputError, match="empty question"):
        stage_problems(tmp_path / "saved")
    problems, report = stage_problems(tmp_path / "saved", "data.skip_invalid=true")
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("a", "What is 2 + 3?", "5"),
        ("b", "What is 4 * 5?", "20"),
    ]
    assert report["loaded"] == 2 and report["skipped"] == 1 and "row 2" in report["skipped_examples"][0]
    datasets.Dataset.from_list(ROWS[:2]).save_to_disk(str(tmp_path / "single"))  # a Dataset, not a DatasetDict
    assert [p.id for p in stage_problems(tmp_path / "single")[0]] == ["a", "b"]


def test_hub_name_with_field_map(tmp_path, monkeypatch):
    """A hub dataset by name (served here by a local mirror of its repository, as on an offline cluster)."""
    repo = tmp_path / "mirror" / "someone" / "mathset"
    repo.mkdir(parents=True)
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    monkeypatch.setenv("SSB_DATASETS_MIRROR", str(tmp_path / "mirror"))
    problems, _ = stage_problems("someone/mathset")
    assert [(p.id, p.answer) for p in problems] == [("a", "5"), ("b", "20")]


def test_curate_export_hf_loads_back_equal_to_student_pairs(tmp_path):
    cfg, engine = make_run(tmp_path, **{"curate.export_hf": "true"})
    stats = run_curation(cfg, engine=engine)
    curate = tmp_path / "run" / "curate"
    student = [json.loads(x) for x in (curate / "student.jsonl").read_text().splitlines()]
    ds = datasets.load_from_disk(str(curate / "hf"))
    assert stats["pairs"] == len(student) == len(ds) > 0
    assert ds.column_names == ["id", "messages", "answer"]
    assert [dict(row) for row in ds] == student
    assert [m["role"] for m in ds[0]["messages"]] == ["system", "user", "assistant"]  # TRL's conversational format


def test_export_hf_is_off_by_default_and_changes_no_curation_state(tmp_path):
    from ssb.curate import _curation_hash

    cfg, engine = make_run(tmp_path)
    run_curation(cfg, engine=engine)
    assert not (tmp_path / "run" / "curate" / "hf").exists()
    on = load_config(None, [f"run_dir={cfg.run_dir}", "curate.export_hf=true"])
    assert _curation_hash(on) == _curation_hash(load_config(None, [f"run_dir={cfg.run_dir}"]))
