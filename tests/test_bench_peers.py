"""bench/peers.py and the peer providers: the run plan, ratios and tables, the child protocol, and that each
installed peer computes what SEMANTICS says it computes on our inputs (so the side by side compares like with like)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import kd_providers  # noqa: E402
import measure  # noqa: E402
import peers  # noqa: E402
from shapes import QWEN_V, SCALE_H, SCALE_N, SCALE_V, make_kd_inputs, peer_shape  # noqa: E402


def test_plan_puts_the_side_by_side_first_and_never_repeats_a_run():
    quick = peers.plan("quick", peers.SIDE_BY_SIDE)
    head = [(p, 2048, 256, QWEN_V) for p in peers.SIDE_BY_SIDE]
    assert quick[: len(head)] == head and len(set(quick)) == len(quick)
    assert {(n, h, v) for p, n, h, v in quick if p == "chunked"} >= {(n, 256, QWEN_V) for n in SCALE_N}
    full = peers.plan("full", ("chunked",))
    assert len(full) == len(SCALE_N) * len(SCALE_V) * len(SCALE_H)
    assert peers.plan("none", ("floor",)) == [("floor", 2048, 256, QWEN_V)]


def _row(provider: str, n: int, t: float, mib: float = 10.0) -> dict:
    return {"provider": provider, "n": n, "h": 256, "v": QWEN_V, "shape": peer_shape(n).name, "time_min_s": t,
            "peak_extra_mib": mib}  # fmt: skip


def test_ratios_and_tables():
    rows = [_row("chunked", 2048, 3.0), _row("floor", 2048, 2.0), _row("axolotl", 2048, 12.0, 3000.0)]
    rows += [_row("chunked", 512, 0.75), _row("chunked", 8192, 12.0)]
    rows.append({"provider": "eager", "n": 2048, "h": 256, "v": QWEN_V, "shape": peer_shape(2048).name,
                 "skipped": "needs ~9 GiB"})  # fmt: skip
    peers._ratios(rows)
    assert rows[2]["ratio_to_chunked"] == 4.0 and rows[2]["ratio_to_floor"] == 6.0 and rows[0]["ratio_to_floor"] == 1.5
    assert "ratio_to_floor" not in rows[3]  # no floor measured at N=512
    side = peers.side_by_side_table(rows)
    assert "| axolotl | 12.00 s | 4.00 | 6.00 | +3,000 MiB |" in side
    assert "| eager | - |" in side and "not run: needs ~9 GiB" in side
    growth = peers.growth_table(rows)
    slope = next(line for line in growth.splitlines() if line.startswith("| chunked"))
    assert slope.endswith("| 1.00 |")  # 16x the rows, 16x the time: linear


def test_runs_over_the_memory_cap_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
    rows = peers.run([("eager", 8192, 256, QWEN_V)], rounds=1, mem_cap_gib=1.0, chunked_chunks=[], quick=True)
    assert "GiB cap" in rows[0]["skipped"] and not (tmp_path / "peers.json").exists()


def test_child_measures_time_and_memory_in_a_fresh_process(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_RESULTS_DIR", str(tmp_path))
    rows = peers.run([("chunked", 64, 32, 1000), ("floor", 64, 32, 1000)], 1, 8.0, [], quick=True)
    assert all(r["time_min_s"] > 0 for r in rows) and rows[0]["peak_extra_mib"] >= 0, rows
    assert rows[1]["best_chunk"] in kd_providers.FLOOR_CHUNKS and len(rows[0]["times_s"]) == 1
    entry = measure.load_results(tmp_path / "peers.json")["entries"]["n64-h32-v1000/chunked/cpu"]
    assert entry["figures"]["ratio_to_floor"] == pytest.approx(rows[0]["time_min_s"] / rows[1]["time_min_s"])
    assert entry["meta"]["device"].endswith("(CPU)")


def _loss(x: dict, provider: str) -> float:
    kd_providers.make_fn(x, provider)()  # forward + backward as benchmarked
    captured = {}
    orig = torch.Tensor.backward

    def grab(self, *a, **k):
        captured["loss"] = float(self.detach())
        return orig(self, *a, **k)

    torch.Tensor.backward = grab
    try:
        kd_providers.make_fn(x, provider)()
    finally:
        torch.Tensor.backward = orig
    return captured["loss"]


@pytest.fixture
def small():
    return make_kd_inputs(peer_shape(48, 16, 300, k=8), "cpu")


def _skip_unless(provider: str):
    reason = kd_providers.skip_reason(peer_shape(48, 16, 300, k=8), provider, torch.device("cpu"))
    if reason:
        pytest.skip(reason)


def test_trl_top_k_plus_tail_is_our_tail_loss_without_t2(small):
    """TRL's K + 1 outcomes (top-k and one tail bucket, student tail 1 - sum_K p) are our ``tail`` variant."""
    _skip_unless("trl")
    t = small["temperature"]
    assert _loss(small, "trl") * t**2 == pytest.approx(_loss(small, "chunked"), rel=1e-4)


def test_axolotl_is_forward_kl_on_k_with_the_teacher_renormalised(small):
    """Axolotl: sum_K q~ (log q~ - log p) with q~ the teacher at T renormalised over K, p over the full vocabulary;
    T^2 times the mean over rows. No tail term."""
    _skip_unless("axolotl")
    x, t = small, small["temperature"]
    logp = torch.log_softmax(x["hidden"].detach() @ x["weight"].t() / t, -1).gather(1, x["topk_ids"])
    q = torch.log_softmax(x["topk_logprobs"] / t - x["lse_t"][:, None], -1)
    expect = t**2 * float((q.exp() * (q - logp)).sum(1).mean())
    assert _loss(x, "axolotl") == pytest.approx(expect, rel=1e-4)
    assert not math.isclose(expect, _loss(x, "chunked"), rel_tol=1e-3)  # a different loss from ours


def test_new_rows_are_gated_memory_always_time_on_dedicated_devices():
    import check

    assert check.kind("peak_extra_mib") == "memory" and check.kind("time_min_s") == "time"
    assert check.kind("tokens_per_s") == "throughput"
    assert check.kind("ratio_to_floor") is None and check.kind("first_call_s") is None  # reported, never gated
    entry = {"params": {"provider": "axolotl", "n": 2048}, "meta": {"device_type": "cpu", "quick": True}}
    base = {"peers/x/axolotl/cpu": {**entry, "figures": {"peak_extra_mib": 3000.0, "time_min_s": 10.0}}}
    new = {"peers/x/axolotl/cpu": {**entry, "figures": {"peak_extra_mib": 3300.0, "time_min_s": 20.0}}}
    rows, _ = check.compare(base, new, memory_slack_mib=32.0)
    status = {r.figure: r.status for r in rows}
    assert status == {"peak_extra_mib": "REGRESSED", "time_min_s": "not gated"}
    rows, _ = check.compare(base, new, dedicated=True)
    assert {r.status for r in rows} == {"REGRESSED"}
