"""``ssb train --dry-run``: the sequence search, and a real CPU run at toy size (probe processes, peak RSS)."""

from __future__ import annotations

import json

import pytest

from ssb.cli import main as ssb_main
from ssb.train.dryrun import GRAIN, line_at_cap, n_params, search


@pytest.mark.parametrize("limit", [0, 256, 700, 3000, 8192])
def test_search_finds_largest_fitting_length(limit):
    calls = []

    def fits(length):
        calls.append(length)
        return length <= limit

    best = search(fits, max_len=8192)
    assert best == min(8192, limit // GRAIN * GRAIN)
    assert len(calls) <= 2 * 6  # doubling then bisection, never a linear scan


@pytest.mark.parametrize("max_len", [200, 700, 8192, 9000])
def test_search_keeps_to_grain_multiples_up_to_max_len(max_len):
    calls = []

    def fits(length):
        calls.append(length)
        return True

    assert search(fits, max_len=max_len) == max_len // GRAIN * GRAIN
    assert all(c % GRAIN == 0 and c <= max_len for c in calls) and len(calls) == len(set(calls))


@pytest.mark.parametrize("cap", [1.3, 2.5, 6.0, 7.9])
@pytest.mark.parametrize("curve", ["linear", "convex"])
def test_search_with_a_peak_line_finds_the_same_length_in_fewer_probes(cap, curve):
    """CPU mode: every probe measures its peak; the line through the last two predicts the next length."""

    def peak(length):  # GiB: a baseline plus a (mildly convex) per-token cost, like a probe's RSS
        return 0.9 + 6e-4 * length + (2e-8 * length**2 if curve == "convex" else 0.0)

    plain, guided, peaks = [], [], {}

    def fits_plain(length):
        plain.append(length)
        return peak(length) <= cap

    def fits_guided(length):
        guided.append(length)
        peaks[length] = peak(length)
        return peaks[length] <= cap

    expected = search(fits_plain, max_len=16384)
    assert expected == max((n for n in range(GRAIN, 16385, GRAIN) if peak(n) <= cap), default=0)
    assert search(fits_guided, max_len=16384, propose=lambda: line_at_cap(peaks, cap)) == expected
    assert len(guided) <= len(plain)
    assert max(guided) <= max(plain)  # never a longer (costlier) probe than plain doubling


def test_line_at_cap_needs_two_rising_points():
    assert line_at_cap({}, 4.0) is None and line_at_cap({256: 1.0}, 4.0) is None
    assert line_at_cap({256: 1.0, 512: 1.0}, 4.0) is None
    assert line_at_cap({256: 1.0, 512: 2.0, 1024: 3.0}, 4.0) == 1536


def test_qwen25_3b_config_has_3b_parameters():
    from transformers import AutoConfig

    with open("configs/qwen2.5_3b_config.json") as f:
        arch = AutoConfig.for_model(**json.load(f))
    assert arch.tie_word_embeddings and arch.num_key_value_heads == 2
    assert 3.0e9 < n_params(arch) < 3.2e9  # Qwen2.5-3B: 3.09B parameters (tied embeddings)


@pytest.mark.slow
def test_cpu_dry_run_reports_fused_and_eager(tmp_path):
    arch = {
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    }
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    args = ["train", "--dry-run", f"run_dir={tmp_path}", "model.dtype=float32", "train.qlora=true"]
    args += [f"train.dry_run_config={tmp_path / 'arch.json'}", "train.dry_run_mem_gib=64", "capture.k=16"]
    assert ssb_main(args) == 0
    report = json.loads((tmp_path / "train" / "dry_run.json").read_text())
    assert (
        report["device"] == "cpu"
        and "peak RSS" in report["measured"]
        and "MALLOC_MMAP_THRESHOLD_" in report["measured"]
    )
    for name in ("fused", "eager"):
        r = report["results"][name]
        assert r["max_seq_len"] == 512  # a 64 GiB cap holds every length up to max_position_embeddings
        assert set(r["probed"]) == {"256", "512"} and all(v > 0 for v in r["probed"].values())
