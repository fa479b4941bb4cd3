{{/* Names and labels shared by every template. */}}

{{- define "kubellm.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The operator's object names: the release name, with the chart name added unless already in it. */}}
{{- define "kubellm.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kubellm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubellm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubellm.labels" -}}
{{ include "kubellm.selectorLabels" . }}
app.kubernetes.io/part-of: kubellm
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "kubellm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubellm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "kubellm.image" -}}
{{- printf "%s:%s" .repository (default .appVersion .tag) }}
{{- end }}

{{- define "kubellm.operatorImage" -}}
{{- include "kubellm.image" (dict "repository" .Values.image.repository "tag" .Values.image.tag "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "kubellm.engineImage" -}}
{{- include "kubellm.image" (dict "repository" .Values.engineImage.repository "tag" .Values.engineImage.tag "appVersion" .Chart.AppVersion) }}
{{- end }}
