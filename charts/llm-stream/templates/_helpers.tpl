{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "llm-stream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name. "-headless" and "-envoy" are appended to it, so it is kept to 54
characters to leave every derived name a valid DNS label.
*/}}
{{- define "llm-stream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llm-stream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-stream.labels" -}}
helm.sh/chart: {{ include "llm-stream.chart" . }}
{{ include "llm-stream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selects the server pods (not Envoy's). */}}
{{- define "llm-stream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-stream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "llm-stream.envoy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-stream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: envoy
{{- end }}

{{- define "llm-stream.envoy.labels" -}}
helm.sh/chart: {{ include "llm-stream.chart" . }}
{{ include "llm-stream.envoy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm-stream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-stream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm-stream.headlessName" -}}
{{- printf "%s-headless" (include "llm-stream.fullname" .) }}
{{- end }}

{{/* <fullname>-headless.<namespace>.svc.<clusterDomain> */}}
{{- define "llm-stream.headlessHost" -}}
{{- printf "%s.%s.svc.%s" (include "llm-stream.headlessName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "llm-stream.envoyName" -}}
{{- printf "%s-envoy" (include "llm-stream.fullname" .) }}
{{- end }}

{{- define "llm-stream.modelsConfigMapName" -}}
{{- printf "%s-models" (include "llm-stream.fullname" .) }}
{{- end }}

{{- define "llm-stream.cacheClaimName" -}}
{{- default (printf "%s-cache" (include "llm-stream.fullname" .)) .Values.cache.persistentVolumeClaim.existingClaim }}
{{- end }}

{{/*
terminationGracePeriodSeconds: preStop sleep + drain grace + margin, or the
explicit value, which must be larger than preStop sleep + drain grace; anything
shorter would let the kubelet SIGKILL a server that is still draining streams.
*/}}
{{/*
Envoy's terminationGracePeriodSeconds: its preStop (sleep, then a graceful drain that
waits up to envoy.drainSeconds for the streams through it) + margin, or the explicit
value, which must be larger than the preStop's longest run.
*/}}
{{- define "llm-stream.envoyTerminationGracePeriodSeconds" -}}
{{- $e := .Values.envoy }}
{{- $needed := add (int $e.preStopSleepSeconds) (int $e.drainSeconds) }}
{{- $explicit := $e.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $explicit }}
{{- add $needed (int .Values.lifecycle.terminationMarginSeconds) }}
{{- else if le (int $explicit) $needed }}
{{- fail (printf "envoy.terminationGracePeriodSeconds (%d) must be larger than envoy.preStopSleepSeconds (%d) + envoy.drainSeconds (%d), or Envoy is killed while streams still run through it; leave it null to compute it" (int $explicit) (int $e.preStopSleepSeconds) (int $e.drainSeconds)) }}
{{- else }}
{{- int $explicit }}
{{- end }}
{{- end }}

{{- define "llm-stream.terminationGracePeriodSeconds" -}}
{{- $preStop := int .Values.lifecycle.preStopSleepSeconds }}
{{- $drain := int (ceil (float64 .Values.server.drainGraceSeconds)) }}
{{- $needed := add $preStop $drain }}
{{- $explicit := .Values.lifecycle.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $explicit }}
{{- add $needed (int .Values.lifecycle.terminationMarginSeconds) }}
{{- else if le (int $explicit) $needed }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%d) must be larger than lifecycle.preStopSleepSeconds (%d) + server.drainGraceSeconds (%d), or streams are cut on every rollout; leave it null to compute it" (int $explicit) $preStop $drain) }}
{{- else }}
{{- int $explicit }}
{{- end }}
{{- end }}

{{/* The server's device: explicit, else cuda with a GPU, else auto. */}}
{{- define "llm-stream.device" -}}
{{- if .Values.server.device }}
{{- .Values.server.device }}
{{- else if .Values.gpu.enabled }}
{{- "cuda" }}
{{- else }}
{{- "auto" }}
{{- end }}
{{- end }}

{{/* models.toml for --models-file, from modelsRegistry (strings as TOML basic strings). */}}
{{- define "llm-stream.modelsToml" -}}
# Rendered by the llm-stream chart from modelsRegistry; read by --models-file.
{{- with .Values.modelsRegistry.default }}
default = {{ toJson . }}
{{- end }}
{{- range $id, $model := .Values.modelsRegistry.models }}

[models.{{ toJson $id }}]
source = {{ toJson $model.source }}
{{- with $model.revision }}
revision = {{ toJson . }}
{{- end }}
{{- end }}
{{ end }}

{{/* Split "ID@REVISION" for hf download. */}}
{{- define "llm-stream.prefetchArgs" -}}
{{- $parts := splitn "@" 2 . -}}
- download
- {{ $parts._0 | quote }}
- --revision
- {{ default "main" $parts._1 | quote }}
{{- end }}

{{/*
The plaintext health-only port (--health-port), 0 when off: server.healthPort, or
when it is null, 50052 with TLS (the kubelet's gRPC probes cannot speak TLS) and
off without.
*/}}
{{- define "llm-stream.healthPort" -}}
{{- $port := .Values.server.healthPort }}
{{- if kindIs "invalid" $port }}
{{- ternary 50052 0 .Values.tls.enabled }}
{{- else }}
{{- int $port }}
{{- end }}
{{- end }}

{{/* The probes' port: the health-only port while it is on, else the gRPC port. */}}
{{- define "llm-stream.probePort" -}}
{{- $health := int (include "llm-stream.healthPort" .) }}
{{- ternary $health (int .Values.server.port) (gt $health 0) }}
{{- end }}

{{/* --tls-client-ca: caKey in its own Secret's mount, or in the server's TLS Secret. */}}
{{- define "llm-stream.tlsClientCaFile" -}}
{{- $auth := .Values.tls.clientAuth }}
{{- $dir := ternary $auth.mountPath .Values.tls.mountPath (ne $auth.caSecretName "") }}
{{- printf "%s/%s" (trimSuffix "/" $dir) $auth.caKey }}
{{- end }}

{{/*
Envoy's upstream TLS (tls.enabled): fixed paths inside the Envoy pod. The SDS files
are keys of Envoy's ConfigMap (mounted at envoyConfigDir); the Secrets are mounted
at their own folders, outside that read-only mount. scripts/check_chart_envoy.py
checks that this equals what scripts/render_envoy.py renders for these paths.
*/}}
{{- define "llm-stream.envoyConfigDir" -}}/etc/envoy{{- end }}
{{- define "llm-stream.envoyUpstreamCaDir" -}}/etc/envoy-tls/upstream-ca{{- end }}
{{- define "llm-stream.envoyClientCertDir" -}}/etc/envoy-tls/client{{- end }}

{{/* The name Envoy sends as SNI and requires in the pods' certificates. */}}
{{- define "llm-stream.envoyServerName" -}}
{{- default (include "llm-stream.headlessHost" .) .Values.envoy.upstreamTls.serverName }}
{{- end }}

{{/* The llm_stream cluster's transport socket (inserted into files/envoy.yaml). */}}
{{- define "llm-stream.envoyTransportSocket" -}}
{{- $config := include "llm-stream.envoyConfigDir" . -}}
# Upstream TLS (tls.enabled), added by the chart: see deploy/envoy.yaml's header.
transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
    sni: {{ include "llm-stream.envoyServerName" . }}
    common_tls_context:
      alpn_protocols: [h2]
      tls_params: {tls_minimum_protocol_version: TLSv1_2}
      validation_context_sds_secret_config:
        name: upstream_ca
        sds_config:
          path_config_source: {path: {{ $config }}/sds-upstream-ca.yaml}
      {{- if .Values.tls.clientAuth.enabled }}
      tls_certificate_sds_secret_configs:
        - name: client_cert
          sds_config:
            path_config_source: {path: {{ $config }}/sds-client-cert.yaml}
      {{- end }}
{{- end }}

{{/* File-based SDS: the CA Envoy checks the pods against, and the name they must carry. */}}
{{- define "llm-stream.envoySdsUpstreamCa" -}}
{{- $dir := include "llm-stream.envoyUpstreamCaDir" . -}}
# Read by Envoy's file-based SDS; re-read when the mounted Secret is swapped.
resources:
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: upstream_ca
    validation_context:
      trusted_ca: {filename: {{ $dir }}/ca.crt}
      watched_directory: {path: {{ $dir }}}
      match_typed_subject_alt_names:
        - san_type: DNS
          matcher: {exact: {{ include "llm-stream.envoyServerName" . }}}
{{- end }}

{{/* File-based SDS: Envoy's client certificate for pods that require one (mTLS). */}}
{{- define "llm-stream.envoySdsClientCert" -}}
{{- $dir := include "llm-stream.envoyClientCertDir" . -}}
# Read by Envoy's file-based SDS; re-read when the mounted Secret is swapped.
resources:
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: client_cert
    tls_certificate:
      certificate_chain: {filename: {{ $dir }}/tls.crt}
      private_key: {filename: {{ $dir }}/tls.key}
      watched_directory: {path: {{ $dir }}}
{{- end }}

{{/* Checks across values that values.schema.json cannot express. */}}
{{- define "llm-stream.validate" -}}
{{- if gt (int .Values.server.defaultMaxTokens) (int .Values.server.maxTokensCap) }}
{{- fail "server.defaultMaxTokens must not exceed server.maxTokensCap (the server refuses to start)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.modelsRegistry.enabled .Values.server.modelsFile }}
{{- fail "set either modelsRegistry.enabled or server.modelsFile, not both" }}
{{- end }}
{{- /* Envoy pings each replica every 30 s minus up to 15 % jitter (files/envoy.yaml). */}}
{{- if and .Values.envoy.enabled (gt (float64 .Values.server.minPingIntervalSeconds) 25.0) }}
{{- fail "server.minPingIntervalSeconds must stay at or below 25 s with Envoy on: Envoy pings every replica every 30 s, jittered down to 25.5 s, and pings more often than the server allows can end in GOAWAY too_many_pings" }}
{{- end }}
{{- $tls := .Values.tls }}
{{- if and $tls.enabled (not $tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key (a cert-manager Certificate writes one)" }}
{{- end }}
{{- if and $tls.clientAuth.enabled (not $tls.enabled) }}
{{- fail "tls.clientAuth.enabled (mTLS) needs tls.enabled" }}
{{- end }}
{{- if and .Values.envoy.enabled $tls.clientAuth.enabled (not .Values.envoy.upstreamTls.clientCertSecretName) }}
{{- fail "tls.clientAuth.enabled with envoy.enabled needs envoy.upstreamTls.clientCertSecretName: the pods refuse Envoy without a client certificate signed by their client CA" }}
{{- end }}
{{- if and .Values.apiKeys.enabled (not .Values.apiKeys.secretName) }}
{{- fail "apiKeys.enabled needs apiKeys.secretName: a Secret holding the keys file under apiKeys.key" }}
{{- end }}
{{- if and (gt (int .Values.server.maxConcurrentPerKey) 0) (not .Values.apiKeys.enabled) }}
{{- fail "server.maxConcurrentPerKey counts per API key: it needs apiKeys.enabled (the server refuses to start)" }}
{{- end }}
{{- $health := int (include "llm-stream.healthPort" .) }}
{{- if and $tls.enabled (eq $health 0) }}
{{- fail "server.healthPort is 0 with tls.enabled: the kubelet's gRPC probes cannot speak TLS; leave it null (50052) or pick a port" }}
{{- end }}
{{- if and (gt $health 0) (eq $health (int .Values.server.port)) }}
{{- fail "server.healthPort must differ from server.port (the server refuses to start)" }}
{{- end }}
{{- if and (gt $health 0) .Values.metrics.enabled (eq $health (int .Values.metrics.port)) }}
{{- fail "server.healthPort must differ from metrics.port (the server refuses to start)" }}
{{- end }}
{{- /* Every mount of the server container: none may hide another. */}}
{{- $mounts := list .Values.cache.mountPath "/tmp" }}
{{- if .Values.modelsRegistry.enabled }}{{ $mounts = append $mounts .Values.modelsRegistry.mountPath }}{{ end }}
{{- if $tls.enabled }}{{ $mounts = append $mounts $tls.mountPath }}{{ end }}
{{- if and $tls.clientAuth.enabled $tls.clientAuth.caSecretName }}{{ $mounts = append $mounts $tls.clientAuth.mountPath }}{{ end }}
{{- if .Values.apiKeys.enabled }}{{ $mounts = append $mounts .Values.apiKeys.mountPath }}{{ end }}
{{- range $i, $a := $mounts }}
{{- range $j, $b := $mounts }}
{{- $a = trimSuffix "/" $a }}
{{- $b = trimSuffix "/" $b }}
{{- if and (ne $i $j) (or (eq $a $b) (hasPrefix (printf "%s/" $a) $b)) }}
{{- fail (printf "mount paths %s and %s overlap: give tls.mountPath, tls.clientAuth.mountPath, apiKeys.mountPath, modelsRegistry.mountPath and cache.mountPath separate folders" $a $b) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
