"""Engines (vLLM and HF) and the rollout + curate stages end to end on the toy model, with resume after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssb import curate
from ssb.config import EngineConfig, ModelConfig, load_config
from ssb.core.files import InputError
from ssb.core.layout import RunLayout
from ssb.core.prompts import end_of_turn_id, student_messages
from ssb.engines import Sampling, make_engine
from ssb.engines.hf import filter_logits
from ssb.rollout import run

CONVS = [student_messages(q) for q in ("What is 2 + 3?", "Ada has 4 boxes of 5 pens. How many pens?", "Hi")]


def check_finish_reasons(engine, outs, max_new: int) -> None:
    """ "stop" iff the ids end with end-of-turn (within the budget); "length" iff the budget was used up."""
    eot = end_of_turn_id(engine.tokenizer)
    for per_conv in outs:
        for c in per_conv:
            assert c.num_tokens <= max_new
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eot and eot not in c.token_ids[:-1]
            else:
                assert c.finish_reason == "length" and c.num_tokens == max_new and eot not in c.token_ids
            assert c.text == engine.tokenizer.decode([t for t in c.token_ids if t != eot], skip_special_tokens=True)


def check_seeding(engine) -> None:
    s = Sampling(n=3, temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=32, seed=7)
    full = engine.generate(CONVS, s, seed_keys=["a", "b", "c"])
    assert [len(x) for x in full] == [3, 3, 3]
    again = engine.generate(CONVS[1:], s, seed_keys=["b", "c"])  # other batch, same keys: same samples
    assert [[c.token_ids for c in x] for x in again] == [[c.token_ids for c in x] for x in full[1:]]
    assert len({c.token_ids for c in full[0]}) == 3  # the n samples of one prompt differ
    other = engine.generate(CONVS[:1], Sampling(**{**s.__dict__, "seed": 8}), seed_keys=["a"])
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in full[0]]
    assert any(c.num_tokens > 16 for x in full for c in x)  # vLLM's default max_tokens=16 is not in play
    check_finish_reasons(engine, full, 32)


def test_sampling_is_validated():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        Sampling(n=0)
    with pytest.raises(ValueError, match="backend"):
        make_engine(ModelConfig(), EngineConfig(backend="tgi"))


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)).tolist() == [[False, False, True, True]]
    # top_p=0.7: 0.5 alone is < 0.7, 0.5 + 0.3 reaches it -> keep two
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, 1.0, 0, 0.5)).tolist() == [[False, True, True, True]]
    probs = filter_logits(logits, 2.0, 0, 1.0).softmax(-1)
    tempered = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).sqrt()  # p ** (1 / T) renormalised
    torch.testing.assert_close(probs, tempered / tempered.sum())


@pytest.fixture(scope="module")
def hf_engine(toy_model_dir):
    engine = make_engine(
        ModelConfig(name_or_path=str(toy_model_dir), dtype="float32"), EngineConfig(backend="hf", batch_size=2)
    )
    yield engine
    engine.close()


def test_hf_engine_seeding_and_finish_reasons(hf_engine):
    check_seeding(hf_engine)
    short = hf_engine.generate(CONVS, Sampling(n=2, temperature=1.0, max_new_tokens=3, seed=1))
    check_finish_reasons(hf_engine, short, 3)
    assert any(c.finish_reason == "length" for x in short for c in x)


@pytest.mark.vllm
def test_vllm_engine_seeding_and_finish_reasons(vllm_engine):
    check_seeding(vllm_engine)
    short = vllm_engine.generate(CONVS, Sampling(n=2, temperature=1.0, max_new_tokens=3, seed=1))
    check_finish_reasons(vllm_engine, short, 3)
    assert any(c.finish_reason == "length" for x in short for c in x)


@pytest.mark.vllm
def test_greedy_vllm_matches_hf(vllm_engine, hf_engine):
    greedy = Sampling(n=1, temperature=0.0, max_new_tokens=24)
    a = vllm_engine.generate(CONVS, greedy)
    b = hf_engine.generate(CONVS, greedy)
    assert [x[0].token_ids for x in a] == [x[0].token_ids for x in b]


def stage_cfg(tmp_path: Path, data: Path, model_dir: Path, backend: str, **over):
    overrides = {
        "run_dir": str(tmp_path / "run"),
        "data.source": str(data),
        "model.name_or_path": str(model_dir),
        "model.dtype": "float32",
        "engine.backend": backend,
        "engine.batch_size": 3,
        "engine.enforce_eager": True,
        "rollout.k": 2,
        "rollout.max_new_tokens": 96,
        "curate.max_new_tokens": 96,
        "curate.target_pairs": 100,
        **over,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from ssb.toy.world import write_splits

    train, _ = write_splits(tmp_path_factory.mktemp("toy_data"), n_train=8, n_test=1, seed=0)
    return train


def read_stage_files(run_dir: Path) -> dict[str, str]:
    names = ["rollout/rollouts.jsonl", "rollout/rollout_stats.json", "rollout/problems.jsonl"]
    names += ["curate/teacher.jsonl", "curate/student.jsonl", "curate/curation_stats.json", "curate/decisions.jsonl"]
    return {n: (run_dir / n).read_text() for n in names}


def run_both_stages(cfg, engine, kill_after: int | None = None) -> None:
    """Rollout then curate; with ``kill_after`` the rollout dies after that many batches and is rerun."""
    if kill_after is not None:

        def kill(batches_done: int) -> None:
            if batches_done == kill_after:
                raise KeyboardInterrupt

        from ssb.rollout import load_stage_problems, run_rollouts

        problems, report = load_stage_problems(cfg)
        with pytest.raises(KeyboardInterrupt):
            run_rollouts(cfg, problems, RunLayout(cfg.run_dir), engine=engine, input_report=report, on_batch=kill)
        assert len((Path(cfg.run_dir) / "rollout/rollouts.jsonl").read_text().splitlines()) == 3 * kill_after * 2
    assert run(cfg, engine=engine) == 0
    assert curate.run(cfg, engine=engine) == 0


def check_stage_outputs(run_dir: Path, n_problems: int, k: int) -> None:
    stats = json.loads((run_dir / "rollout/rollout_stats.json").read_text())
    samples = stats["samples"]
    assert stats["problems"] == n_problems and samples["total"] == n_problems * k
    assert (
        samples["correct"] + samples["wrong_answer"] + samples["no_answer"] + samples["truncated"] == samples["total"]
    )
    assert sum(stats["problems_by_correct"].values()) == n_problems
    rows = [json.loads(x) for x in (run_dir / "rollout/rollouts.jsonl").read_text().splitlines()]
    assert all(not r["correct"] for r in rows if r["finish_reason"] == "length")
    cur = json.loads((run_dir / "curate/curation_stats.json").read_text())
    assert sum(cur["status_counts"].values()) == n_problems
    assert (
        cur["pairs"] == cur["status_counts"]["kept"] == len((run_dir / "curate/student.jsonl").read_text().splitlines())
    )
    assert (run_dir / "rollout/config.yaml").exists() and (run_dir / "curate/config.yaml").exists()


@pytest.mark.vllm
@pytest.mark.slow
def test_stages_end_to_end_vllm_resume_is_identical(vllm_engine, toy_data, toy_model_dir, tmp_path):
    ref = stage_cfg(tmp_path / "ref", toy_data, toy_model_dir, "vllm")
    run_both_stages(ref, vllm_engine)
    check_stage_outputs(Path(ref.run_dir), 8, 2)
    killed = stage_cfg(tmp_path / "killed", toy_data, toy_model_dir, "vllm")
    run_both_stages(killed, vllm_engine, kill_after=1)
    assert read_stage_files(Path(killed.run_dir)) == read_stage_files(Path(ref.run_dir))


@pytest.mark.slow
def test_stages_end_to_end_hf_resume_is_identical(toy_data, toy_model_dir, tmp_path):
    ref = stage_cfg(tmp_path / "ref", toy_data, toy_model_dir, "hf")
    assert run(ref) == 0  # the stages build (and free) their own engines
    assert curate.run(ref) == 0
    check_stage_outputs(Path(ref.run_dir), 8, 2)
    killed = stage_cfg(tmp_path / "killed", toy_data, toy_model_dir, "hf")
    engine = make_engine(killed.model, killed.engine)
    try:
        run_both_stages(killed, engine, kill_after=2)
    finally:
        engine.close()
    assert read_stage_files(Path(killed.run_dir)) == read_stage_files(Path(ref.run_dir))


def test_malformed_input_lines_are_reported(tmp_path):
    data = tmp_path / "data.jsonl"
    good = [json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) for i in range(3)]
    data.write_text(
        "\n".join([good[0], '{"question": "cut', good[1], json.dumps({"answer": "#### 2"}), good[2]]) + "\n"
    )
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"data.source={data}", "rollout.k=2"])
    with pytest.raises(InputError, match=r"data.jsonl:2"):
        run(cfg, engine=EchoEngine())
    cfg = load_config(
        None, [f"run_dir={tmp_path / 'run'}", f"data.source={data}", "rollout.k=2", "data.skip_invalid=true"]
    )
    assert run(cfg, engine=EchoEngine()) == 0
    stats = json.loads((tmp_path / "run/rollout/rollout_stats.json").read_text())
    assert stats["problems"] == 3 and stats["samples"]["total"] == 6
    assert stats["input"]["loaded"] == 3 and stats["input"]["skipped"] == 2
    assert [s.split(": ")[0].rsplit(":", 1)[-1] for s in stats["input"]["skipped_examples"]] == ["2", "4"]


class EchoEngine:
    """Answers every question with the number in it plus one, boxed: all correct, no model needed."""

    backend = "echo"
    tokenizer = None

    def generate(self, conversations, sampling, *, lora=None, seed_keys=None, desc="generate"):
        import re

        from ssb.engines import Completion

        out = []
        for conv in conversations:
            n = int(re.search(r"\d+", conv[-1]["content"]).group()) + 1
            out.append([Completion(f"\\boxed{{{n}}}", (1, 2), "stop")] * sampling.n)
        return out


def test_vllm_lock_does_not_wait_on_an_flock_wrapper(tmp_path):
    """``flock LOCK pytest ...`` (the documented way to run vLLM here) must not deadlock our own lock."""
    import shutil
    import subprocess
    import sys

    if shutil.which("flock") is None:
        pytest.skip("no flock(1)")
    lock = str(tmp_path / "vllm.lock")
    code = f"from ssb.engines import vllm_lock\nwith vllm_lock({lock!r}):\n    print('inside')"
    out = subprocess.run(["flock", lock, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "inside", out.stderr


def test_rollouts_of_weights_rewritten_in_place_are_not_resumed(tmp_path):
    """A round student is re-merged at the same path when its adapter is retrained: its old rollouts are stale."""
    import os

    from ssb.rollout import _state

    model_dir = tmp_path / "student"
    model_dir.mkdir()
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"round one")
    cfg = load_config(None, [f"model.name_or_path={model_dir}"])
    before = _state(cfg, [])
    assert _state(cfg, []) == before and before["weights"] is not None
    weights.write_bytes(b"round two")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert _state(cfg, [])["weights"] != before["weights"]
    assert _state(load_config(None, ["model.name_or_path=Qwen/Qwen2.5-3B-Instruct"]), [])["weights"] is None
