"""Peak extra host memory of one sparse-KD forward+backward, measured in a fresh process (CPU).

``python bench/kd_peak.py SHAPE PROVIDER`` prints {"peak_extra_mib": ...}: the peak RSS above the RSS at entry
(bench/common.py ``peak_memory``: VmHWM after a reset) across one call, after the inputs exist. A fresh
process keeps earlier runs out of it.
"""

from __future__ import annotations

import json
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
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"])


def main(shape_name: str, provider: str) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import ssb_kernels
    from common import peak_memory
    from shapes import ALL, make_kd_inputs

    torch.set_num_threads(2)
    x = make_kd_inputs(ALL[shape_name], "cpu")
    args = (x["weight"], x["topk_ids"][:8], x["topk_logprobs"][:8])
    ssb_kernels.sparse_kd_loss(x["hidden"][:8], *args, impl=provider).backward()  # library init, not counted
    with peak_memory("cpu") as pm:
        loss = ssb_kernels.sparse_kd_loss(
            x["hidden"], x["weight"], x["topk_ids"], x["topk_logprobs"], lse_t=x["lse_t"], mask=x["mask"], impl=provider
        )
        loss.backward()
    print(json.dumps({"peak_extra_mib": pm.peak_mib, "method": pm.method, "loss": float(loss.detach())}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
