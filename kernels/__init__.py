"""ssb_kernels: fused sparse top-k distillation kernels (Triton) and their eager/chunked references.

Public API (docs/SPEC.md section 6): `sparse_kd_loss` (training loss), `sparse_kd_ce_loss` (KD and label CE from
one pass over the head) and `topk_logprobs` (teacher capture).
"""

if __name__ == "ssb_kernels":
    from .options import KDOptions, TopkOptions
    from .sparse_kd import sparse_kd_loss
    from .sparse_kd_ce import sparse_kd_ce_loss
    from .topk import topk_logprobs

    __all__ = ["KDOptions", "TopkOptions", "sparse_kd_ce_loss", "sparse_kd_loss", "topk_logprobs"]
else:
    # From the repository root, `import kernels` (transformers and bitsandbytes probe for Hugging Face's
    # `kernels` package) finds this source folder. Stay an empty, versionless module then: the probers
    # read that as "not installed", and our kernels are not loaded twice under a second name.
    __all__ = []
