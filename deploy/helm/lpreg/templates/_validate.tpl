{{/*
Cross-field checks that values.schema.json cannot express. Each fails the install with what is
wrong and what to change, instead of leaving pods Pending, crash-looping or evicted later.
*/}}
{{- define "lpreg.validate" -}}
{{- include "lpreg.validate.gpus" . }}
{{- include "lpreg.validate.modelStorage" . }}
{{- include "lpreg.validate.redisMemory" . }}
{{- include "lpreg.validate.autoscaling" . }}
{{- end }}

{{/*
A vLLM generator starts tensor_parallel_size workers, one GPU each: fewer GPUs and the engine
cannot start, more and they sit idle.
*/}}
{{- define "lpreg.validate.gpus" -}}
{{- $gpu := .Values.gpuResourceName }}
{{- $backend := ((.Values.config.generator | default dict).backend | default dict) }}
{{- $limits := .Values.generator.resources.limits | default dict }}
{{- $requests := .Values.generator.resources.requests | default dict }}
{{- if and (eq ($backend.type | default "hf") "vllm") (hasKey $limits $gpu) }}
{{- $tp := int ($backend.tensor_parallel_size | default 1) }}
{{- if ne (int (index $limits $gpu)) $tp }}
{{- fail (printf "generator.resources.limits[%q] is %v but config.generator.backend.tensor_parallel_size is %d: a vLLM generator needs one GPU per tensor-parallel worker; make them equal" $gpu (index $limits $gpu) $tp) }}
{{- end }}
{{- if and (hasKey $requests $gpu) (ne (int (index $requests $gpu)) $tp) }}
{{- fail (printf "generator.resources.requests[%q] must equal its limit (%d, the tensor_parallel_size)" $gpu $tp) }}
{{- end }}
{{- end }}
{{- $device := ((.Values.config.learner | default dict).device | default "") | toString }}
{{- if and (eq $device "cuda") (not (hasKey (.Values.learner.resources.limits | default dict) $gpu)) }}
{{- fail (printf "config.learner.device is cuda but learner.resources.limits has no %q: the learner pod would get no GPU" $gpu) }}
{{- end }}
{{- end }}

{{/*
The learner and every generator mount the model claim. A ReadWriteOnce volume attaches to one
node only, so pods on other nodes hang in ContainerCreating (Multi-Attach error); it is accepted
only when every pod is pinned to the same node.
*/}}
{{- define "lpreg.validate.modelStorage" -}}
{{- $m := .Values.modelStorage }}
{{- if $m.enabled }}
{{- if eq $m.accessMode "ReadWriteOncePod" }}
{{- fail "modelStorage.accessMode ReadWriteOncePod: the learner and the generators all mount the model claim, and such a volume admits one pod; use a ReadOnlyMany or ReadWriteMany claim" }}
{{- end }}
{{- if eq $m.accessMode "ReadWriteOnce" }}
{{- $host := "kubernetes.io/hostname" }}
{{- $learnerNode := index (.Values.learner.nodeSelector | default dict) $host | default "" }}
{{- $generatorNode := index (.Values.generator.nodeSelector | default dict) $host | default "" }}
{{- if or (not $learnerNode) (ne $learnerNode $generatorNode) }}
{{- fail "modelStorage.accessMode ReadWriteOnce: the claim attaches to one node, but the learner and the generators may be scheduled on several (Multi-Attach errors). Use a ReadOnlyMany or ReadWriteMany claim, or pin learner and generators to one node with nodeSelector kubernetes.io/hostname" }}
{{- end }}
{{- end }}
{{- $claim := lookup "v1" "PersistentVolumeClaim" .Release.Namespace $m.existingClaim }}
{{- if and $claim $claim.spec }}
{{- $modes := $claim.spec.accessModes | default list }}
{{- if not (has $m.accessMode $modes) }}
{{- fail (printf "modelStorage.accessMode is %s but claim %s has access modes %v" $m.accessMode $m.existingClaim $modes) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Rewriting the append-only file forks Redis: pages written meanwhile are copied, so the container
needs room beyond maxmemory. maxmemory above 60 % of the memory limit risks an OOM kill, and with
it every stream entry written since the last fsync.
*/}}
{{- define "lpreg.validate.redisMemory" -}}
{{- if .Values.redis.enabled }}
{{- $limit := (.Values.redis.resources.limits | default dict).memory }}
{{- if $limit }}
{{- $max := include "lpreg.bytes" .Values.redis.maxmemory | float64 }}
{{- $room := mulf (include "lpreg.bytes" $limit | float64) 0.6 }}
{{- if gt $max $room }}
{{- fail (printf "redis.maxmemory %s is above 60%% of redis.resources.limits.memory %s: an append-only-file rewrite forks Redis and copies the pages written meanwhile, so the container would be OOM-killed; lower maxmemory or raise the limit" .Values.redis.maxmemory $limit) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The backlog the autoscaler reads is prompts issued but not yet read by any generator. Admission
caps issued-and-untrained prompt groups at (max_staleness + 1) x prompts_per_step, and each
generator holds up to max_tasks_in_flight of them, so minReplicas generators must leave some of
that cap unread, or the backlog is zero at any load and the HPA never scales up.
*/}}
{{- define "lpreg.validate.autoscaling" -}}
{{- $a := .Values.generator.autoscaling }}
{{- if and $a.keda.enabled (not $a.enabled) }}
{{- fail "generator.autoscaling.keda.enabled needs generator.autoscaling.enabled (KEDA then owns the HPA)" }}
{{- end }}
{{- if and $a.enabled $a.backlog.enabled }}
{{- $room := include "lpreg.admission" . | fromYaml }}
{{- if le (int $room.cap) (mul (int $a.minReplicas) (int $room.perGenerator)) }}
{{- fail (printf "generator.autoscaling: admission lets (max_staleness + 1) x prompts_per_step = %d prompt groups out at once, and minReplicas (%d) x config.generator.max_tasks_in_flight (%d) generators hold all of them, so the undelivered backlog stays 0 and the HPA cannot scale up. Lower max_tasks_in_flight or minReplicas, or raise prompts_per_step or max_staleness (docs/deploy.md, Autoscaling)" (int $room.cap) (int $a.minReplicas) (int $room.perGenerator)) }}
{{- end }}
{{- end }}
{{- if and $a.enabled (not $a.backlog.enabled) (not $a.waitShare.enabled) }}
{{- fail "generator.autoscaling needs a signal: enable backlog or waitShare (or both)" }}
{{- end }}
{{- end }}

{{/* Admission figures of the config (RunConfig defaults where the config omits a field). */}}
{{- define "lpreg.admission" -}}
{{- $learner := .Values.config.learner | default dict }}
{{- $generator := .Values.config.generator | default dict }}
{{- $staleness := $learner.max_staleness | default 0 | int }}
{{- if not (hasKey $learner "max_staleness") }}{{ $staleness = 1 }}{{ end }}
cap: {{ mul (add $staleness 1) ($learner.prompts_per_step | default 16 | int) }}
perGenerator: {{ $generator.max_tasks_in_flight | default 8 | int }}
{{- end }}
