#!/usr/bin/env bash
# Regenerate the grpc-web client's code for protos/ into clients/grpc-web/gen/:
# protoc-gen-es (target=js+dts: plain JavaScript plus type declarations, no build
# step) run by buf generate, both pinned in clients/grpc-web/package-lock.json and
# installed by scripts/install_web_client.sh (scripts/install_tools.sh runs it).
# scripts/check_protos.sh (run by scripts/test.sh, so by CI) fails when the committed
# code drifts from the proto, as it does for the Python code (scripts/gen_protos.sh).
set -euo pipefail
cd "$(dirname "$0")/../clients/grpc-web"
# OUT_ROOT (default: clients/grpc-web) lets scripts/check_protos.sh generate elsewhere.
root=${OUT_ROOT:-.}
for tool in buf protoc-gen-es; do
  if [ ! -x "node_modules/.bin/$tool" ]; then
    echo "gen_web_protos: clients/grpc-web/node_modules/.bin/$tool is missing:" \
      "run scripts/install_web_client.sh (or scripts/install_tools.sh)" >&2
    exit 1
  fi
done
# buf.gen.yaml: input ../../protos, plugin node_modules/.bin/protoc-gen-es, out gen/
# (cleaned first). No network: a local plugin and a local input.
node_modules/.bin/buf generate --output "$root"
echo "generated $(cd "$root" && find gen -type f | sort | tr '\n' ' ')"
