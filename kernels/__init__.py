"""ssb_kernels: fused sparse top-k distillation kernels (Triton) and their eager/chunked references."""

__all__: list[str] = []
