"""bench/check.py: injected slowdowns and memory increases fail the check, noise within the margins passes."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import check  # noqa: E402


def _entry(device_type: str, **figures: float) -> dict:
    device = "NVIDIA H100 80GB HBM3" if device_type == "cuda" else "AMD EPYC, 2 cores (CPU)"
    return {
        "params": {"provider": "fused", "seq_len": 1024},
        "figures": figures,
        "meta": {"device": device, "device_type": device_type, "quick": True},
    }


BASE = {
    "train": {
        "suite": "train",
        "entries": {
            "toy/fused/cpu": _entry("cpu", step_time_s=2.0, tokens_per_s=500.0, peak_memory_mib=800.0, warmup_s=9.0),
            "qwen/fused/cuda": _entry("cuda", step_time_s=0.5, tokens_per_s=8000.0, peak_memory_mib=9000.0),
        },
    },
    "capture": {"suite": "capture", "entries": {"hf": _entry("cpu", tokens_per_s=900.0, bytes_per_row=528.0)}},
}


def _write(folder: Path, suites: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in suites.items():
        (folder / f"{name}.json").write_text(json.dumps(body))
    return folder


def _run(tmp_path: Path, new: dict, *flags: str) -> int:
    base = _write(tmp_path / "base", BASE)
    res = _write(tmp_path / "new", new)
    return check.main(["--baseline", str(base), "--results", str(res), *flags])


def _edit(suite: str, entry: str, **figures: float) -> dict:
    new = copy.deepcopy(BASE)
    new[suite]["entries"][entry]["figures"].update(figures)
    return new


def test_identical_results_pass(tmp_path, capsys):
    assert _run(tmp_path, BASE) == 0
    assert "0 regressed" in capsys.readouterr().out


def test_small_noise_within_margins_passes(tmp_path):
    new = _edit(
        "train", "qwen/fused/cuda", step_time_s=0.5 * 1.08, tokens_per_s=8000 / 1.08, peak_memory_mib=9000 * 1.04
    )
    assert _run(tmp_path, new) == 0


def test_memory_increase_fails_even_on_shared_cpu(tmp_path, capsys):
    new = _edit("train", "toy/fused/cpu", peak_memory_mib=800.0 * 1.06)  # +6% > 5%
    assert _run(tmp_path, new) == 1
    out = capsys.readouterr().out
    assert "| train/toy/fused/cpu | peak_memory_mib |" in out and "REGRESSED" in out


def test_store_bytes_per_row_increase_fails(tmp_path):
    assert _run(tmp_path, _edit("capture", "hf", bytes_per_row=600.0)) == 1


def test_slowdown_on_gpu_fails(tmp_path, capsys):
    assert _run(tmp_path, _edit("train", "qwen/fused/cuda", step_time_s=0.5 * 1.25)) == 1
    assert "step_time_s" in capsys.readouterr().out


def test_throughput_drop_on_gpu_fails(tmp_path):
    assert _run(tmp_path, _edit("train", "qwen/fused/cuda", tokens_per_s=8000.0 / 1.2)) == 1


def test_slowdown_on_shared_cpu_is_reported_not_gated_unless_dedicated(tmp_path, capsys):
    new = _edit("train", "toy/fused/cpu", step_time_s=3.0, tokens_per_s=333.0)
    assert _run(tmp_path, new) == 0
    assert "not gated" in capsys.readouterr().out
    assert _run(tmp_path, new, "--dedicated") == 1


def test_smaller_max_context_fails(tmp_path):
    new = copy.deepcopy(BASE)
    new["train"]["entries"]["qwen/fused/cuda"]["figures"]["max_seq_len_tokens"] = 12288.0
    base = copy.deepcopy(BASE)
    base["train"]["entries"]["qwen/fused/cuda"]["figures"]["max_seq_len_tokens"] = 16384.0
    _write(tmp_path / "base", base)
    _write(tmp_path / "new", new)
    assert check.main(["--baseline", str(tmp_path / "base"), "--results", str(tmp_path / "new")]) == 1
    assert check.main(["--baseline", str(tmp_path / "new"), "--results", str(tmp_path / "base")]) == 0


def test_no_time_flag_and_margin_flags(tmp_path):
    slow = _edit("train", "qwen/fused/cuda", step_time_s=0.5 * 1.25)
    assert _run(tmp_path, slow, "--no-time") == 0
    assert _run(tmp_path, slow, "--time-margin", "0.3") == 0
    mem = _edit("train", "qwen/fused/cuda", peak_memory_mib=9000 * 1.03)
    assert _run(tmp_path, mem) == 0
    assert _run(tmp_path, mem, "--memory-margin", "0.01") == 1


def test_warmup_is_not_tracked_and_changed_params_are_not_compared(tmp_path, capsys):
    new = _edit("train", "toy/fused/cpu", warmup_s=90.0)
    new["train"]["entries"]["qwen/fused/cuda"]["params"]["seq_len"] = 2048
    new["train"]["entries"]["qwen/fused/cuda"]["figures"]["peak_memory_mib"] = 18000.0  # other shape: not a regression
    assert _run(tmp_path, new) == 0
    assert "params or --quick differ" in capsys.readouterr().out


def test_save_then_compare_roundtrip(tmp_path):
    res = _write(tmp_path / "res", BASE)
    baseline = tmp_path / "baselines" / "dev.json"
    assert check.main(["--save", "--results", str(res), "--baseline", str(baseline)]) == 0
    saved = json.loads(baseline.read_text())
    assert set(saved["suites"]) == {"train", "capture"} and len(saved["devices"]) == 2
    assert check.main(["--results", str(res), "--baseline", str(baseline)]) == 0
    worse = _write(tmp_path / "worse", _edit("capture", "hf", bytes_per_row=560.0))
    assert check.main(["--results", str(worse), "--baseline", str(baseline)]) == 1


@pytest.mark.parametrize("content", ["not json", json.dumps({"entries": {"x": {"no": "figures"}}}), json.dumps([1])])
def test_malformed_or_missing_input_is_exit_2(tmp_path, content):
    (tmp_path / "bad.json").write_text(content)
    _write(tmp_path / "ok", BASE)
    assert check.main(["--baseline", str(tmp_path / "bad.json"), "--results", str(tmp_path / "ok")]) == 2
    assert check.main(["--baseline", str(tmp_path / "missing.json"), "--results", str(tmp_path / "ok")]) == 2


def test_figure_kinds():
    names = ("peak_memory_mib", "peak_extra_mb", "bytes_per_row", "max_seq_len_tokens", "tokens_per_s", "step_time_s")
    assert [check.kind(f) for f in names] == ["memory", "memory", "memory", "capacity", "throughput", "time"]
    assert check.kind("warmup_s") is None and check.kind("first_call_s") is None and check.kind("k") is None


def test_raw_pytest_benchmark_json_by_name_and_in_folders(tmp_path):
    def raw(tps: float, mb: float, when: str, recorded: bool = False) -> dict:
        info = {"provider": "eager", "tokens_per_s": tps, "peak_extra_mb": mb}
        kd = {"fullname": "bench/test_bench_kd.py::t[x]", "stats": {"min": 0.5}, "extra_info": info}
        other = {"fullname": "bench/test_bench_train.py::t", "stats": {"min": 1.0},
                 "extra_info": {"tokens_per_s": 1.0, "bench_suite": "train"} if recorded else {}}  # fmt: skip
        ssb = {"device": "cpu-2core-amd-epyc", "commit": "abc", "quick": True}
        return {"benchmarks": [kd, other], "ssb": ssb, "datetime": when}

    (tmp_path / "a.json").write_text(json.dumps(raw(100.0, 50.0, "2026-11-24T09:00", recorded=True)))
    (tmp_path / "b.json").write_text(json.dumps(raw(100.0, 60.0, "2026-11-24T10:00")))  # +20% memory, newer
    entry = check.load_set(tmp_path / "a.json")["pytest-benchmark/bench/test_bench_kd.py::t[x]"]
    assert entry["figures"] == {"tokens_per_s": 100.0, "peak_extra_mb": 50.0, "time_min_s": 0.5}
    assert entry["params"] == {"provider": "eager"} and entry["meta"]["device_type"] == "cpu"
    args = ["--baseline", str(tmp_path / "a.json"), "--results", str(tmp_path / "b.json")]
    assert check.main([*args, "--memory-slack-mib", "0"]) == 1
    # a folder keeps the newest run of each benchmark; figures bench_record also wrote to a suite file are left out
    (tmp_path / "c.json").write_text(json.dumps(raw(100.0, 40.0, "2026-11-24T08:00")))  # older, sorts last
    folder = check.load_set(tmp_path)
    assert folder["pytest-benchmark/bench/test_bench_kd.py::t[x]"]["figures"]["peak_extra_mb"] == 60.0
    assert "pytest-benchmark/bench/test_bench_train.py::t" in folder  # b.json's copy was not recorded
    (tmp_path / "kd.json").write_text(
        json.dumps({"suite": "kd", "entries": {"x/eager/cpu": _entry("cpu", tokens_per_s=1.0)}})
    )
    assert sorted(check.load_set(tmp_path)) == ["kd/x/eager/cpu", "pytest-benchmark/bench/test_bench_train.py::t"]
    only_a = tmp_path / "only_a"
    only_a.mkdir()
    (only_a / "a.json").write_text(json.dumps(raw(100.0, 50.0, "2026-11-24T09:00", recorded=True)))
    assert list(check.load_set(only_a)) == ["pytest-benchmark/bench/test_bench_kd.py::t[x]"]


def test_same_entry_from_two_devices_in_one_folder_keeps_both(tmp_path):
    cpu = {"suite": "train", "entries": {"toy": _entry("cpu", tokens_per_s=1.0)}}
    gpu = {"suites": {"train": {"entries": {"toy": _entry("cuda", tokens_per_s=9.0)}}}}
    (tmp_path / "train.json").write_text(json.dumps(cpu))
    (tmp_path / "nvidia-h100-abc.json").write_text(json.dumps(gpu))
    flat = check.load_set(tmp_path)
    assert len(flat) == 2 and "train/toy" in flat  # files in name order: the CPU entry comes second, renamed
    assert flat["train/toy@AMD EPYC, 2 cores (CPU)"]["figures"]["tokens_per_s"] == 1.0


def test_memory_slack_absorbs_small_absolute_growth_only(tmp_path):
    base = {"kd": {"suite": "kd", "entries": {"small": _entry("cpu", peak_extra_mib=100.0)}}}
    new = {"kd": {"suite": "kd", "entries": {"small": _entry("cpu", peak_extra_mib=107.0)}}}  # +7%, +7 MiB
    _write(tmp_path / "base", base)
    _write(tmp_path / "new", new)
    args = ["--baseline", str(tmp_path / "base"), "--results", str(tmp_path / "new")]
    assert check.main(args) == 0  # within the default 32 MiB slack
    assert check.main([*args, "--memory-slack-mib", "0"]) == 1


def test_save_merge_keeps_the_worse_of_two_runs(tmp_path):
    baseline = tmp_path / "baseline.json"
    run1 = _write(tmp_path / "run1", BASE)
    noisy = copy.deepcopy(BASE)
    noisy["train"]["entries"]["toy/fused/cpu"]["figures"].update(peak_memory_mib=900.0, tokens_per_s=400.0)
    run2 = _write(tmp_path / "run2", noisy)
    assert check.main(["--save", "--results", str(run1), "--baseline", str(baseline)]) == 0
    assert check.main(["--save", "--merge", "--results", str(run2), "--baseline", str(baseline)]) == 0
    merged = json.loads(baseline.read_text())["suites"]["train"]["entries"]["toy/fused/cpu"]
    assert merged["figures"]["peak_memory_mib"] == 900.0 and merged["figures"]["tokens_per_s"] == 400.0
    assert merged["meta"]["merged_runs"] == 2
    assert check.main(["--results", str(run1), "--baseline", str(baseline)]) == 0  # the better run passes
