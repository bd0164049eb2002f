#!/usr/bin/env bash
# Regenerate the Python code for protos/ into llm_stream/proto/.
#
# protoc's virtual include path (-Illm_stream/proto=protos) makes the generated
# modules import each other as llm_stream.proto.inference.v1.*, so they work
# from an installed package with no sys.path tricks or sed over imports.
# Typed stubs (.pyi) come from mypy-protobuf's plugins. scripts/check_protos.sh (run by
# scripts/test.sh, so by CI) fails when the committed code drifts from the proto.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PYTHON")
# OUT_ROOT (default: the repo) lets scripts/check_protos.sh generate elsewhere.
root=${OUT_ROOT:-.}
out=llm_stream/proto
rm -rf "${root:?}/$out/inference"
mkdir -p "$root/$out"
"$PYTHON" -m grpc_tools.protoc \
  -I"$out=protos" \
  --python_out="$root" --grpc_python_out="$root" \
  --plugin=protoc-gen-mypy="$BIN/protoc-gen-mypy" --mypy_out="$root" \
  --plugin=protoc-gen-mypy_grpc="$BIN/protoc-gen-mypy_grpc" --mypy_grpc_out="$root" \
  protos/inference/v1/inference.proto
for dir in "$out" "$out/inference" "$out/inference/v1"; do
  [ -f "$root/$dir/__init__.py" ] || : > "$root/$dir/__init__.py"
done
echo "generated $(cd "$root" && find "$out" -name '*_pb2*' | sort | tr '\n' ' ')"
