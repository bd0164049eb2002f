#!/usr/bin/env bash
# Fail when the committed generated code differs from what the proto generates:
# the Python code (scripts/gen_protos.sh -> llm_stream/proto) and the grpc-web
# client's JavaScript (scripts/gen_web_protos.sh -> clients/grpc-web/gen).
set -euo pipefail
cd "$(dirname "$0")/.."
fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
stale=0
OUT_ROOT="$fresh" bash scripts/gen_protos.sh >/dev/null
if ! diff -r -x __pycache__ "$fresh/llm_stream/proto" llm_stream/proto; then
  echo "generated Python code is stale: run scripts/gen_protos.sh and commit the result" >&2
  stale=1
fi
mkdir "$fresh/web"
OUT_ROOT="$fresh/web" bash scripts/gen_web_protos.sh >/dev/null
if ! diff -r "$fresh/web/gen" clients/grpc-web/gen; then
  echo "generated grpc-web code is stale: run scripts/gen_web_protos.sh and commit the result" >&2
  stale=1
fi
[ "$stale" -eq 0 ] || exit 1
echo "generated code matches protos/ (Python and grpc-web)"
