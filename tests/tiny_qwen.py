"""Tiny random causal LMs for trainer tests: a Qwen2 with tied embeddings (like Qwen2.5-3B) and a Llama with an
untied head (like Qwen2.5-7B and most Llamas)."""

import torch


def _tiny(arch: str, vocab: int, seed: int, max_positions: int, tied: bool):
    """Seeded 2-layer model with hidden 32, in eval mode. ``initializer_range`` 0.3 is large enough that the
    frozen LM head can express peaked outputs."""
    import transformers

    config_cls, model_cls = (getattr(transformers, f"{arch}{part}") for part in ("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        initializer_range=0.3,
        **({"rope_theta": 10000.0} if arch == "Qwen2" else {}),
    )
    return model_cls(config).eval()


def tiny_qwen(vocab: int, seed: int, max_positions: int = 1024):
    return _tiny("Qwen2", vocab, seed, max_positions, tied=True)


def tiny_llama_untied(vocab: int, seed: int, max_positions: int = 1024):
    """A trainer that used the input embedding as the head would compute other logits on this one."""
    model = _tiny("Llama", vocab, seed, max_positions, tied=False)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    return model
