{{/* The six services, in the order of README.md's port table. */}}
{{- define "meshgate.services" -}}
gateway inference router quota analytics sync
{{- end -}}

{{/*
Who calls whom, from the code: each caller's gRPC peers. A caller gets
MESHGATE_<CALLER>__<PEER>_ENDPOINT per peer, and each peer's NetworkPolicy admits exactly its
callers (scripts/check-deploy.sh derives both from the rendered chart and compares them).
*/}}
{{- define "meshgate.peers" -}}
gateway: [quota, router, sync, inference, analytics]
router: [inference]
sync: [quota]
{{- end -}}

{{/* Services given DATABASE_URL: tenancy and settings (gateway), limits and ledger (quota),
traces (analytics), the job queue (sync). The migration job uses it too. */}}
{{- define "meshgate.databaseUsers" -}}
gateway quota analytics sync
{{- end -}}

{{/* Services given REDIS_URL: revocation and settings invalidation (gateway), counters (quota). */}}
{{- define "meshgate.redisUsers" -}}
gateway quota
{{- end -}}

{{/* The callers of a component: (dict "root" $ "component" "quota") -> "gateway sync". */}}
{{- define "meshgate.callers" -}}
{{- $callers := list -}}
{{- range $caller, $peers := include "meshgate.peers" .root | fromYaml -}}
{{- if has $.component $peers -}}
{{- $callers = append $callers $caller -}}
{{- end -}}
{{- end -}}
{{- join " " $callers -}}
{{- end -}}

{{- define "meshgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped prefix of every object name; kept short enough for "-analytics" suffixes. */}}
{{- define "meshgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "meshgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "meshgate.labels" -}}
helm.sh/chart: {{ include "meshgate.chart" . }}
app.kubernetes.io/name: {{ include "meshgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "router"). */}}
{{- define "meshgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshgate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "meshgate.componentLabels" -}}
{{ include "meshgate.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "meshgate.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Service address of a component's gRPC port: (dict "root" $ "component" "quota"). */}}
{{- define "meshgate.grpcEndpoint" -}}
{{- $svc := index .root.Values.services .component -}}
{{- printf "http://%s-%s:%v" (include "meshgate.fullname" .root) .component $svc.ports.grpc -}}
{{- end -}}

{{/* The Secret holding a service's mesh certificate (cert-manager's layout: tls.crt, tls.key,
ca.crt): (dict "root" $ "component" "quota"). */}}
{{- define "meshgate.meshTlsSecretName" -}}
{{- $given := index .root.Values.mesh.tls.secrets .component -}}
{{- default (printf "%s-%s-mesh-tls" (include "meshgate.fullname" .root) .component) $given -}}
{{- end -}}

{{/* The names peers dial a service by: the Service's short name and its namespace forms. */}}
{{- define "meshgate.serviceDnsNames" -}}
{{- $name := printf "%s-%s" (include "meshgate.fullname" .root) .component -}}
{{- $ns := .root.Release.Namespace -}}
- {{ $name }}
- {{ $name }}.{{ $ns }}
- {{ $name }}.{{ $ns }}.svc
- {{ $name }}.{{ $ns }}.svc.{{ .root.Values.mesh.tls.clusterDomain }}
{{- end -}}

{{- define "meshgate.secretName" -}}
{{- printf "%s-secrets" (include "meshgate.fullname" .) -}}
{{- end -}}

{{- define "meshgate.serviceAccountName" -}}
{{- if .root.Values.serviceAccount.create -}}
{{- printf "%s-%s" (include "meshgate.fullname" .root) .component -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* True (non-empty) when a Postgres URL is configured (meshgate.databaseUsers get it). */}}
{{- define "meshgate.hasDatabase" -}}
{{- if or .Values.database.url .Values.database.existingSecret .Values.bundled.postgres.enabled -}}true{{- end -}}
{{- end -}}

{{- define "meshgate.hasRedis" -}}
{{- if or .Values.redis.url .Values.redis.existingSecret .Values.bundled.redis.enabled -}}true{{- end -}}
{{- end -}}

{{/* The DATABASE_URL env entry, from the chart's Secret or the user's. */}}
{{- define "meshgate.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.database.existingSecret }}
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.existingSecretKey }}
      {{- else }}
      name: {{ include "meshgate.secretName" . }}
      key: database-url
      {{- end }}
{{- end -}}

{{- define "meshgate.redisEnv" -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.redis.existingSecret }}
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
      {{- else }}
      name: {{ include "meshgate.secretName" . }}
      key: redis-url
      {{- end }}
{{- end -}}

{{/* Provider name as it appears in MESHGATE_PROVIDER_<NAME>_* variables. */}}
{{- define "meshgate.providerEnvName" -}}
{{- . | upper | replace "-" "_" | replace "." "_" -}}
{{- end -}}

{{/*
A value kept across upgrades: the existing Secret's key when the release already has it (lookup
returns nothing offline, e.g. in `helm template`), else `fallback`. (dict "root" $ "key" "admin-key" "fallback" "...")
*/}}
{{- define "meshgate.keptSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "meshgate.secretName" .root) -}}
{{- if and $existing (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- .fallback -}}
{{- end -}}
{{- end -}}

{{- define "meshgate.postgresPassword" -}}
{{- if .Values.bundled.postgres.password -}}
{{- .Values.bundled.postgres.password -}}
{{- else -}}
{{- include "meshgate.keptSecretValue" (dict "root" . "key" "postgres-password" "fallback" (randAlphaNum 32)) -}}
{{- end -}}
{{- end -}}
