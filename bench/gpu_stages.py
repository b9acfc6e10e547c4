"""The stages of bench/gpu.sh, one per process: ``python bench/gpu_stages.py STAGE`` (bench/kd_gpu.py runs them,
passing the deadline, run id and results file in SSB_GPU_* variables).

Only the public API of ssb_kernels (``sparse_kd_loss``, ``sparse_kd_ce_loss``, ``topk_logprobs`` with
impl="triton" / "chunked" / "eager"), bench/shapes.py (the shared input factory) and tests/kernel_cases.py's
``make_regime`` (the confident students). Every result is a record in the .jsonl the moment it exists; an item
that cannot fit in the time left is recorded as a skip, one that fails as an error (OOM included), and the stage
goes on.

Stages (bench/kd_gpu.py's STAGES):
  env          device, slug, versions, what is installed (printed as JSON for the driver)
  correctness  bf16/fp16 loss and dh per row and top-k ids against eager float64 (bench/gpu_correctness.py)
  kd / kd_ce   fwd+bwd against the bare-GEMM floor at each N, peak extra memory (bench/gpu_timings.py)
  peers        Liger's fused linear CE, Cut Cross-Entropy (CUDA only), torch's linear_cross_entropy (gpu_timings.py)
  topk         topk_logprobs capture against the one-GEMM floor (bench/gpu_timings.py)
  pytest       pytest -m gpu tests/test_kernels_triton.py
What they share (the plan of shapes, the device, ``Stage``: records, clock, guarded items, timing and peak
memory; the shared inputs) is bench/gpu_common.py.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO / "tests"))  # kernel_cases.make_regime

from gpu_common import PEERS_DIR, Stage, device, slug, use_peers_dir  # noqa: E402
from gpu_correctness import stage_correctness  # noqa: E402
from gpu_timings import stage_kd, stage_peers, stage_topk  # noqa: E402

OPTIONAL = {  # import name -> what lacks without it
    "pytest": "the pytest stage",
    "pytest_benchmark": "bench/test_bench_*.py suites (not run by gpu.sh)",
    "hypothesis": "the property test inside the pytest stage",
    "liger_kernel": "the Liger peer",
    "cut_cross_entropy": "the CCE peer",
    "vllm": "nothing here (rollouts)",
}


def ssb_dependencies() -> list[str]:
    """Distributions ssb itself needs (pyproject.toml) that are not installed: gpu.sh never imports ssb."""
    try:
        import tomllib

        deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    except (OSError, KeyError, ValueError):
        return []
    missing = []
    for d in deps:
        name = re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def stage_env() -> int:
    """Print one JSON line for the driver: device, slug, versions, installed packages."""
    import json

    import torch
    from hardware import metadata, versions

    dev = device()
    use_peers_dir()
    info: dict[str, Any] = {"slug": slug(dev), **metadata(dev), "versions_dict": versions()}
    info["versions"] = f"torch {torch.__version__}, triton {info['versions_dict'].get('triton')}"
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info["gpu"] = {"name": p.name, "total_mib": p.total_memory // 2**20, "sms": p.multi_processor_count,
                       "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda}  # fmt: skip
        info["versions"] += f", cuda {torch.version.cuda}"
        try:
            q = "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit"
            smi = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
    try:
        import ssb_kernels
        from ssb_kernels.streamed import blocking, vendor_caps

        info["ssb_kernels"] = str(Path(ssb_kernels.__file__).parent)
        # which fp32-output half GEMMs this torch has (the streamed pass falls back without them), and its blocking
        info["vendor_gemm"] = vendor_caps(dev) if dev.type == "cuda" else "widened fp32 GEMMs (not CUDA)"
        info["blocking_n8192"] = blocking(8192, 151_936, dev, 4096).__dict__
    except Exception as e:
        info["ssb_kernels"] = f"import failed: {type(e).__name__}: {e}"
    info["peers_dir"] = str(PEERS_DIR) if PEERS_DIR.is_dir() else None  # make bench-peers installs them there
    have = {m: importlib.util.find_spec(m) is not None for m in OPTIONAL}
    info["have"] = have
    info["missing"] = [f"{m} ({OPTIONAL[m]})" for m, ok in have.items() if not ok]
    deps = ssb_dependencies()
    if deps:
        info["missing"].append(f"ssb's own dependencies ({', '.join(deps)}): not needed, ssb is not imported")
    print(json.dumps(info), flush=True)
    return 0


def stage_pytest() -> int:
    st = Stage("pytest")
    if importlib.util.find_spec("pytest") is None:
        st.rec.add("skip", name="pytest -m gpu", reason="pytest is not installed")
        print("skip: pytest is not installed", flush=True)
        return 0
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfE",
           "tests/test_kernels_triton.py"]  # fmt: skip
    left = st.clock.left() - 2.0
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(left, 1.0))
        text, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        text, rc = (out.decode(errors="replace") if isinstance(out, bytes) else out) + "\n(timed out)", None
    print(text[-4000:], flush=True)
    counts = {w: int(m) for m, w in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    st.rec.add("result", name="pytest -m gpu tests/test_kernels_triton.py", rc=rc, counts=counts,
               wall_s=round(time.perf_counter() - t0, 1), ok=rc in (0, 5), tail=text[-1500:])  # fmt: skip
    return 0


STAGE_FNS = {"env": stage_env, "correctness": stage_correctness, "kd": stage_kd, "kd_ce": lambda: stage_kd(True),
             "peers": stage_peers, "topk": stage_topk, "pytest": stage_pytest}  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in STAGE_FNS:
        print(f"usage: python bench/gpu_stages.py {{{'|'.join(STAGE_FNS)}}}", file=sys.stderr)
        sys.exit(2)
    sys.exit(STAGE_FNS[sys.argv[1]]())
