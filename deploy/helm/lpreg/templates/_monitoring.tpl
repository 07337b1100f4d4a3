{{/*
Relabelings shared by the PodMonitor and the ServiceMonitor: the dashboards and alerts select by
`run`, `namespace` and `component`, and show generators by `instance`, set here to the pod name.
*/}}
{{- define "lpreg.monitoring.relabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_lpreg_io_run]
  targetLabel: run
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
  targetLabel: component
- sourceLabels: [__meta_kubernetes_namespace]
  targetLabel: namespace
- sourceLabels: [__meta_kubernetes_pod_name]
  targetLabel: pod
- sourceLabels: [__meta_kubernetes_pod_name]
  targetLabel: instance
{{- end }}

{{/*
PodMonitor, ServiceMonitor and PrometheusRule are custom resources of the Prometheus Operator.
Installing them into a cluster without its CRDs fails with an opaque "no matches for kind"; this
fails first, saying what to do. It only judges a cluster it can see: `helm template` (offline,
where lookup returns nothing) renders as before; pass --api-versions monitoring.coreos.com/v1
there to render for a cluster you know has the Operator.
*/}}
{{- define "lpreg.monitoring.checkCRDs" -}}
{{- $ctx := index . 0 -}}
{{- $kind := index . 1 -}}
{{- $online := lookup "v1" "Namespace" "" "kube-system" -}}
{{- if and $online (not ($ctx.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
{{- fail (printf "monitoring: this cluster has no monitoring.coreos.com/v1 API, so the %s cannot be created. Install the Prometheus Operator (e.g. the kube-prometheus-stack chart) first, or turn the monitoring resources off: --set monitoring.podMonitor.enabled=false --set monitoring.serviceMonitor.enabled=false --set monitoring.prometheusRule.enabled=false (see docs/deploy.md, Monitoring)" $kind) -}}
{{- end -}}
{{- end }}
