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
{{- end }}
