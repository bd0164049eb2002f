#!/usr/bin/env bash
# Envoy's graceful stop, run as its container's preStop (the chart) or before a SIGTERM
# by hand; Envoy itself exits at once on SIGTERM, cutting every stream through it.
#
#   envoy-drain.sh [SLEEP_SECONDS [WAIT_SECONDS]]      (defaults 5 and 60)
#
# 1. sleep SLEEP_SECONDS: Kubernetes removes a terminating pod from its Service's
#    endpoints while preStop runs; until then new connections may still arrive here,
#    and they are served as usual;
# 2. POST /drain_listeners?graceful on the admin interface: with Envoy started with
#    --drain-strategy immediate, every downstream connection gets an HTTP/2 GOAWAY at
#    once, so gRPC clients open their next calls on a new connection (to another Envoy
#    through the Service) while the calls in flight here go on to their end;
# 3. wait until no request is active (http.grpc_ingress.downstream_rq_active is 0), for
#    WAIT_SECONDS at most; then return, and Kubernetes' SIGTERM stops an idle Envoy.
#
# Needs bash only (its /dev/tcp), no curl: the envoyproxy/envoy image has none. The admin
# interface is loopback-only; ENVOY_ADMIN_PORT (default 9901) says where it listens.
# Copied byte for byte to charts/llm-stream/files/envoy-drain.sh (check_deploy.sh).
set -u

sleep_s=${1:-5}
wait_s=${2:-60}
admin_port=${ENVOY_ADMIN_PORT:-9901}

admin() {  # METHOD PATH: the whole HTTP response on stdout; status 1 when unreachable
  exec 3<>"/dev/tcp/127.0.0.1/$admin_port" || return 1
  printf '%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$1" "$2" >&3
  tr -d '\r' <&3
  exec 3<&-
}

active_requests() {  # the listener's active requests (its stat's line in a chunked body)
  local name value
  admin GET '/stats?filter=^http\.grpc_ingress\.downstream_rq_active$' |
    while IFS=': ' read -r name value; do
      [ "$name" = http.grpc_ingress.downstream_rq_active ] && echo "$value"
    done
}

log() { echo "envoy-drain: $*" >&2; }

sleep "$sleep_s"
response=$(admin POST '/drain_listeners?graceful') || response=""
if [ "${response%%$'\n'*}" != "HTTP/1.1 200 OK" ]; then
  log "admin interface on 127.0.0.1:$admin_port did not start a drain (${response%%$'\n'*}); stopping as is"
  exit 0
fi
log "draining: GOAWAY sent to every client connection; waiting up to ${wait_s}s for active requests"
deadline=$((SECONDS + wait_s))
while :; do
  active=$(active_requests)
  if [ "${active:-0}" = 0 ]; then
    log "no active requests left"
    exit 0
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    log "$active requests still active after ${wait_s}s; stopping anyway"
    exit 0
  fi
  sleep 1
done
