#!/usr/bin/env bash
# Regenerate the Python stubs of proto/kdn/v1/*.proto into kdn/v1/ (committed; tests/test_proto_stubs.py
# fails when they are stale). Usage: scripts/gen_proto.sh [OUTPUT_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python="${PYTHON:-.venv/bin/python}"
mkdir -p "$out/kdn/v1"
"$python" -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" proto/kdn/v1/*.proto
