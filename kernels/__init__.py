"""ssb_kernels: fused sparse top-k distillation kernels (Triton) and their eager/chunked references.

Public API (SPEC.md section 4): `sparse_kd_loss` (training loss) and `topk_logprobs` (teacher capture).
"""

from .options import KDOptions, TopkOptions
from .sparse_kd import sparse_kd_loss
from .topk import topk_logprobs

__all__ = ["KDOptions", "TopkOptions", "sparse_kd_loss", "topk_logprobs"]
