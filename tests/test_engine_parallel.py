"""``engine.data_parallel_size`` (vLLM's own engine argument, beside ``engine.tensor_parallel_size``) reaches the
``vllm.LLM`` that rollout, curate and eval build, on a GPU platform; checked here with the LLM class replaced, so
no engine starts."""

from __future__ import annotations

import pytest

from ssb.config import ConfigError, load_config

pytest.importorskip("vllm")


class FakeLLM:
    """Records the keyword arguments ``ssb.engines.vllm.build_llm`` gives ``vllm.LLM``."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        FakeLLM.calls.append(kwargs)
        if (
            kwargs.get("data_parallel_size", 1) > 1
            and kwargs.get("distributed_executor_backend") != "external_launcher"
        ):
            raise ValueError(  # vLLM 0.32's own words (vllm/entrypoints/llm.py)
                f"LLM(data_parallel_size={kwargs['data_parallel_size']}) is not supported for single-process usage "
                "and may hang. Please use the explicit multi-process data-parallel example at '...'."
            )


@pytest.fixture
def gpu_llm(monkeypatch):
    """``build_llm`` as on a GPU machine, with ``vllm.LLM`` recording its arguments instead of starting."""
    import vllm

    from ssb.engines import vllm as engine

    monkeypatch.setattr(engine, "_cpu_platform", lambda: False)
    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    FakeLLM.calls.clear()
    return engine


def _build(engine, tmp_path, *overrides):
    cfg = load_config(None, [f"model.name_or_path={tmp_path}", *overrides])
    return engine.build_llm(cfg.model, cfg.engine, seed=0)


def test_data_parallel_defaults_to_one_and_reaches_the_engine(gpu_llm, tmp_path):
    assert load_config(None, []).engine.data_parallel_size == 1
    _build(gpu_llm, tmp_path)
    assert FakeLLM.calls[-1]["data_parallel_size"] == 1 and FakeLLM.calls[-1]["tensor_parallel_size"] == 1


def test_data_parallel_is_vllms_own_engine_argument(gpu_llm, tmp_path):
    from vllm import EngineArgs

    cfg = load_config(None, ["engine.data_parallel_size=4", "engine.tensor_parallel_size=2"])
    kwargs = gpu_llm.platform_kwargs(cfg.engine)
    assert kwargs["data_parallel_size"] == 4 and kwargs["tensor_parallel_size"] == 2
    args = EngineArgs(model=str(tmp_path), **kwargs)  # the dataclass vllm.LLM fills; nothing starts
    assert (args.data_parallel_size, args.tensor_parallel_size) == (4, 2)


def test_a_vllm_that_refuses_data_parallel_in_one_process_says_so_in_one_line(gpu_llm, tmp_path):
    with pytest.raises(ConfigError, match=r"^engine.data_parallel_size=2: vLLM refused it: LLM\(data_parallel_size=2"):
        _build(gpu_llm, tmp_path, "engine.data_parallel_size=2")
    assert FakeLLM.calls[-1]["data_parallel_size"] == 2


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_data_parallel_below_one_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="engine.data_parallel_size"):
        load_config(None, [f"engine.data_parallel_size={bad}"])
