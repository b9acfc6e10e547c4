"""A tiny random Qwen2 (tied embeddings, like Qwen2.5-3B) for trainer tests."""

import torch


def tiny_qwen(vocab: int, seed: int, max_positions: int = 1024):
    """Seeded 2-layer Qwen2 with hidden 32, in eval mode. ``initializer_range`` 0.3 is large enough that the
    frozen tied LM head can express peaked outputs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        initializer_range=0.3,
    )
    return Qwen2ForCausalLM(config).eval()


def tiny_llama_untied(vocab: int, seed: int, max_positions: int = 1024):
    """Seeded 2-layer Llama whose LM head is NOT tied to the input embedding (as in Qwen2.5-7B and most Llamas):
    a trainer that used the embedding as the head would compute other logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    return model
