"""Progress inside one generation call: every decode step is reported, so a long batch is never silent."""

import pytest

from ssb.engines.types import BatchProgress, Sampling


class Recorder:
    """Replaces BatchProgress.step/finished to record what an engine reports."""

    def __init__(self, monkeypatch):
        self.steps: list[tuple[int, int]] = []
        self.finished = 0
        self.exact: list[bool] = []
        rec = self
        init = BatchProgress.__init__

        def patched_init(self, desc, total, max_new_tokens, *, exact, show=True):
            rec.exact.append(exact)
            rec.desc, rec.total = desc, total
            init(self, desc, total, max_new_tokens, exact=exact, show=show)

        def step(self, active, finished=0):
            rec.steps.append((active, finished))

        def done(self, n):
            rec.finished += n

        monkeypatch.setattr(BatchProgress, "__init__", patched_init)
        monkeypatch.setattr(BatchProgress, "step", step)
        monkeypatch.setattr(BatchProgress, "finished", done)


CONVS = [
    [{"role": "user", "content": "Ann has 3 pens and buys 4 more. How many pens?"}],
    [{"role": "user", "content": "2+2?"}],
]


def _check(rec: Recorder, outs, sampling: Sampling, exact: bool) -> None:
    flat = [c for cs in outs for c in cs]
    assert rec.desc == "unit test" and rec.total == len(flat) == len(CONVS) * sampling.n
    assert rec.exact == [exact]
    # every sequence is reported as finished exactly once: in the step that emitted its stop token, or at the end
    assert sum(f for _, f in rec.steps) + rec.finished == len(flat)
    assert len(rec.steps) >= max(c.num_tokens for c in flat)  # one report per decode step (vLLM adds a prefill)
    generated = sum(c.num_tokens for c in flat)
    tokens = sum(a for a, _ in rec.steps)
    assert tokens == generated if exact else tokens >= generated  # vLLM counts waiting requests too


def test_hf_reports_every_decode_step(toy_model_dir, monkeypatch):
    from ssb.config import EngineConfig, ModelConfig
    from ssb.engines import make_engine

    rec = Recorder(monkeypatch)
    engine = make_engine(ModelConfig(name_or_path=str(toy_model_dir), dtype="float32"), EngineConfig(backend="hf"))
    sampling = Sampling(n=2, temperature=0.8, max_new_tokens=24, seed=1)
    try:
        outs = engine.generate(CONVS, sampling, desc="unit test")
    finally:
        engine.close()
    _check(rec, outs, sampling, exact=True)


@pytest.mark.vllm
def test_vllm_reports_every_engine_step(vllm_engine, monkeypatch):
    rec = Recorder(monkeypatch)
    sampling = Sampling(n=2, temperature=0.8, max_new_tokens=24, seed=1)
    outs = vllm_engine.generate(CONVS, sampling, desc="unit test")
    _check(rec, outs, sampling, exact=False)
