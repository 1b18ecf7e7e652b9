#!/usr/bin/env bash
# One prepared check for a lent NVIDIA GPU machine (x86-64, python3 3.12, torch with CUDA, transformers,
# pytest; no opentelemetry packages, no network). Run from the repository root, with the OpenTelemetry
# wheels in .whl/ (carried: the device tool's `carry: [".whl"]`):
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
#
# In <= 8 minutes, each part under its own `timeout` so that one hang cannot eat the rest:
#   1. environment (GPU, driver, torch)                                    -> $OUT/env.txt
#   2. the real-CUDA tests (tests/test_real_cuda.py: events on several streams, a capture around a CUDA
#      graph replay, a graph capture with the resolver running, torch.compile(fullgraph=True) with
#      instrument_module, clock accuracy against torch.cuda.Event)         -> $OUT/tests.txt, $OUT/clock.json
#   3. the simulated-device tests of the same rules, on this machine's python (a sanity check of the install)
#   3b. the CUDA calls of the hot path one by one (benchmarks/cuda_breakdown.py) -> $OUT/bench.txt
#   4. the GPU benchmark: per-capture host cost, and the small Llama's decode throughput with capture on/off
#      and with synchronize-based timing                                   -> $OUT/bench.txt, $OUT/bench/
# Results go under $OUT (at most 8 files, 2 folder levels) and to stdout, the summary last.
# Without CUDA it still runs (the tests skip, the benchmark part says why it did not run; with
# OTEL_NPU_GPU_CHECK_CPU_BENCH=1 it runs the benchmark on the CPU instead, to test this script): CI never uses it.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/otel-npu-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
T_START=$(date +%s)
declare -a SUMMARY

part() {  # part NAME SECONDS LOGFILE COMMAND...: run under a timeout, tee to LOGFILE, remember the outcome
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s) ==="
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    local verdict="ok"
    [ "$rc" -ne 0 ] && verdict="FAILED rc=$rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit}s"
    SUMMARY+=("$name: $verdict (${took}s)")
}

# 0. the OpenTelemetry wheels (no network there)
if ls .whl/*.whl >/dev/null 2>&1; then
    timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | tail -3
    SUMMARY+=("install wheels: rc=${PIPESTATUS[0]}")
else
    SUMMARY+=("install wheels: no .whl/ folder here (using what is installed)")
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export OTEL_NPU_GPU_CHECK_OUT=$OUT OTEL_METRICS_EXPORTER=none OTEL_TRACES_EXPORTER=none PYTHONUNBUFFERED=1

# 1. environment
part "environment" 60 "$OUT/env.txt" bash -c "
    date -u; uname -m; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
    \"$PY\" -c 'import sys, torch, opentelemetry.sdk, otel_npu; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__,
\"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'"

# 2. real-CUDA tests (skipped cleanly without CUDA)
part "real-CUDA tests" 240 "$OUT/tests.txt" "$PY" -m pytest -q -s -p no:randomly -p no:cacheprovider \
    tests/test_real_cuda.py "tests/test_backends.py::test_real_cuda_stages_are_device_timed"

# 3. the simulated-device rules (graph capture, torch.compile) on this interpreter
part "simulated-device tests" 90 "$OUT/tests.txt" "$PY" -m pytest -q -p no:randomly -p no:cacheprovider \
    tests/test_graph_capture.py tests/test_compile.py tests/test_devices.py tests/test_busy_device.py

# 3b. where the enabled capture's host time goes (the CUDA calls one by one)
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    part "CUDA hot-path breakdown" 60 "$OUT/bench.txt" "$PY" -m benchmarks.cuda_breakdown
fi

# 4. the GPU benchmark (within what is left of 8 minutes)
LEFT=$(( 460 - ($(date +%s) - T_START) ))
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    if [ "$LEFT" -gt 60 ]; then
        part "GPU benchmark" "$LEFT" "$OUT/bench.txt" "$PY" -m benchmarks.run --device cuda --only hotpath,decode \
            --quick --llama --out "$OUT/bench"
    else
        SUMMARY+=("GPU benchmark: skipped, only ${LEFT}s left")
    fi
elif [ "${OTEL_NPU_GPU_CHECK_CPU_BENCH:-0}" = 1 ]; then  # to test this script's benchmark path without a GPU
    part "benchmark on the CPU (no GPU here)" "$LEFT" "$OUT/bench.txt" "$PY" -m benchmarks.run --device cpu \
        --only hotpath,decode --quick --llama --out "$OUT/bench"
else
    SUMMARY+=("GPU benchmark: not run (torch.cuda.is_available() is False)")
fi

echo
echo "=================== otel-npu GPU check: summary ($(( $(date +%s) - T_START ))s) ==================="
head -4 "$OUT/env.txt" 2>/dev/null
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "-- tests:"
grep -E "^(FAILED|ERROR)|passed|failed|skipped|clock accuracy" "$OUT/tests.txt" 2>/dev/null | tail -12
if [ -f "$OUT/bench.txt" ]; then
    echo "-- benchmark (targets printed, never asserted):"
    grep -E "^\||^  [a-zA-Z(].*[0-9]$|^Host cost" "$OUT/bench.txt" | grep -v "^  variant" | tail -40
fi
echo "-- files under \$OUT:"
(cd "$OUT" && find . -type f | sort)
