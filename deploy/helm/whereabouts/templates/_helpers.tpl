{{/*
Helpers. The chart is also rendered by crates/whereabouts-deploy-check (gtmpl, not helm): keep to
Go template actions, `define`, `template` and `include`, and the sprig and Helm functions toYaml,
nindent, indent, quote, default and required; no `range` over maps.
*/}}
{{/*
Helm's recommended labels, beside upstream's on every object. Not in selectors: those stay upstream's
(a DaemonSet's or Deployment's selector cannot change on upgrade).
*/}}
{{- define "whereabouts.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "whereabouts.namespace" -}}
{{ .Values.namespace | default .Release.Namespace }}
{{- end -}}
{{- define "whereabouts.image" -}}
{{ required "image.repository is required: build the image from the whereabouts-rs repository's Dockerfile, push it to a registry your nodes can pull from, and set image.repository (and image.tag)" .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- define "whereabouts.metricsAddress" -}}
{{- if .Values.metrics.enabled -}}
0.0.0.0:{{ .Values.metrics.port }}
{{- end -}}
{{- end -}}
