"""Shared test setup: GPU-only tests skip cleanly on CPU; tests never touch the network."""

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


# --------------------------------------------------------------------------------------------------
# Models and engines shared by test files (rollout engineer). One vLLM engine per test session.


def build_tiny_chat_model(out_dir, seed: int = 0):
    """A random 2-layer Qwen2 (head_dim 32, which vLLM's CPU attention needs) + a ChatML char tokenizer."""
    from pathlib import Path

    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(i) for i in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    hf_tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    hf_tok.save_pretrained(out)
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory):
    """A random tiny chat model directory (loads in HF and vLLM); random text, never a boxed answer."""
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat_model"))


@pytest.fixture(scope="session")
def toy_model_dir(tiny_chat_model_dir):
    """The embedded toy model (ssb/assets/toy) when it is built, else the random tiny chat model."""
    try:
        from ssb.toy.world import asset_path

        path = asset_path()
    except (ImportError, AttributeError):
        return tiny_chat_model_dir
    return path if (path / "config.json").exists() else tiny_chat_model_dir


@pytest.fixture(scope="session")
def vllm_engine(toy_model_dir):
    """One in-process vLLM engine on the toy model for the whole session (LoRA enabled, max rank 16).

    Holds /tmp/ssb-vllm.lock while alive. ``engine.generate`` is stateless across calls (per-sample seeds).
    """
    pytest.importorskip("vllm")
    from ssb.config import EngineConfig, ModelConfig
    from ssb.engines import make_engine, vllm_lock

    max_len = min(4096, json.loads((toy_model_dir / "config.json").read_text()).get("max_position_embeddings", 4096))
    with vllm_lock():
        engine = make_engine(
            ModelConfig(name_or_path=str(toy_model_dir), dtype="float32"),
            EngineConfig(backend="vllm", max_model_len=max_len, enforce_eager=True, cpu_kv_cache_gib=0.25),
            enable_lora=True,
            max_lora_rank=16,
        )
        try:
            yield engine
        finally:
            engine.close()


@pytest.fixture
def one_thread():
    """Tiny matmuls: a second thread only adds contention on a shared 2-core runner."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
