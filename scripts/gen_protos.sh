#!/usr/bin/env bash
# Regenerate the Python code for protos/ into llm_stream/proto/.
#
# protoc's virtual include path (-Illm_stream/proto=protos) makes the generated
# modules import each other as llm_stream.proto.inference.v1.*, so they work
# from an installed package with no sys.path tricks or sed over imports.
# Typed stubs (.pyi) come from mypy-protobuf's plugins. CI runs this and fails on `git diff --exit-code` drift.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PYTHON")
out=llm_stream/proto
rm -rf "$out/inference"
"$PYTHON" -m grpc_tools.protoc \
  -I"$out=protos" \
  --python_out=. --grpc_python_out=. \
  --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" --mypy_out=. \
  --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" --mypy_grpc_out=. \
  protos/inference/v1/inference.proto
for dir in "$out" "$out/inference" "$out/inference/v1"; do
  [ -f "$dir/__init__.py" ] || : > "$dir/__init__.py"
done
echo "generated $(find "$out" -name '*_pb2*' | sort | tr '\n' ' ')"
