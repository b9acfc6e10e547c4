"""Faults of the user's making (issue 26, part A): every one is a single line on stderr that names the field, file or
flag and the fix, with exit status 2, no traceback, and nothing already on disk touched.

Bad values (ranges, paths, overrides, ``--config``, ``--from``, the hub offline, adapters that do not fit) fail
before any stage starts; the messages that used to mislead (the file blamed for an override, the field-map hint,
the advice for an empty dataset, the curate bar's count) say what is true. All in-process, each case in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from ssb.cli import EXIT_USER_ERROR, build_parser, main, parse_args
from ssb.core.models import HUB_PROBE_TIMEOUT_S

TOY = "configs/toy.yaml"


def one_line(capsys) -> str:
    """The single error line on stderr (a library warning may precede it; a traceback may not)."""
    err = capsys.readouterr().err
    lines = [ln.rpartition("\r")[2] for ln in err.splitlines()]  # a progress bar may share the line
    lines = [ln for ln in lines if ln.startswith("ssb ") and ln.endswith("(--debug for the traceback)")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256: equal before and after means nothing was lost or changed."""
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """A run directory with the outputs of every stage (stand-ins: no stage may open them here)."""
    run = tmp_path / "run"
    outputs = ["run.json", "config.yaml", "rollout/rollouts.jsonl", "curate/teacher.jsonl", "capture/manifest.json",
               "capture/shard-00000.safetensors", "train/adapter/adapter_model.safetensors",
               "eval/base/results.json"]  # fmt: skip
    for rel in outputs:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(f"finished output {rel}\n")
    return run


# --------------------------------------------------------------------------------------------------
# Values out of range: named by their dotted key and the override that set them, at load


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rollout.k=0", "rollout.k: expected >= 2"),
        ("rollout.k=-1", "rollout.k: expected >= 2"),
        ("engine.batch_size=0", "engine.batch_size: expected >= 1"),
        ("train.batch_size=0", "train.batch_size: expected >= 1"),
        ("train.lr=-1", "train.lr: expected > 0"),
        ("train.lr=.nan", "train.lr: expected > 0"),
        ("train.lora_r=0", "train.lora_r: expected >= 1 (the LoRA rank)"),
        ("data.limit=-5", "data.limit: expected >= 1"),
        ("data.limit=0", "0 would load none"),
        ("capture.k=0", "capture.k: expected >= 1"),
        ("eval.n=0", "eval.n: expected >= 1"),
        ("train.epochs=0", "0 would train nothing"),
        ("curate.target_pairs=0", "curate.target_pairs: expected >= 1"),
        ("train.warmup_ratio=1", "train.warmup_ratio: expected a value in [0, 1)"),
        ("rollout.top_p=0", "rollout.top_p: expected a value in (0, 1]"),
        ("train.kd_weight=0", "train.kd_weight and train.ce_weight are both 0"),
    ],
)
def test_a_value_out_of_range_is_one_line_naming_the_override(finished_run, capsys, override, expected):
    before = tree(finished_run)
    assert main(["run", "--config", TOY, f"run_dir={finished_run}", override]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert f"config error: override {override}: " in line and expected in line, line
    assert tree(finished_run) == before  # capture.k=0 once deleted a finished store


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.source={tmp}/nope.jsonl", "data.source: {tmp}/nope.jsonl: no such file"),
        ("data.source={tmp}/notes.txt", "data.source: {tmp}/notes.txt is a .txt file; expected .jsonl"),
        ("eval.benchmarks=[toy, {tmp}/nope.jsonl]", "eval.benchmarks[1]: {tmp}/nope.jsonl: no such file"),
        ("model.name_or_path={tmp}/no-model", "model.name_or_path: '{tmp}/no-model' is neither a local directory"),
        ("model.name_or_path={tmp}/notes.txt", "is a file, not a model directory"),
        ("train.extra_runs=[{tmp}/nope]", "train.extra_runs[0]: {tmp}/nope is not a run directory"),
        ("train.output_subdir=../elsewhere", "train.output_subdir: expected a directory name inside run_dir"),
    ],
)
def test_a_path_that_cannot_be_right_is_one_line_at_load(finished_run, capsys, override, expected):
    tmp = finished_run.parent
    (tmp / "notes.txt").write_text("my notes\n")
    before = tree(tmp)
    override = override.format(tmp=tmp)
    assert main(["run", "--config", TOY, f"run_dir={finished_run}", override]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert f"override {override}: " in line and expected.format(tmp=tmp) in line, line
    assert tree(tmp) == before


def test_a_hub_dataset_offline_is_one_line_with_the_fix(tmp_path, capsys):
    over = [f"run_dir={tmp_path / 'run'}", "data.source=ssb-tests/no-such-dataset", "engine.backend=hf"]
    assert main(["rollout", "--config", TOY, *over]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert "cannot load dataset 'ssb-tests/no-such-dataset'" in line and "pass a local .jsonl/.json/.parquet" in line


def test_debug_shows_the_traceback_of_the_same_error(tmp_path):
    from ssb.config import ConfigError

    with pytest.raises(ConfigError, match="override rollout.k=0: rollout.k: expected >= 2"):
        main(["run", "--config", TOY, f"run_dir={tmp_path}", "--debug", "rollout.k=0"])


def test_a_value_out_of_range_in_the_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TOY).read_text().replace("  k: 32\n", "  k: 0\n"))
    assert main(["capture", "--config", str(bad), f"run_dir={tmp_path / 'run'}"]) == EXIT_USER_ERROR
    assert f"{bad}: capture.k: expected >= 1" in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_an_unknown_override_key_is_blamed_on_the_override_not_the_file(tmp_path, capsys):
    assert main(["train", "--config", TOY, f"run_dir={tmp_path}", "trian.lr=1"]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert "override trian.lr=1: unknown key trian" in line and TOY not in line


def test_on_policy_needs_three_samples_per_problem(tmp_path, capsys):
    over = [f"run_dir={tmp_path}", "distill.source=on_policy", "rollout.k=2"]
    assert main(["run", "--config", TOY, *over]) == EXIT_USER_ERROR
    assert "rollout.k: expected >= 3 under distill.source=on_policy" in one_line(capsys)


def test_a_greedy_protocol_with_many_samples_fails_before_the_first_stage(tmp_path, capsys):
    over = [f"run_dir={tmp_path / 'run'}", "eval.protocol=qwen-math", "eval.temperature=null"]
    assert main(["run", "--config", TOY, *over]) == EXIT_USER_ERROR
    assert "eval.n: protocol qwen-math is greedy" in one_line(capsys) and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# The command line: --config, --from, run_dir, overrides after flags


@pytest.mark.parametrize("command", ["run", "rollout", "eval"])
def test_no_config_is_an_error_naming_the_flag(tmp_path, capsys, command):
    assert main([command, f"run_dir={tmp_path / 'run'}"]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert "no --config FILE given" in line and "a shipped config's name (toy" in line
    assert not (tmp_path / "run").exists()  # the paper's 3B defaults were never started


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU measures the 3B architecture itself")
def test_a_dry_run_of_a_model_too_large_for_the_cpu_is_one_line(tmp_path, capsys):
    """``ssb train --dry-run`` with no config probes the paper's 3B architecture: on a CPU that is refused, named."""
    assert main(["train", "--dry-run", f"run_dir={tmp_path / 'run'}"]) == EXIT_USER_ERROR
    assert "train.dry_run_config: 3.1B parameters is too large to probe on CPU" in one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_no_config_still_reports_a_bad_override_first(capsys):
    assert main(["train", "train.nope=1"]) == EXIT_USER_ERROR
    assert "override train.nope=1: unknown key train.nope" in one_line(capsys)


def test_a_run_dir_that_is_a_file_is_refused_and_kept(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("my notes\n")
    assert main(["run", "--config", TOY, f"run_dir={file}"]) == EXIT_USER_ERROR
    assert f"run_dir: {file} is a file, not a directory" in one_line(capsys)
    assert file.read_text() == "my notes\n"


def test_from_an_unknown_stage_names_the_stages(finished_run, capsys):
    before = tree(finished_run)
    assert main(["run", "--config", TOY, f"run_dir={finished_run}", "--from", "bogus"]) == EXIT_USER_ERROR
    assert "--from 'bogus': expected one of rollout|curate|capture|train|eval" in one_line(capsys)
    assert main(["run", "--config", TOY, f"run_dir={finished_run}", "rounds=2", "--from", "bogus"]) == EXIT_USER_ERROR
    assert "train@2" in one_line(capsys)  # the plan the rounds make
    assert tree(finished_run) == before


def test_overrides_may_come_after_flags(finished_run, capsys):
    args = parse_args(build_parser(), ["run", "a=1", "--config", TOY, "--from", "train", "b.c=2", "--debug", "d=3"])
    assert (args.config, args.from_stage, args.debug, args.overrides) == (TOY, "train", True, ["a=1", "b.c=2", "d=3"])
    before = tree(finished_run)
    assert main(["run", "--config", TOY, "--from", "train", f"run_dir={finished_run}", "rollout.k=0"]) == 2
    assert "override rollout.k=0: rollout.k" in one_line(capsys)  # the late override was read and checked
    assert tree(finished_run) == before


def test_an_unknown_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--config", TOY, "--frm", "train"])
    err = capsys.readouterr().err
    assert exc.value.code == EXIT_USER_ERROR and err.count("\n") == 1 and "unrecognized arguments: --frm" in err


# --------------------------------------------------------------------------------------------------
# Models from the hub when the hub cannot serve them: one line at once, not a minute of retries


def test_a_hub_model_offline_fails_fast_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    rc = main(["run", "--config", TOY, f"run_dir={tmp_path / 'run'}", "model.name_or_path=ssb-tests/not-cached-1"])
    assert rc == EXIT_USER_ERROR and time.perf_counter() - t0 < HUB_PROBE_TIMEOUT_S
    line = one_line(capsys)
    assert "'ssb-tests/not-cached-1' is a hub id, HF_HUB_OFFLINE is set" in line
    assert "pass a local model directory (model.name_or_path=DIR" in line and not (tmp_path / "run").exists()


def test_an_unreachable_hub_fails_fast_with_the_fix(tmp_path, capsys, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, refused at once
    t0 = time.perf_counter()
    rc = main(["eval", "--config", TOY, f"run_dir={tmp_path / 'run'}", "model.name_or_path=ssb-tests/not-cached-2"])
    assert rc == EXIT_USER_ERROR and time.perf_counter() - t0 < HUB_PROBE_TIMEOUT_S
    line = one_line(capsys)
    assert "the hub at http://127.0.0.1:9 cannot be reached" in line and "HF_HUB_OFFLINE=1" in line
    assert "pass a local model directory" in line and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Adapters: checked against the base before any evaluation starts


@pytest.fixture(scope="module")
def adapters(toy_model_dir, tiny_chat_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A good LoRA on the toy model and broken variants of it, plus one trained on another (smaller) model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    for name, base in (("good", toy_model_dir), ("other_model", tiny_chat_model_dir)):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(root / name)
    good = root / "good"
    weights = (good / "adapter_model.safetensors").read_bytes()
    conf = json.loads((good / "adapter_config.json").read_text())
    variants = {
        "garbage_weights": {"adapter_model.safetensors": os.urandom(len(weights))},
        "truncated_weights": {"adapter_model.safetensors": weights[: len(weights) // 2]},
        "other_rank": {"adapter_config.json": json.dumps({**conf, "r": 8}).encode()},
        "other_targets": {"adapter_config.json": json.dumps({**conf, "target_modules": ["c_attn"]}).encode()},
        "other_architecture": {"adapter_config.json": json.dumps(
            {**conf, "auto_mapping": {"base_model_class": "LlamaForCausalLM"}}).encode()},
        "garbage_config": {"adapter_config.json": b"\x00not json"},
    }  # fmt: skip
    for name, files in variants.items():
        shutil.copytree(good, root / name)
        for file, data in files.items():
            (root / name / file).write_bytes(data)
    (root / "empty").mkdir()
    (root / "a_file").write_text("not an adapter\n")
    return {p.name: p for p in root.iterdir()} | {"missing": root / "missing"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing", "missing, expected a PEFT adapter directory"),
        ("a_file", "a file, not a PEFT adapter directory"),
        ("empty", "no adapter_config.json"),
        ("garbage_config", "adapter_config.json: not a readable JSON file"),
        ("garbage_weights", "adapter_model.safetensors: not a readable safetensors file"),
        ("truncated_weights", "adapter_model.safetensors: not a readable safetensors file"),
        ("other_model", "lora_A.weight is [4, 64], the base needs [4, 128]"),
        ("other_rank", "has rank 4, adapter_config.json says r=8"),
        ("other_targets", "target module 'c_attn' is not in the base"),
        ("other_architecture", "it was trained on a LlamaForCausalLM, the base is a Qwen2ForCausalLM"),
    ],
)
def test_an_adapter_that_does_not_fit_fails_before_any_eval(finished_run, adapters, capsys, name, expected):
    before = tree(finished_run)
    over = [f"run_dir={finished_run}", "engine.backend=hf", "eval.limit=1", "eval.grader_workers=0"]
    assert main(["eval", "--config", TOY, "--adapter", str(adapters[name]), *over]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert str(adapters[name]) in line and expected in line, line
    assert tree(finished_run) == before  # the base eval never started: no partial results, nothing replaced


def test_the_good_adapter_passes_the_check(adapters, toy_model_dir):
    from ssb.config import ModelConfig
    from ssb.core.models import check_adapter

    assert check_adapter(ModelConfig(name_or_path=str(toy_model_dir)), adapters["good"]) == 4


def test_a_missing_eval_adapter_in_the_config_fails_at_load(tmp_path, capsys):
    assert main(["eval", "--config", TOY, f"run_dir={tmp_path}", f"eval.adapter={tmp_path / 'nope'}"]) == 2
    assert f"override eval.adapter={tmp_path / 'nope'}: eval.adapter: " in one_line(capsys)


# --------------------------------------------------------------------------------------------------
# eval --compare takes run directories, as docs/USAGE.md says


def _eval_run(run: Path, labels: tuple[str, ...], seed: int) -> None:
    from test_eval import ScriptedEngine, _bench, _cfgs

    from ssb.eval import evaluate

    model, engine, eval_cfg = _cfgs(_bench(run.parent))
    for label in labels:
        evaluate(model, engine, eval_cfg.__class__(**{**eval_cfg.__dict__, "seed": seed}), run / "eval" / label,
                 label=label, engine=ScriptedEngine())  # fmt: skip


def test_compare_accepts_run_directories(tmp_path, capsys):
    run_a, run_b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _eval_run(run_a, ("base", "ssb"), seed=0)
    _eval_run(run_b, ("base", "round1", "round2"), seed=1)
    capsys.readouterr()
    assert main(["eval", "--compare", str(run_a), str(run_b)]) == 0
    out, err = capsys.readouterr()
    assert f"A = {run_a / 'eval' / 'ssb' / 'results.json'}" in err  # the trained model's results
    assert f"B = {run_b / 'eval' / 'round2' / 'results.json'}" in err  # the last round's
    assert "p (sign test)" in out


@pytest.mark.parametrize("what", ["empty", "garbage"])
def test_compare_of_something_without_results_is_one_line(tmp_path, capsys, what):
    target = tmp_path / "x"
    target.mkdir()
    if what == "garbage":
        (target / "results.json").write_text("{not json")
    assert main(["eval", "--compare", str(target), str(target)]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert str(target) in line and ("holds no eval results" if what == "empty" else "cannot read eval results") in line


# --------------------------------------------------------------------------------------------------
# Messages that used to mislead


def test_a_missing_answer_column_names_the_field_map_key_that_fixes_it(tmp_path, capsys):
    from ssb.config import load_config
    from ssb.rollout import load_stage_problems

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "What is 1 plus 2?", "solution": "#### 3"}) + "\n")
    over = [f"run_dir={tmp_path / 'run'}", f"data.source={data}", "engine.backend=hf"]
    assert main(["rollout", "--config", TOY, *over]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert f"{data}:1: missing field 'answer / Answer'" in line and "data.field_map.answer=COLUMN" in line
    fixed = load_config(TOY, [*over, "data.field_map.answer=solution"])  # the fix the line names works
    problems, _ = load_stage_problems(fixed)
    assert [p.answer for p in problems] == ["3"]


def test_an_empty_dataset_under_run_is_an_error_not_advice_about_grading(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    over = [f"run_dir={tmp_path / 'run'}", f"data.source={empty}", "engine.backend=hf"]
    assert main(["run", "--config", TOY, *over]) == EXIT_USER_ERROR
    line = one_line(capsys)
    assert f"data.source={empty}" in line and "no problems" in line and "flexible" not in line, line


def test_nothing_to_distil_advises_only_what_could_help(tmp_path):
    from ssb.config import load_config
    from ssb.core.layout import RunLayout
    from ssb.run.plan import stage

    cfg = load_config(TOY, [f"run_dir={tmp_path}"])
    layout = RunLayout(tmp_path)

    def reason(problems: int, samples: dict, by: dict) -> str:
        layout.rollout.mkdir(parents=True, exist_ok=True)
        layout.curate.mkdir(parents=True, exist_ok=True)
        samples = {"total": sum(samples.values()), **samples}
        layout.rollout_stats.write_text(json.dumps({"problems": problems, "k": 4, "samples": samples,
                                                    "problems_by_correct": by}))  # fmt: skip
        layout.curate_stats.write_text(json.dumps({"pairs": 0, "status_counts": {}}))
        return stage("curate").stop_check(cfg)

    none = {"correct": 0, "wrong_answer": 0, "no_answer": 0, "truncated": 0}
    empty = reason(0, none, {"all_correct": 0, "mixed": 0, "none_correct": 0})
    assert "flexible" not in empty and "data.source, data.split and data.limit" in empty
    unboxed = reason(3, {**none, "no_answer": 12}, {"all_correct": 0, "mixed": 0, "none_correct": 3})
    assert "grading.mode=flexible" in unboxed and "max_new_tokens" not in unboxed  # nothing was truncated


def test_the_curate_bar_counts_the_pairs_it_keeps(tmp_path, capsys):
    from test_curation import make_run

    from ssb.core.files import read_jsonl
    from ssb.curate import DECISIONS, run_curation

    target = 1
    cfg, engine = make_run(tmp_path, **{"curate.target_pairs": target, "engine.batch_size": 16})  # one batch
    capsys.readouterr()
    stats = run_curation(cfg, engine=engine)
    bar = capsys.readouterr().err.rpartition("pairs=")[2].split("]")[0].strip()
    kept = sum(d["status"] == "kept" for d in read_jsonl(tmp_path / "run" / "curate" / DECISIONS))
    assert kept > stats["pairs"] == target  # a batch kept more solutions than the target needed ...
    assert bar == f"{stats['pairs']}/{target}"  # ... and the bar says how many pairs there are
