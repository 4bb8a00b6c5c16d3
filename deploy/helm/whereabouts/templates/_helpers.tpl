{{/*
Helpers. The chart is also rendered by crates/whereabouts-deploy-check (gtmpl, not helm): keep to
Go template actions, `define`/`template` (no `include`; and, as in Go, a `template` action's
output cannot be piped) and the sprig functions toYaml, nindent,
indent, quote and default; no `range` over maps.
*/}}
{{- define "whereabouts.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- define "whereabouts.metricsAddress" -}}
{{- if .Values.metrics.enabled -}}
0.0.0.0:{{ .Values.metrics.port }}
{{- end -}}
{{- end -}}
