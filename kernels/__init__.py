"""ssb_kernels: fused sparse top-k distillation kernels (Triton) and their eager/chunked references.

Public API (docs/SPEC.md section 6): `sparse_kd_loss` (training loss), `sparse_kd_ce_loss` (KD and label CE from
one pass over the head) and `topk_logprobs` (teacher capture).

In a Hugging Face `Trainer` with a PEFT model (docs/RECIPES.md, run by tests/test_recipes.py)::

    class SparseKDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, logprobs, rows = inputs.pop("topk_ids"), inputs.pop("topk_logprobs"), inputs.pop("kd_mask")
            out = model.get_base_model().get_decoder()(**inputs)  # (B, L, H) final hidden states, no logits
            weight = model.get_output_embeddings().weight  # (V, H), the frozen LM head
            loss = sparse_kd_loss(out.last_hidden_state[rows], weight, ids[rows], logprobs[rows], temperature=2.0)
            return (loss, out) if return_outputs else loss

Shape: ``topk_ids`` / ``topk_logprobs`` (B, L, k), ``kd_mask`` (B, L) bool; the batch keeps them with
``TrainingArguments(remove_unused_columns=False)``.
"""

if __name__ == "ssb_kernels":
    import importlib

    # name -> submodule; loaded on first use, so `import ssb_kernels` (or its torch-free `choices`, which the
    # pipeline's config checks against) costs no torch import
    _EXPORTS = {
        "KDOptions": "options",
        "derive_lse_t": "rowmath",
        "TopkOptions": "options",
        "hidden_kd_loss": "hidden_kd",
        "sparse_kd_ce_loss": "sparse_kd_ce",
        "sparse_kd_loss": "sparse_kd",
        "topk_logprobs": "topk",
    }
    __all__ = sorted(_EXPORTS)

    def __getattr__(name: str):
        if name in _EXPORTS:
            return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        raise AttributeError(f"module 'ssb_kernels' has no attribute {name!r}")

else:
    # From the repository root, `import kernels` (transformers and bitsandbytes probe for Hugging Face's
    # `kernels` package) finds this source folder. Stay an empty, versionless module then: the probers
    # read that as "not installed", and our kernels are not loaded twice under a second name.
    __all__ = []
