#!/usr/bin/env bash
# Fail when the committed generated code differs from what the proto generates.
set -euo pipefail
cd "$(dirname "$0")/.."
fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
OUT_ROOT="$fresh" bash scripts/gen_protos.sh >/dev/null
if ! diff -r -x __pycache__ "$fresh/llm_stream/proto" llm_stream/proto; then
  echo "generated code is stale: run scripts/gen_protos.sh and commit the result" >&2
  exit 1
fi
echo "generated code matches protos/"
