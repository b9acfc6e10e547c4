#!/usr/bin/env bash
# The GPU kernel suite as one prepared shot for a short GPU session (needs only torch and triton; nothing is
# installed, nothing is downloaded):
#   bash bench/gpu.sh                                             # Qwen2.5-3B shapes, budget 480 s
#   SSB_GPU_BUDGET_S=300 SSB_COMMIT=abc1234 OUT=/some/dir bash bench/gpu.sh
#   SSB_GPU_SMALL=1 TRITON_INTERPRET=1 OUT=DIR bash bench/gpu.sh    # CPU dry run: same stages, tiny shapes (~1-2 min)
# Kernels only (ssb_kernels' public API; ssb is never imported): the training-step and max-context suites
# (bench/test_bench_train.py, test_bench_maxctx.py) run by `pytest bench` on a machine with ssb installed.
# Stages, in order of value (bench/kd_gpu.py STAGES; code: bench/gpu_stages.py and the gpu_*.py it imports), each in
# its own process under one global deadline (SSB_GPU_BUDGET_S from this script's start; 180 s by default for
# SSB_GPU_SMALL): correctness (bf16/fp16 vs eager float64; a failure stops the timing stages), kd, kd_ce, peers
# (Liger, CCE: when importable, also from .peers/), topk, pytest -m gpu (when installed). A stage that the time left
# cannot cover is skipped and named; one that overruns is killed at the deadline. Every result is appended to
# $OUT/<device-slug>-<commit>.jsonl the moment it exists (default OUT: bench/results/; for SSB_GPU_SMALL a temporary
# folder), with a .log, and, if time remains, a .md summary (docs/PERFORMANCE.md table rows) and a .json suite for
# bench/report.py and bench/check.py.
# SSB_COMMIT names the commit where the checkout has no .git. SSB_GPU_STAGES=kd,topk runs a subset.
# ssb_kernels is made importable by a PYTHONPATH shim (the repo's kernels/ folder linked as ssb_kernels).
set -euo pipefail
export SSB_GPU_T0="${SSB_GPU_T0:-$(date +%s)}"  # the budget counts from here
cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
SMALL="${SSB_GPU_SMALL:-0}"
if [[ "$SMALL" == 1 ]]; then
  BUDGET="${SSB_GPU_BUDGET_S:-180}"
  export OUT="${OUT:-${TMPDIR:-/tmp}/ssb-gpu-dry-run}"
else
  BUDGET="${SSB_GPU_BUDGET_S:-480}"
  export OUT="${OUT:-$REPO/bench/results}"
  unset TRITON_INTERPRET  # a real run never uses the interpreter
fi
export SSB_GPU_BUDGET_S="$BUDGET"
mkdir -p "$OUT"
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/kernels" "$SHIM/ssb_kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${SSB_COMMIT:-}" ]]; then
  SSB_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo nocommit)"
fi
export SSB_COMMIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, triton" 2>/dev/null; then
  echo "bench/gpu.sh needs torch and triton importable by $PY" >&2
  exit 2
fi
# the driver keeps its own deadline; this outer limit only guards against the driver itself hanging
status=0
timeout --kill-after=10 "$((${BUDGET%.*} + 30))" "$PY" bench/kd_gpu.py || status=$?
exit "$status"
