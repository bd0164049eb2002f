#!/usr/bin/env bash
# Install the grpc-web test client's Node dependencies (clients/grpc-web/node_modules,
# gitignored) exactly as clients/grpc-web/package-lock.json pins them: npm ci, which
# never changes the lockfile. Idempotent: a no-op while the lockfile's digest matches
# the one recorded at the last install. Non-interactive (CI=true is fine); needs Node
# 20+ and npm, and reaches only the npm registry. scripts/install_tools.sh runs it.
# What it installs: @connectrpc/connect + @connectrpc/connect-node (the grpc-web
# transport) and @bufbuild/protobuf for clients/grpc-web/stream.mjs; @bufbuild/buf and
# @bufbuild/protoc-gen-es for scripts/gen_web_protos.sh.
set -euo pipefail
cd "$(dirname "$0")/../clients/grpc-web"

log() { printf '[install_web_client] %s\n' "$*" >&2; }

for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "$tool is missing: install Node.js 20 or newer (with npm)"
    exit 1
  fi
done
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
  log "Node $(node --version) is too old: the client needs Node 20 or newer"
  exit 1
fi

stamp=node_modules/.package-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x node_modules/.bin/buf ]; then
  CI=true npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi
# Prove the pinned tools run (buf's binary comes from a platform-specific package).
printf '%-20s %s\n' "buf" "$(node_modules/.bin/buf --version)"
printf '%-20s %s\n' "protoc-gen-es" "$(node_modules/.bin/protoc-gen-es --version)"
printf '%-20s %s\n' "connect-node" "$(node -p 'require("./node_modules/@connectrpc/connect-node/package.json").version')"
