#!/usr/bin/env bash
# Generate the Python code for execbox's own .proto files (src/execbox/adapters/protos).
# The generated files are committed; tests/test_protos.py checks they match their .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
out="${1:-src}"
"$PY" -m grpc_tools.protoc -Isrc --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    src/execbox/adapters/protos/*.proto
# Services only where a .proto declares one.
for f in "$out"/execbox/adapters/protos/*_pb2_grpc.py; do
    base="$(basename "$f" _pb2_grpc.py)"
    grep -q '^service ' "src/execbox/adapters/protos/$base.proto" || rm -f "$f"
done
