{{/*
Helpers. The chart is also rendered by crates/whereabouts-deploy-check (gtmpl, not helm): keep to
Go template actions, `define`, `template` and `include`, and the sprig and Helm functions toYaml,
nindent, indent, quote, default and required; no `range` over maps.
*/}}
{{- define "whereabouts.namespace" -}}
{{ .Values.namespace | default .Release.Namespace }}
{{- end -}}
{{- define "whereabouts.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- define "whereabouts.metricsAddress" -}}
{{- if .Values.metrics.enabled -}}
0.0.0.0:{{ .Values.metrics.port }}
{{- end -}}
{{- end -}}
