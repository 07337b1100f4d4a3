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

{{/*
An image reference from a values block {repository, tag, digest}: "repo:tag", or "repo:tag@digest"
when a digest is set (the digest decides what runs; the tag stays for people reading the spec).
Call with (dict "image" .Values.image "defaultTag" .Chart.AppVersion).
*/}}
{{- define "lpreg.imageRef" -}}
{{- $ref := printf "%s:%s" .image.repository (.image.tag | default .defaultTag | toString) }}
{{- with .image.digest }}
{{- $ref = printf "%s@%s" $ref . }}
{{- end }}
{{- $ref }}
{{- end }}

{{- define "lpreg.image" -}}
{{- include "lpreg.imageRef" (dict "image" .Values.image "defaultTag" .Chart.AppVersion) }}
{{- end }}

{{/* Learner Service DNS name: what generators dial for gRPC and the TCPStore. */}}
{{- define "lpreg.learner.host" -}}
{{- printf "%s.%s.svc.%s" (include "lpreg.learner.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/*
Readiness with TLS on: grpc.health.v1 over TLS from inside the container, the certificate checked
against the CA generators use and the name they dial (the learner Service), so a probe that passes
means generators can connect too.
*/}}
{{- define "lpreg.learner.tlsHealthProbe" -}}
{{- $script := `import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
address, ca_file, server_name, timeout_s = sys.argv[1:5]
with open(ca_file, "rb") as f:
    credentials = grpc.ssl_channel_credentials(f.read())
options = [("grpc.ssl_target_name_override", server_name)]
with grpc.secure_channel(address, credentials, options=options) as channel:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=float(timeout_s)
    )
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
` }}
- python
- -c
- {{ $script | quote }}
- {{ printf "127.0.0.1:%d" (int .Values.learner.ports.grpc) | quote }}
- {{ printf "%s/%s" .Values.tls.mountPath .Values.tls.caKey | quote }}
- {{ include "lpreg.learner.host" . | quote }}
- {{ sub (int .Values.learner.probes.readiness.timeoutSeconds) 1 | max 1 | quote }}
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
{{- if .Values.tls.enabled }}
{{- $tls := .Values.tls.mountPath }}
{{- $_ := mergeOverwrite $deployment.control (dict
  "tls_cert_file" (printf "%s/%s" $tls .Values.tls.certKey)
  "tls_key_file" (printf "%s/%s" $tls .Values.tls.keyKey)
  "tls_ca_file" (printf "%s/%s" $tls .Values.tls.caKey)) }}
{{- end }}
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

{{/*
Volumes of a learner or generator pod; call with (dict "ctx" $ "component" "learner").
/tmp holds caches (vLLM compile and kernel caches, Hugging Face), so it is sized: an unbounded
emptyDir can fill the node's disk and get every pod on it evicted.
*/}}
{{- define "lpreg.commonVolumes" -}}
{{- $values := index .ctx.Values .component }}
- name: config
  configMap:
    name: {{ include "lpreg.configName" .ctx }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $values.tmpSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $values.shmSizeLimit }}
{{- if .ctx.Values.modelStorage.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "modelStorage.existingClaim is required when modelStorage.enabled is true" .ctx.Values.modelStorage.existingClaim }}
    readOnly: true
{{- end }}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.existingSecret is required when tls.enabled is true" .ctx.Values.tls.existingSecret }}
    {{- if ne .component "learner" }}
    {{- /* Generators verify the learner; they never get its private key. */}}
    items:
      - key: {{ .ctx.Values.tls.caKey }}
        path: {{ .ctx.Values.tls.caKey }}
    {{- end }}
{{- end }}
{{- with $values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Mounts of the learner or generator container; call with (dict "ctx" $ "component" "learner"). */}}
{{- define "lpreg.commonVolumeMounts" -}}
{{- $values := index .ctx.Values .component }}
- name: config
  mountPath: /etc/lpreg
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- if .ctx.Values.modelStorage.enabled }}
- name: models
  mountPath: {{ .ctx.Values.modelStorage.mountPath }}
  readOnly: true
{{- end }}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  mountPath: {{ .ctx.Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- with $values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Init containers of a component: the chart's container security context unless one is given, and
the pod's volumes are theirs to mount (e.g. a model download into an extraVolume).
*/}}
{{- define "lpreg.initContainers" -}}
{{- $values := index .ctx.Values .component }}
{{- range $values.initContainers }}
{{- $init := deepCopy . }}
{{- if not (hasKey $init "securityContext") }}
{{- $_ := set $init "securityContext" $.ctx.Values.securityContext }}
{{- end }}
- {{- toYaml $init | nindent 2 }}
{{- end }}
{{- end }}

{{/* Collective-communication settings of the learner and the generators (the nccl block). */}}
{{- define "lpreg.ncclEnv" -}}
{{- $n := .Values.nccl }}
{{- with $n.socketIfname }}
- name: NCCL_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- with $n.glooSocketIfname }}
- name: GLOO_SOCKET_IFNAME
  value: {{ . | quote }}
{{- end }}
{{- with $n.ibHca }}
- name: NCCL_IB_HCA
  value: {{ . | quote }}
{{- end }}
{{- with $n.debug }}
- name: NCCL_DEBUG
  value: {{ . | quote }}
{{- end }}
{{- range $name, $value := $n.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* A component's resources plus the RDMA/EFA devices of the nccl block (requests = limits). */}}
{{- define "lpreg.resources" -}}
{{- $resources := deepCopy (index .ctx.Values .component).resources }}
{{- $rdma := .ctx.Values.nccl.rdma }}
{{- if $rdma.resourceName }}
{{- $count := int $rdma.count }}
{{- $_ := set $resources "limits" (merge (dict $rdma.resourceName $count) ($resources.limits | default dict)) }}
{{- $_ := set $resources "requests" (merge (dict $rdma.resourceName $count) ($resources.requests | default dict)) }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* The container security context; IPC_LOCK added when RDMA needs to pin memory. */}}
{{- define "lpreg.securityContext" -}}
{{- $sc := deepCopy .Values.securityContext }}
{{- if .Values.nccl.ipcLock }}
{{- $caps := $sc.capabilities | default dict }}
{{- $_ := set $caps "add" (concat ($caps.add | default list) (list "IPC_LOCK") | uniq) }}
{{- $_ := set $sc "capabilities" $caps }}
{{- end }}
{{- toYaml $sc }}
{{- end }}

{{/*
Bytes in a Kubernetes quantity (512Mi, 2G) or a Redis size (1gb, 512mb, 100k) as a float. Redis
reads k/m/g as powers of 1000 and kb/mb/gb as powers of 1024, like Kubernetes's k/M/G and Ki/Mi/Gi.
*/}}
{{- define "lpreg.bytes" -}}
{{- $s := . | toString | trim }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $s }}
{{- $unit := lower (trimPrefix $num $s) }}
{{- $k := 1024.0 }}
{{- $multipliers := dict "" 1.0 "b" 1.0 "k" 1000.0 "kb" $k "ki" $k "m" 1e6 "mb" (mulf $k $k) "mi" (mulf $k $k) "g" 1e9 "gb" (mulf $k $k $k) "gi" (mulf $k $k $k) "t" 1e12 "ti" (mulf $k $k $k $k) }}
{{- if or (not $num) (not (hasKey $multipliers $unit)) }}
{{- fail (printf "cannot read %q as a size in bytes" $s) }}
{{- end }}
{{- mulf (float64 $num) (index $multipliers $unit) }}
{{- end }}

{{/* Fetch an existing Secret's key so upgrades keep generated values; empty when rendering offline. */}}
{{- define "lpreg.existingSecretValue" -}}
{{- $secret := lookup "v1" "Secret" .namespace .name }}
{{- if and $secret $secret.data }}
{{- index $secret.data .key | default "" }}
{{- end }}
{{- end }}
