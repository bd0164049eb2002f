#!/usr/bin/env bash
# Check every deployment artefact offline, with the tools from scripts/install_tools.sh:
#   Dockerfile.gpu      hadolint; its pins agree with scripts/setup.sh
#   charts/llm-stream   helm lint --strict; helm template (default values and every
#                       ci/*-values.yaml) -> each document against the strict
#                       Kubernetes schemas of 1.29 and the newest bundled version
#                       (scripts/validate_manifests.py; the ServiceMonitor CRD is not
#                       in them and gets a subset schema instead), the drain timing
#                       invariant, the render-time guards, its LLM_STREAM_* variables
#                       against the server's own parser, and the Envoy config it renders
#                       (scripts/check_chart_envoy.py: equal to render_envoy.py's for the
#                       same paths, upstream TLS included, and valid for envoy)
#   deploy/envoy.yaml   envoy --mode validate (no deprecated fields), the chart's copies of
#                       it and of deploy/envoy-drain.sh (the preStop) are identical, and scripts/render_envoy.py's test renderings (plaintext
#                       with grpc-web origins, and upstream mTLS) validate
#   scripts/*.sh        shellcheck;  YAML files  yamllint
# A missing tool is a failure, never a skip. Every check runs; the summary lists the
# failed ones and the exit status is 1 if any failed. Non-interactive (CI=true is fine).
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS_DIR=${TOOLS_DIR:-$PWD/.tools}
bin=$TOOLS_DIR/bin
py=$TOOLS_DIR/venv/bin/python
# The project's own venv (scripts/setup.sh): the chart is checked against the server's parser.
project_py=${PYTHON:-$PWD/.venv/bin/python}
chart=charts/llm-stream
kube_versions=(-k 1.29 -k newest)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=()
step() {  # name, command...: run, time, record a failure, keep going
  local name=$1; shift
  local started=$SECONDS
  printf '\n-- %s\n' "$name"
  if "$@"; then
    printf '   ok (%ds)\n' $((SECONDS - started))
  else
    printf '   FAILED: %s (%ds)\n' "$name" $((SECONDS - started))
    failed+=("$name")
  fi
}

# --- tools: all present, or stop here ---------------------------------------------
missing=()
for tool in helm envoy hadolint shellcheck yamllint; do
  [ -x "$bin/$tool" ] || missing+=("$bin/$tool")
done
if [ ! -x "$py" ] || ! "$py" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
  missing+=("$py with kubernetes-validate")
fi
if [ ! -x "$project_py" ] || ! "$project_py" -c 'import llm_stream.cli, yaml, cryptography' 2>/dev/null; then
  missing+=("$project_py with llm_stream and its dev extras (scripts/setup.sh)")
fi
if [ ${#missing[@]} -gt 0 ]; then
  printf 'check_deploy: missing: %s\n' "${missing[*]}" >&2
  echo "check_deploy: run scripts/setup.sh and scripts/install_tools.sh first" >&2
  exit 1
fi

# --- Dockerfile.gpu ----------------------------------------------------------------
hadolint_gpu() { "$bin/hadolint" --failure-threshold info Dockerfile.gpu; }

# The image must install what scripts/setup.sh installs.
dockerfile_pins() {
  local name ok=0 want got
  for name in TORCH_VERSION SMOLLM2_VERSION; do
    want=$(sed -n "s/^${name}=\([^[:space:]]*\).*/\1/p" scripts/setup.sh | head -n 1)
    got=$(sed -n "s/^ARG ${name}=\([^[:space:]]*\).*/\1/p" Dockerfile.gpu | head -n 1)
    if [ -z "$want" ] || [ "$want" != "$got" ]; then
      echo "Dockerfile.gpu ARG $name=$got but scripts/setup.sh has $name=$want" >&2
      ok=1
    fi
  done
  return $ok
}

# --- Envoy ---------------------------------------------------------------------------
envoy_validate() {  # file: valid, no deprecated fields (they go away in a later Envoy),
                   # and every file it reads through SDS accepted
  local out
  if ! out=$("$bin/envoy" --mode validate -c "$1" --log-level warn 2>&1); then
    printf '%s\n' "$out" >&2
    return 1
  fi
  if grep -i 'deprecated' <<<"$out" >&2; then
    echo "$1: uses deprecated Envoy fields" >&2
    return 1
  fi
  if grep -i 'rejected' <<<"$out" >&2; then
    echo "$1: Envoy rejected a file the config reads" >&2
    return 1
  fi
  echo "   $1: valid"
}

envoy_source() { envoy_validate deploy/envoy.yaml; }

envoy_chart_copy() {
  local name ok=0
  for name in envoy.yaml envoy-drain.sh; do
    cmp "deploy/$name" "$chart/files/$name" || {
      echo "$chart/files/$name differs from deploy/$name:" \
        "cp deploy/$name $chart/files/$name" >&2
      ok=1
    }
  done
  return $ok
}

envoy_rendered_for_tests() {
  # (Functions run as `if` conditions, where set -e is off: chain with &&.)
  "$py" scripts/render_envoy.py --listen-port 18080 --admin-port 19901 \
    --upstream 127.0.0.1:50061 --upstream 127.0.0.1:50062 \
    --allow-origin http://localhost:5173 --allow-origin-regex '^https://[a-z0-9-]+\.example\.com$' \
    -o "$work/envoy-test.yaml" &&
    grep -q 'type: STATIC' "$work/envoy-test.yaml" &&
    grep -q 'exact: http://localhost:5173' "$work/envoy-test.yaml" &&
    envoy_validate "$work/envoy-test.yaml" &&
    envoy_rendered_tls_for_tests
}

envoy_rendered_tls_for_tests() {  # upstream mTLS, with real certificates (tests/certs.py)
  local dir=$work/envoy-test-tls
  mkdir -p "$dir" &&
    "$project_py" -c 'import sys; from pathlib import Path; from tests.certs import CertificateAuthority as CA; CA(Path(sys.argv[1]), name="ca").issue_client("envoy")' \
      "$dir/certs" &&
    "$py" scripts/render_envoy.py --listen-port 18080 --admin-port 19901 \
      --upstream 127.0.0.1:50061 --upstream-ca "$dir/certs/ca.crt" --server-name localhost \
      --client-cert "$dir/certs/envoy.crt" --client-key "$dir/certs/envoy.key" \
      -o "$dir/envoy.yaml" &&
    grep -q 'UpstreamTlsContext' "$dir/envoy.yaml" &&
    [ -f "$dir/sds-upstream-ca.yaml" ] && [ -f "$dir/sds-client-cert.yaml" ] &&
    envoy_validate "$dir/envoy.yaml"
}

# --- Helm chart ------------------------------------------------------------------------
values_sets=("")  # "" = the chart's defaults
for file in "$chart"/ci/*-values.yaml; do
  values_sets+=("$file")
done

helm_lint() {
  local set
  for set in "${values_sets[@]}"; do
    "$bin/helm" lint --strict "$chart" ${set:+-f "$set"} --quiet || return 1
  done
}

# Render each values set; validate every document; validate the Envoy config it carries.
helm_render_validate() {
  local set name out
  for set in "${values_sets[@]}"; do
    name=$(basename "${set:-default}" .yaml)
    out=$work/rendered-$name.yaml
    echo "   helm template ${set:-(default values)}"
    "$bin/helm" template llm-stream "$chart" --namespace inference ${set:+-f "$set"} >"$out" || return 1
    "$py" scripts/validate_manifests.py "${kube_versions[@]}" "$out" | sed 's/^/   /'
    [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
    "$py" - "$out" "$work/envoy-$name.yaml" <<'EOF' || return 1
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
configs = [d["data"]["envoy.yaml"] for d in docs
           if d["kind"] == "ConfigMap" and "envoy.yaml" in d.get("data", {})]
if configs:
    open(sys.argv[2], "w").write(configs[0])
EOF
    if [ -f "$work/envoy-$name.yaml" ]; then
      grep -q 'address: llm-stream-headless.inference.svc.cluster.local, port_value: 50051' \
        "$work/envoy-$name.yaml" || { echo "Envoy upstream not set to the headless Service" >&2; return 1; }
    fi
  done
}

# The chart's Envoy config = render_envoy.py's for the same paths (what the Envoy tests
# run), and envoy validates it with its SDS files and throwaway certificates in place.
chart_envoy() {
  local rendered=() set name
  for set in "${values_sets[@]}"; do
    name=$(basename "${set:-default}" .yaml)
    [ -f "$work/rendered-$name.yaml" ] || { echo "not rendered: ${set:-default}" >&2; return 1; }
    rendered+=("$work/rendered-$name.yaml")
  done
  "$project_py" scripts/check_chart_envoy.py --envoy "$bin/envoy" "${rendered[@]}" | sed 's/^/   /'
  return "${PIPESTATUS[0]}"
}

# Every rendered server environment must parse with the server's own CLI, and every
# server flag must be settable from values.
chart_env_parses() {
  local rendered=() set name
  for set in "${values_sets[@]}"; do
    name=$(basename "${set:-default}" .yaml)
    [ -f "$work/rendered-$name.yaml" ] || { echo "not rendered: ${set:-default}" >&2; return 1; }
    rendered+=("$work/rendered-$name.yaml")
  done
  "$project_py" scripts/check_chart_env.py "${rendered[@]}" | sed 's/^/   /'
  return "${PIPESTATUS[0]}"
}

# The chart must refuse values that would cut streams or not start.
expect_render_failure() {  # message, helm args...
  local message=$1; shift
  if "$bin/helm" template llm-stream "$chart" "$@" >/dev/null 2>"$work/err"; then
    echo "helm template $* rendered, but should fail: $message" >&2
    return 1
  fi
  grep -q "$message" "$work/err" || { cat "$work/err" >&2; return 1; }
  echo "   refused as expected: $*"
}

helm_guards() {
  expect_render_failure 'must be larger than' \
    --set lifecycle.terminationGracePeriodSeconds=40 &&
    expect_render_failure 'must be larger than' \
      --set server.drainGraceSeconds=120 --set lifecycle.terminationGracePeriodSeconds=100 &&
    expect_render_failure 'Envoy is killed while streams still run' \
      --set envoy.enabled=true --set envoy.terminationGracePeriodSeconds=60 &&
    expect_render_failure 'must not exceed server.maxTokensCap' \
      --set server.defaultMaxTokens=4096 &&
    expect_render_failure "Additional property maxConcurent" \
      --set server.maxConcurent=8 &&
    expect_render_failure 'too_many_pings' \
      --set envoy.enabled=true --set server.minPingIntervalSeconds=60 &&
    expect_render_failure 'needs metrics.enabled' \
      --set serviceMonitor.enabled=true --set metrics.enabled=false &&
    expect_render_failure 'tls.enabled needs tls.secretName' \
      --set tls.enabled=true &&
    expect_render_failure 'needs tls.enabled' \
      --set tls.clientAuth.enabled=true &&
    expect_render_failure 'cannot speak TLS' \
      --set tls.enabled=true --set tls.secretName=tls --set server.healthPort=0 &&
    expect_render_failure 'must differ from server.port' \
      --set server.healthPort=50051 &&
    expect_render_failure 'must differ from metrics.port' \
      --set server.healthPort=9090 &&
    expect_render_failure 'needs envoy.upstreamTls.clientCertSecretName' \
      --set envoy.enabled=true --set tls.enabled=true --set tls.secretName=tls \
      --set tls.clientAuth.enabled=true &&
    expect_render_failure 'apiKeys.enabled needs apiKeys.secretName' \
      --set apiKeys.enabled=true &&
    expect_render_failure 'it needs apiKeys.enabled' \
      --set server.maxConcurrentPerKey=4 &&
    expect_render_failure 'overlap' \
      --set tls.enabled=true --set tls.secretName=tls --set tls.mountPath=/models/cache/tls &&
    expect_render_failure 'grpcWeb.allowedOrigins.0: Does not match pattern' \
      --set envoy.enabled=true --set 'envoy.grpcWeb.allowedOrigins={https://chat.example.com/}'
}

# --- the rest -----------------------------------------------------------------------------
shellcheck_scripts() { "$bin/shellcheck" scripts/*.sh deploy/*.sh; }

yamllint_files() {
  "$bin/yamllint" --strict -c .yamllint.yaml deploy/envoy.yaml .yamllint.yaml \
    "$chart/Chart.yaml" "$chart/values.yaml" "$chart"/ci/*.yaml clients/grpc-web/buf.gen.yaml
}

started=$SECONDS
step "hadolint Dockerfile.gpu" hadolint_gpu
step "Dockerfile.gpu pins = scripts/setup.sh" dockerfile_pins
step "envoy validate deploy/envoy.yaml" envoy_source
step "chart's files/envoy.yaml, envoy-drain.sh = deploy/'s" envoy_chart_copy
step "envoy validate render_envoy.py output" envoy_rendered_for_tests
step "helm lint --strict" helm_lint
step "helm template | Kubernetes schemas ${kube_versions[*]}" helm_render_validate
step "chart env = server flags (llm_stream.cli)" chart_env_parses
step "chart's Envoy config = render_envoy.py's, valid" chart_envoy
step "chart refuses bad values" helm_guards
step "shellcheck scripts/*.sh deploy/*.sh" shellcheck_scripts
step "yamllint" yamllint_files

echo
if [ ${#failed[@]} -gt 0 ]; then
  printf 'check_deploy: FAILED (%ds):\n' $((SECONDS - started))
  printf '  - %s\n' "${failed[@]}"
  exit 1
fi
printf 'check_deploy: all deployment checks passed (%ds)\n' $((SECONDS - started))
