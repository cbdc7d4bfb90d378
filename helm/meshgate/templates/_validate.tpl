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
