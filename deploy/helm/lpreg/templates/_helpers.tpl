{{/* Chart name, truncated to the 63 characters a label value may hold. */}}
{{- define "lpreg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix; components append "-learner" etc., so it leaves room for them. */}}
{{- define "lpreg.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lpreg.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The run id as a label value: dashboards and alerts select a run by it. */}}
{{- define "lpreg.run" -}}
{{- (.Values.config.run_id | default "tiny") | toString | trunc 63 | trimAll "-_." }}
{{- end }}

{{- define "lpreg.labels" -}}
helm.sh/chart: {{ include "lpreg.chart" . }}
{{ include "lpreg.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lpreg
lpreg.io/run: {{ include "lpreg.run" . | quote }}
{{- end }}

{{- define "lpreg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lpreg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component; call with (dict "ctx" $ "component" "learner"). */}}
{{- define "lpreg.componentLabels" -}}
{{ include "lpreg.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lpreg.componentSelectorLabels" -}}
{{ include "lpreg.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lpreg.learner.fullname" -}}
{{- printf "%s-learner" (include "lpreg.fullname" .) }}
{{- end }}

{{- define "lpreg.learner.headless" -}}
{{- printf "%s-learner-headless" (include "lpreg.fullname" .) }}
{{- end }}

{{- define "lpreg.generator.fullname" -}}
{{- printf "%s-generator" (include "lpreg.fullname" .) }}
{{- end }}

{{- define "lpreg.redis.fullname" -}}
{{- printf "%s-redis" (include "lpreg.fullname" .) }}
{{- end }}

{{- define "lpreg.configName" -}}
{{- printf "%s-config" (include "lpreg.fullname" .) }}
{{- end }}

{{- define "lpreg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lpreg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lpreg.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/* Learner Service DNS name: what generators dial for gRPC and the TCPStore. */}}
{{- define "lpreg.learner.host" -}}
{{- printf "%s.%s.svc.%s" (include "lpreg.learner.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "lpreg.learner.address" -}}
{{- printf "%s:%d" (include "lpreg.learner.host" .) (int .Values.learner.ports.grpc) }}
{{- end }}

{{- define "lpreg.redis.url" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc.%s:%d/0" (include "lpreg.redis.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.redis.port) }}
{{- else }}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{- define "lpreg.auth.secretName" -}}
{{- default (printf "%s-auth" (include "lpreg.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "lpreg.redis.secretName" -}}
{{- default (printf "%s-redis" (include "lpreg.fullname" .)) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "lpreg.redis.secretKey" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
{{- print "password" }}
{{- end }}
{{- end }}

{{/*
The config file: the user's `config` block with the fields that depend on this deployment
(bind addresses, ports, Service addresses, run directory) taken from the component blocks. The
learner binds everything on 0.0.0.0 and tells generators to dial its Service. A StatefulSet
restarts any container that exits, so a learner that exited after its last step would loop
(resume, find nothing to do, exit); it stays up instead (learner.exit_when_done=false).
*/}}
{{- define "lpreg.config" -}}
{{- $deployment := dict
  "control" (dict
    "host" "0.0.0.0"
    "port" (int .Values.learner.ports.grpc)
    "learner_address" (include "lpreg.learner.address" .)
    "require_auth" true)
  "broadcast" (dict
    "store_host" "0.0.0.0"
    "advertise_host" (include "lpreg.learner.host" .)
    "store_port" (int .Values.learner.ports.store))
  "metrics" (dict
    "host" "0.0.0.0"
    "learner_port" (int .Values.learner.ports.metrics)
    "generator_port" (int .Values.generator.ports.metrics))
  "redis" (dict "url" (include "lpreg.redis.url" .))
  "local" (dict "run_dir" (printf "%s/runs/{run_id}" .Values.learner.persistence.mountPath))
  "learner" (dict "exit_when_done" false)
}}
{{- toYaml (mergeOverwrite (deepCopy (.Values.config | default dict)) $deployment) }}
{{- end }}

{{/* Environment shared by the learner and the generators: secrets by reference, endpoints by value. */}}
{{- define "lpreg.commonEnv" -}}
- name: LPREG_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "lpreg.auth.secretName" . }}
      key: {{ .Values.auth.secretKey }}
{{- if .Values.redis.auth.enabled }}
- name: LPREG_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "lpreg.redis.secretName" . }}
      key: {{ include "lpreg.redis.secretKey" . }}
{{- end }}
- name: LPREG_REDIS_URL
  value: {{ include "lpreg.redis.url" . | quote }}
{{- /* The root filesystem is read-only: caches (Hugging Face, torch, vLLM, matplotlib) go to /tmp. */}}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- end }}

{{/* Volumes shared by the learner and the generators; call with (dict "ctx" $ "shm" <size>). */}}
{{- define "lpreg.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "lpreg.configName" .ctx }}
- name: tmp
  emptyDir: {}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm }}
{{- if .ctx.Values.modelStorage.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "modelStorage.existingClaim is required when modelStorage.enabled is true" .ctx.Values.modelStorage.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "lpreg.commonVolumeMounts" -}}
- name: config
  mountPath: /etc/lpreg
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- if .Values.modelStorage.enabled }}
- name: models
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Fetch an existing Secret's key so upgrades keep generated values; empty when rendering offline. */}}
{{- define "lpreg.existingSecretValue" -}}
{{- $secret := lookup "v1" "Secret" .namespace .name }}
{{- if and $secret $secret.data }}
{{- index $secret.data .key | default "" }}
{{- end }}
{{- end }}
