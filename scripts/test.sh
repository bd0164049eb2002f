#!/usr/bin/env bash
# Install everything and run the whole test suite: generated-code drift, ruff,
# mypy, the deployment checks (hadolint, helm, Kubernetes schemas, Envoy) and
# pytest, which includes end-to-end tests on the real default model.
# Extra arguments go to pytest (e.g. -k cancel, or -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "install (.venv)"
bash scripts/setup.sh
step "install the browser for the chat-page test (.venv has playwright)"
bash scripts/install_browser.sh
step "install deployment tools (.tools)"
bash scripts/install_tools.sh
step "generated code matches the proto"
bash scripts/check_protos.sh
step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
step "mypy"
.venv/bin/mypy
step "deployment artefacts"
bash scripts/check_deploy.sh
step "pytest"
.venv/bin/python -m pytest "$@"
