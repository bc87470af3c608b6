#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, on a CUDA machine: GPU tests, then the benches (JSON into $OUT).
# Usage: OUT=/tmp/kdn-gpu scripts/gpu_bench.sh [tests] [transfer] [ttft] [stream] [codec] [blend]   (default: all)
# On a machine without our Python deps, put wheels in .whl/ (grpcio, protobuf, lz4, xxhash, blake3) first.
set -u
OUT=${OUT:-/tmp/kdn-gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import grpc, lz4, xxhash, blake3" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
fi
export PYTHONPATH=${PYTHONPATH:-.}
steps=${*:-tests transfer ttft stream codec blend}
PATHS=${PATHS:-host,node,node-bulk,disk,cachegen,cachegen-bulk}
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for step in $steps; do
    echo "=== $step $(date -u +%H:%M:%S)"
    case $step in
        tests) timeout "$STEP_TIMEOUT" python3 -m pytest -q -p no:cacheprovider tests/codec/test_gpu.py tests/tiers/test_gpu.py 2>&1 | tail -8 ;;
        transfer) timeout "$STEP_TIMEOUT" python3 -m kdn bench transfer --device cuda --sizes 16,64 --repeat 5 \
                  --prefix-mib "${PREFIX_MIB:-1024}" --streams "${STREAMS:-8}" --json "$OUT/transfer.json" ;;
        stream) timeout "$STEP_TIMEOUT" python3 -m kdn bench stream --device cuda --json "$OUT/stream.json" ;;
        ttft) timeout "$STEP_TIMEOUT" python3 -m kdn bench ttft --device cuda --contexts "${CONTEXTS:-2K,8K,32K}" \
                  --repeats "${REPEATS:-5}" --paths "$PATHS" --json "$OUT/ttft.json" ;;
        codec) timeout "$STEP_TIMEOUT" python3 -m kdn bench codec --device cuda --json "$OUT/codec.json" ;;
        blend) timeout "$STEP_TIMEOUT" python3 -m kdn bench blend --device cuda --json "$OUT/blend.json" ;;
        *) echo "unknown step $step" ;;
    esac
done
