"""Peak extra host memory of one sparse-KD forward+backward, measured in a fresh process (CPU).

``python bench/kd_peak.py SHAPE PROVIDER`` prints {"peak_extra_mb": ...}: the growth of the process's peak
RSS (ru_maxrss) across one call, after the inputs exist. A fresh process keeps earlier runs out of it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def peak_extra_mb(shape: str, provider: str, timeout: float = 300) -> float:
    """Run this script in a subprocess (2 threads) and return its measured peak extra MB."""
    out = subprocess.run(
        [sys.executable, str(HERE / "kd_peak.py"), shape, provider], capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"kd_peak.py {shape} {provider} failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mb"])


def main(shape_name: str, provider: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import ssb_kernels
    from shapes import ALL, make_kd_inputs

    torch.set_num_threads(2)
    x = make_kd_inputs(ALL[shape_name], "cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    loss = ssb_kernels.sparse_kd_loss(
        x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"], lse_t=x["lse_t"], mask=x["mask"], impl=provider
    )
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_extra_mb": (after - before) / 1024, "loss": float(loss)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
