"""ssb_kernels: fused sparse top-k distillation kernels (Triton) and their eager/chunked references.

Public API (SPEC.md section 4): `sparse_kd_loss` (training loss) and `topk_logprobs` (teacher capture).
"""

if __name__ != "ssb_kernels":
    # Run from the repository root, `import kernels` (which transformers and bitsandbytes probe for Hugging
    # Face's `kernels` package) would find this source folder instead: refuse, so they see "not installed".
    raise ImportError(f"{__file__} is ssb's source folder, importable only as `ssb_kernels`, not `{__name__}`")

from .options import KDOptions, TopkOptions
from .sparse_kd import sparse_kd_loss
from .topk import topk_logprobs

__all__ = ["KDOptions", "TopkOptions", "sparse_kd_loss", "topk_logprobs"]
