#!/usr/bin/env bash
# vLLM GPU-backend KV layouts on CUDA (no vLLM needed on the GPU machine): the layout round-trip tests on CUDA
# tensors (tests/connectors/test_vllm_layouts.py, strides recorded from vLLM 0.32), then gather/scatter
# throughput of an 8K-token Llama-3-8B-shaped request vs a plain pinned copy (JSON into $OUT).
# Usage: OUT=/tmp/kdn-gpu scripts/gpu_vllm_layouts.sh
# On a machine without our Python deps, put wheels in .whl/ (grpcio, protobuf, lz4, xxhash, blake3) first.
set -u
OUT=${OUT:-/tmp/kdn-gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import grpc, lz4, xxhash, blake3" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
fi
export PYTHONPATH=${PYTHONPATH:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "=== tests $(date -u +%H:%M:%S)"
timeout 600 python3 -m pytest -q -p no:cacheprovider tests/connectors/test_vllm_layouts.py \
    -k "cuda or backends or bad_input" 2>&1 | tail -8 | tee "$OUT/vllm_layouts_tests.txt"
echo "=== bench $(date -u +%H:%M:%S)"
for bs in 16 64; do
    timeout 300 python3 -m connectors.vllm.bench_layouts --tokens 8192 --block-size "$bs" \
        --json "$OUT/vllm_layouts_bs$bs.json"
done
