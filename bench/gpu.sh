#!/usr/bin/env bash
# GPU kernel suite in one command, on a bare CUDA machine (torch + triton preinstalled, no hub, no pip index):
#   bash bench/gpu.sh            # correctness first (fatal on a mismatch) + quick bench (< 10 min)
#   bash bench/gpu.sh --full     # all Qwen2.5-3B shapes (N = 1k, 4k, 8k, 16k), 10 rounds each
# Writes bench/results/<device>-<commit>.json (kernels) and, when pytest is there, bench/results/<device>-<commit>/
# (suite files: the Qwen2.5-3B QLoRA training step, fused vs eager, and the max context under a 24 GiB cap via
# `ssb train --dry-run`), then prints the README table rows and, when bench/baselines/<device>.json exists, the
# regression check. SSB_GPU_SUITES="kernels train" (default) picks sections, e.g. one per 10-minute device call.
# ssb_kernels is made importable by a PYTHONPATH shim (the repo's kernels/ folder linked as ssb_kernels), so
# nothing is installed. QLoRA needs bitsandbytes, absent from a bare image: wheels carried in .whl/ (gitignored)
# are unpacked into the shim first, e.g. `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_24_x86_64 -d .whl bitsandbytes` here; without it the QLoRA benchmarks skip, saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/kernels" "$SHIM/ssb_kernels"
export PYTHONPATH="$SHIM:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export SSB_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo nocommit)"
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
SUITES="${SSB_GPU_SUITES:-kernels train}"
if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SHIM" "$REPO"/.whl/*.whl
fi
QUICK="--quick"
[[ "${1:-}" == "--full" ]] && QUICK=""

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton, ssb_kernels; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())"

status=0
DEV="$(cd bench && "$PY" -c 'from hardware import device_name; print(device_name())')"
RUN="$DEV-$SSB_COMMIT"
fail_loudly() {
  echo "########################################################################" >&2
  echo "## KERNEL CORRECTNESS FAILED on $DEV ($1): no benchmark is run on wrong kernels" >&2
  echo "########################################################################" >&2
  exit 1
}
if [[ " $SUITES " != *" kernels "* ]]; then
  :
elif "$PY" -c "import pytest" 2>/dev/null; then
  # first, and fatal: inputs on the device, reduction sum, normwise relative tolerances vs float64
  echo "== pytest: kernel correctness on CUDA (fp32/bf16/fp16, confident-student regimes, oracle in float64)"
  timeout 420 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py -m "not slow" \
    || fail_loudly "tests/test_kernels_triton.py"
else
  echo "== pytest not installed: correctness runs first inside bench/kd_gpu.py (fatal there too)"
fi
if [[ " $SUITES " == *" kernels "* ]]; then
  echo "== bench: providers eager / chunked / triton / gemm3 (+ liger, cce when installed)"
  timeout 420 "$PY" bench/kd_gpu.py $QUICK || status=1
fi
if [[ " $SUITES " == *" train "* ]] && "$PY" -c "import pytest, pytest_benchmark" 2>/dev/null; then
  echo "== bench: QLoRA training step (Qwen2.5-3B shape, fused vs eager) + max context under 24 GiB"
  BENCH_RESULTS_DIR="$REPO/bench/results/$RUN" timeout 420 "$PY" -P -m pytest -q -rs -p no:cacheprovider $QUICK \
    bench/test_bench_train.py bench/test_bench_maxctx.py -k "not cpu" || status=1
fi
results=()
for r in "bench/results/$RUN.json" "bench/results/$RUN"; do [[ -e "$r" ]] && results+=("$r"); done
if (( ${#results[@]} )); then
  "$PY" bench/report.py "${results[@]}" || true
  if [[ -f "bench/baselines/$DEV.json" ]]; then
    "$PY" bench/check.py --results "${results[@]}" --baseline "bench/baselines/$DEV.json" || status=1
  fi
  if [[ -n "${OUT:-}" ]]; then  # the device tool brings $OUT back
    cp -r "${results[@]}" "$OUT/" || true
  fi
fi
exit $status
