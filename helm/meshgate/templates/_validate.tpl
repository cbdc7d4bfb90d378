{{/* Combinations values.schema.json cannot express; fails the render with a clear message. */}}
{{- define "meshgate.validate" -}}
{{- $db := 0 -}}
{{- range (list .Values.database.url .Values.database.existingSecret .Values.bundled.postgres.enabled) }}{{ if . }}{{ $db = add1 $db }}{{ end }}{{ end -}}
{{- if gt $db 1 -}}
{{- fail "set only one of database.url, database.existingSecret and bundled.postgres.enabled" -}}
{{- end -}}
{{- $redis := 0 -}}
{{- range (list .Values.redis.url .Values.redis.existingSecret .Values.bundled.redis.enabled) }}{{ if . }}{{ $redis = add1 $redis }}{{ end }}{{ end -}}
{{- if gt $redis 1 -}}
{{- fail "set only one of redis.url, redis.existingSecret and bundled.redis.enabled" -}}
{{- end -}}
{{- /* A service running more than one pod shares its state through the stores, or each pod keeps
its own (a key created on one gateway pod would be unknown to the others). */ -}}
{{- $stores := dict "database" (include "meshgate.hasDatabase" .) "redis" (include "meshgate.hasRedis" .) -}}
{{- $state := dict "gateway" "organizations, keys and settings" "quota" "limits and counters" "analytics" "traces" -}}
{{- $needs := dict "gateway" (list "database" "redis") "quota" (list "database" "redis") "analytics" (list "database") -}}
{{- range $component, $stateful := $state -}}
{{- $svc := index $.Values.services $component -}}
{{- $pods := ternary $svc.autoscaling.maxReplicas $svc.replicas $svc.autoscaling.enabled -}}
{{- range $store := get $needs $component -}}
{{- if and (gt (int $pods) 1) (not (get $stores $store)) -}}
{{- fail (printf "services.%s runs more than one pod, which needs %s (%s.url, %s.existingSecret or bundled.%s.enabled): without it each pod keeps its own %s" $component $store $store $store (ternary "postgres" "redis" (eq $store "database")) $stateful) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.mesh.tls.certManager.enabled (not .Values.mesh.tls.certManager.issuerRef.name) -}}
{{- fail "mesh.tls.certManager.enabled needs mesh.tls.certManager.issuerRef.name (an Issuer or ClusterIssuer that fills ca.crt, such as a CA issuer)" -}}
{{- end -}}
{{- $names := dict -}}
{{- range .Values.providers -}}
{{- $env := include "meshgate.providerEnvName" .name -}}
{{- if hasKey $names $env -}}
{{- fail (printf "providers: %q and %q map to the same MESHGATE_PROVIDER_%s_* variables" (get $names $env) .name $env) -}}
{{- end -}}
{{- $_ := set $names $env .name -}}
{{- if and .apiKey .apiKeySecret -}}
{{- fail (printf "providers[%s]: set apiKey or apiKeySecret, not both" .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
