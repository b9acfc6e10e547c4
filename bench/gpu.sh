#!/usr/bin/env bash
# GPU kernel suite in one command, on a bare CUDA machine (torch + triton preinstalled, no hub, no pip index):
#   bash bench/gpu.sh            # correctness (pytest gpu tests if pytest exists) + quick bench (< 10 min)
#   bash bench/gpu.sh --full     # all Qwen2.5-3B shapes (N = 1k, 4k, 8k, 16k), 10 rounds each
# Writes bench/results/<device>-<commit>.json. ssb_kernels is made importable by a PYTHONPATH shim (the
# repo's kernels/ folder linked as ssb_kernels), so nothing is installed.
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
QUICK="--quick"
[[ "${1:-}" == "--full" ]] && QUICK=""

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton, ssb_kernels; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available())"

status=0
if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== pytest: kernel correctness on CUDA (bf16/fp16/fp32, oracle in float64)"
  timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py tests/test_kernels.py \
    -m "not slow" || status=1
else
  echo "== pytest not installed: correctness runs inside bench/kd_gpu.py only"
fi
echo "== bench: providers eager / chunked / triton / gemm3 (+ liger, cce when installed)"
timeout 420 "$PY" bench/kd_gpu.py $QUICK || status=1
exit $status
