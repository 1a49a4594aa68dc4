{{/* Chart name. */}}
{{- define "muxtune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name (release-scoped). */}}
{{- define "muxtune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "muxtune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "muxtune.labels" -}}
helm.sh/chart: {{ include "muxtune.chart" . }}
{{ include "muxtune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: muxtune
{{- end }}

{{/* Labels that select the operator pod. */}}
{{- define "muxtune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "muxtune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "muxtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "muxtune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "muxtune.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "muxtune.engineImage" -}}
{{- printf "%s:%s" .Values.engine.image.repository (default .Chart.AppVersion .Values.engine.image.tag) }}
{{- end }}

{{/* The transfer Jobs' image: transfer.image, else the operator's own. */}}
{{- define "muxtune.transferImage" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.transfer.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.transfer.image.tag) }}
{{- end }}

{{/* True when the Prometheus Operator API is served. */}}
{{- define "muxtune.hasMonitoringAPI" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/* The Secret holding the engines' status token (key `token`). */}}
{{- define "muxtune.statusTokenSecret" -}}
{{- default (printf "%s-status-token" (include "muxtune.fullname" .)) .Values.operator.statusToken.existingSecret -}}
{{- end }}
