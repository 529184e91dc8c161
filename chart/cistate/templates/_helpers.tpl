{{- define "cistate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cistate.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cistate.labels" -}}
{{ include "cistate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cistate.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end -}}

{{/* The environment every cistate container gets: settings, and secrets by reference. */}}
{{- define "cistate.env" -}}
- name: CISTATE_DATABASE_URL
  valueFrom: {secretKeyRef: {name: {{ .Values.secret.name }}, key: {{ .Values.secret.databaseUrlKey }}}}
- name: CISTATE_BUS_KEY
  valueFrom: {secretKeyRef: {name: {{ .Values.secret.name }}, key: {{ .Values.secret.busKeyKey }}}}
- name: CISTATE_API_TOKEN
  valueFrom: {secretKeyRef: {name: {{ .Values.secret.name }}, key: {{ .Values.secret.apiTokenKey }}, optional: true}}
- name: CISTATE_WEBHOOK_SECRET
  valueFrom: {secretKeyRef: {name: {{ .Values.secret.name }}, key: {{ .Values.secret.webhookSecretKey }}, optional: true}}
- name: CISTATE_BUS_PREFIX
  value: {{ .Values.busPrefix | quote }}
- name: CISTATE_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: CISTATE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: CISTATE_API_READ_AUTH
  value: {{ .Values.apiReadAuth | quote }}
- name: CISTATE_LISTEN
  value: {{ printf "0.0.0.0:%v" .Values.port | quote }}
- name: CISTATE_WORKDIR
  value: /work
{{- if .Values.pipeline }}
- name: CISTATE_PIPELINE
  value: /etc/cistate/pipeline.yaml
{{- end }}
{{- end -}}


{{/*
The broker URL of a role (dict "root" $ "role" ROLE): the Secret's key for that role, else the
shared key. Kubernetes has no fallback from one key to another: both become optional variables,
and the container's command (cistate.rabbitmqCommand) picks the first one set.
*/}}
{{- define "cistate.rabbitmqRoleKey" -}}
{{ required (printf "secret.rabbitmqUrlRoleKeys.%s must name a key of the Secret" .role) (index .root.Values.secret.rabbitmqUrlRoleKeys .role) }}
{{- end -}}

{{- define "cistate.rabbitmqEnv" -}}
- name: CISTATE_RABBITMQ_URL
  valueFrom: {secretKeyRef: {name: {{ .root.Values.secret.name }}, key: {{ .root.Values.secret.rabbitmqUrlKey }}, optional: true}}
- name: CISTATE_RABBITMQ_URL_OF_ROLE
  valueFrom: {secretKeyRef: {name: {{ .root.Values.secret.name }}, key: {{ include "cistate.rabbitmqRoleKey" . }}, optional: true}}
{{- end -}}

{{- define "cistate.rabbitmqCommand" -}}
- sh
- -c
- >-
  export CISTATE_RABBITMQ_URL="${CISTATE_RABBITMQ_URL_OF_ROLE:-${CISTATE_RABBITMQ_URL:?the Secret
  {{ .root.Values.secret.name }} has neither {{ include "cistate.rabbitmqRoleKey" . }} nor {{ .root.Values.secret.rabbitmqUrlKey }}}}";
  unset CISTATE_RABBITMQ_URL_OF_ROLE;
  exec cistate "$@"
- cistate
{{- end -}}
