"""``ssb eval`` end to end with a scripted engine: protocols, grading pool, results, resume, the stage entry point."""

import json

import pytest

from ssb.config import ConfigError, EngineConfig, EvalConfig, ModelConfig, load_config
from ssb.core.files import atomic_write_jsonl
from ssb.engines import Completion, derive_seed
from ssb.eval import PROTOCOLS, compare, compare_files, evaluate, load_results, resolve_protocol, run
from ssb.eval.scoring import grade_problem


class ScriptedEngine:
    """Answers problem ``q`` (question "What is A plus B?") right or wrong as a function of (seed key, sample j)
    only, like the real engines, so a resumed eval must reproduce an uninterrupted one exactly."""

    backend = "scripted"

    def __init__(self, fail_after_calls: int | None = None):
        self.calls: list[int] = []  # conversations per generate call
        self.loras: list = []
        self.fail_after_calls = fail_after_calls

    def generate(self, conversations, sampling, *, lora=None, seed_keys=None, desc="generate"):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append(len(conversations))
        self.loras.append(lora)
        out = []
        for conv, key in zip(conversations, seed_keys):
            a, b = (int(w) for w in conv[-1]["content"].split("?")[0].split()[2::2])
            samples = []
            for j in range(sampling.n):
                r = derive_seed(sampling.seed, key, j, lora) % 4
                if r == 3 and j % 2:  # truncated, no answer
                    samples.append(Completion("Let me think" + " more" * 9, tuple(range(40)), "length"))
                elif r == 3:  # truncated after a right box: wrong under every protocol, counted apart
                    samples.append(Completion(f"{a} + {b} = \\boxed{{{a + b}}} more", tuple(range(40)), "length"))
                else:
                    ans = a + b if r < 2 else a * b + 1
                    samples.append(Completion(f"{a} + {b} = \\boxed{{{ans}}}", tuple(range(5 + r)), "stop"))
            out.append(samples)
        return out

    def close(self):
        pass


def _bench(tmp_path, n=10):
    path = tmp_path / "sums.jsonl"
    atomic_write_jsonl(path, [{"id": f"s{i}", "question": f"What is {i} plus {2 * i + 1}?", "answer": str(3 * i + 1)}
                              for i in range(n)])  # fmt: skip
    return str(path)


def _cfgs(bench, **eval_kw):
    eval_cfg = EvalConfig(benchmarks=(bench,), protocol="r1", n=3, grader_workers=0, bootstrap=200, **eval_kw)
    return ModelConfig(name_or_path="scripted"), EngineConfig(backend="hf", batch_size=4), eval_cfg


def test_protocol_presets_and_overrides():
    p = resolve_protocol(EvalConfig(protocol="qwen-math"))
    assert (p.temperature, p.n, p.max_new_tokens) == (0.0, 1, 2048)
    assert p.messages("Q")[0] == {"role": "system", "content": PROTOCOLS["qwen-math"].system}
    r1 = resolve_protocol(EvalConfig(protocol="r1", n=16, max_new_tokens=64))
    assert (r1.temperature, r1.top_p, r1.n, r1.max_new_tokens) == (0.6, 0.95, 16, 64)
    assert [m["role"] for m in r1.messages("Q")] == ["user"] and "\\boxed{}" in r1.messages("Q")[0]["content"]
    paper = resolve_protocol(EvalConfig())
    assert paper.name == "ssb-paper" and paper.messages("Q")[0]["content"].startswith("**Role:**")
    with pytest.raises(ConfigError, match=r"eval.protocol: expected one of ssb-paper\|qwen-math\|r1,"):  # at load
        load_config(None, ["eval.protocol=nope"])
    with pytest.raises(ValueError, match="greedy"):
        resolve_protocol(EvalConfig(protocol="qwen-math", n=4))


def test_grader_clusters_equivalent_answers():
    texts = ["\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{3}", "no answer", "\\boxed{\\frac{1}{2}}", "\\boxed{0.5} and"]
    graded = grade_problem([(t, "stop") for t in texts[:-1]] + [(texts[-1], "length")], "0.5")
    assert [g["correct"] for g in graded] == [True, True, False, False, True, False]  # truncated: wrong
    assert [g["answer_correct"] for g in graded] == [True, True, False, False, True, True]
    assert [g["cluster"] for g in graded] == [0, 0, 2, None, 0, None]  # a truncated reply does not vote


def test_eval_writes_every_sample_and_consistent_aggregates(tmp_path):
    bench = _bench(tmp_path)
    engine = ScriptedEngine()
    res = evaluate(*_cfgs(bench), tmp_path / "out", engine=engine, label="scripted")
    assert engine.calls == [4, 4, 2]  # batched by engine.batch_size
    b = res["benchmarks"][bench]
    assert len(b["problems"]) == 10 and all(len(p["samples"]) == 3 for p in b["problems"])
    flat = [s for p in b["problems"] for s in p["samples"]]
    # verdicts come from the real grader: right exactly when the boxed value is the sum
    for p in b["problems"]:
        for s in p["samples"]:
            assert s["correct"] == (s["pred"] == p["answer"] and s["finish_reason"] == "stop")
    agg = b["aggregates"]
    assert agg["pass@k"]["1"]["value"] == pytest.approx(sum(s["correct"] for s in flat) / len(flat))
    assert agg["truncation_rate"] == pytest.approx(sum(s["finish_reason"] == "length" for s in flat) / len(flat))
    cut_right = [
        s for p in b["problems"] for s in p["samples"] if s["finish_reason"] == "length" and s["pred"] == p["answer"]
    ]
    assert cut_right and agg["truncated_right_answer_rate"] == pytest.approx(len(cut_right) / len(flat))
    assert (res["protocol"]["truncated"], res["protocol"]["grading"]) == ("wrong", "strict")
    assert res["protocol"] == json.loads(json.dumps(res["protocol"])) and res["protocol"]["name"] == "r1"
    assert load_results(tmp_path / "out") == json.loads(json.dumps(res))  # results.json round-trips
    assert "| scripted |" in (tmp_path / "out" / "results.md").read_text()


def test_eval_resumes_after_interruption(tmp_path):
    bench = _bench(tmp_path)
    full = evaluate(*_cfgs(bench), tmp_path / "full", engine=ScriptedEngine())
    with pytest.raises(KeyboardInterrupt):
        evaluate(*_cfgs(bench), tmp_path / "cut", engine=ScriptedEngine(fail_after_calls=2))
    partial = tmp_path / "cut" / "partial" / f"{bench.replace('/', '_')}.jsonl"
    assert len(partial.read_text().splitlines()) == 8  # two graded batches survived
    engine = ScriptedEngine()
    resumed = evaluate(*_cfgs(bench), tmp_path / "cut", engine=engine)
    assert engine.calls == [2]  # only the missing problems were generated
    assert resumed["benchmarks"] == full["benchmarks"]
    # a finished eval reruns for free; a different protocol sets the old partial aside instead of mixing
    again = ScriptedEngine()
    evaluate(*_cfgs(bench), tmp_path / "cut", engine=again)
    assert again.calls == []
    other = ScriptedEngine()
    old_partial, old_results = partial.read_bytes(), (tmp_path / "cut" / "results.json").read_bytes()
    evaluate(*_cfgs(bench, temperature=0.9), tmp_path / "cut", engine=other)
    assert sum(other.calls) == 10
    (aside,) = (tmp_path / "cut").glob("partial.stale-*")  # the old partial and results moved aside, never lost
    assert (aside / partial.name).read_bytes() == old_partial
    (aside,) = tmp_path.glob("cut.stale-*")
    assert (aside / "results.json").read_bytes() == old_results and (aside / "results.md").exists()


def test_weights_rewritten_in_place_are_not_resumed(tmp_path):
    """A local model directory whose weights change (a retrained, re-merged student) is evaluated afresh."""
    import os

    bench = _bench(tmp_path, n=4)
    model_dir = tmp_path / "student"
    model_dir.mkdir()
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"round one")
    _, engine_cfg, eval_cfg = _cfgs(bench)
    model = ModelConfig(name_or_path=str(model_dir))
    evaluate(model, engine_cfg, eval_cfg, tmp_path / "out", engine=ScriptedEngine())
    same = ScriptedEngine()
    evaluate(model, engine_cfg, eval_cfg, tmp_path / "out", engine=same)
    assert same.calls == []  # untouched weights: resumed for free
    weights.write_bytes(b"round two")
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    rewritten = ScriptedEngine()
    evaluate(model, engine_cfg, eval_cfg, tmp_path / "out", engine=rewritten)
    assert sum(rewritten.calls) == 4


def test_grading_pool_matches_inline_grading(tmp_path):
    bench = _bench(tmp_path, n=6)
    inline = evaluate(*_cfgs(bench), tmp_path / "inline", engine=ScriptedEngine())
    model, engine_cfg, eval_cfg = _cfgs(bench)
    pooled = evaluate(model, engine_cfg, eval_cfg.__class__(**{**eval_cfg.__dict__, "grader_workers": 2}),
                      tmp_path / "pool", engine=ScriptedEngine())  # fmt: skip
    assert pooled["benchmarks"] == inline["benchmarks"]


def test_stage_evaluates_base_and_adapter_and_compares(tmp_path, monkeypatch, capsys):
    bench = _bench(tmp_path)
    adapter = tmp_path / "run" / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    engine = ScriptedEngine()
    monkeypatch.setattr("ssb.engines.make_engine", lambda *a, **kw: engine)
    monkeypatch.setattr("ssb.eval.check_adapter", lambda model, path: 4)  # a stand-in the scripted engine never reads
    overrides = ["eval.protocol=r1", "eval.n=3", "eval.grader_workers=0", "eval.bootstrap=100", "engine.batch_size=5"]
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"eval.benchmarks=[{bench}]", *overrides])
    assert run(cfg) == 0
    assert engine.loras == [None, None, str(adapter), str(adapter)]  # base, then the trained adapter
    out = tmp_path / "run" / "eval"
    assert (out / "chart.png").stat().st_size > 5000 and "ssb vs base" in (out / "report.md").read_text()
    cmp = compare(out / "base", out / "ssb")
    assert cmp["same_protocol"] and cmp["benchmarks"][bench]["n_problems"] == 10
    capsys.readouterr()
    assert compare_files(out / "base", out / "ssb", out=tmp_path / "c") == 0
    printed = capsys.readouterr().out
    assert "p (sign test)" in printed and "McNemar" in printed and (tmp_path / "c" / "compare.png").exists()
