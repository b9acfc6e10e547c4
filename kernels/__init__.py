"""ssb_kernels: fused sparse top-k distillation kernels (Triton) and their eager/chunked references.

Public API (docs/SPEC.md section 6): `sparse_kd_loss` (training loss) and `topk_logprobs` (teacher capture).
"""

if __name__ == "ssb_kernels":
    from .options import KDOptions, TopkOptions
    from .sparse_kd import sparse_kd_loss
    from .topk import topk_logprobs

    __all__ = ["KDOptions", "TopkOptions", "sparse_kd_loss", "topk_logprobs"]
else:
    # From the repository root, `import kernels` (transformers and bitsandbytes probe for Hugging Face's
    # `kernels` package) finds this source folder. Stay an empty, versionless module then: the probers
    # read that as "not installed", and our kernels are not loaded twice under a second name.
    __all__ = []
