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
