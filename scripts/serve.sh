#!/usr/bin/env bash
# Install into .venv if needed, then start the server (default: the embedded
# SmolLM2-135M-Instruct on port 50051). Extra arguments go to the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m llm_stream.serve "$@"
