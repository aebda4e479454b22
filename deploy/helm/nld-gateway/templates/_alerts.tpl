{{/*
The chart's alert rules (a PrometheusRule's `spec`: `groups`). They select this release's
series with the labels the chart's monitors attach (nld.raySelector, nld.gatewaySelector);
tests/deploy run them through `promtool check rules` and `promtool test rules`.
*/}}
{{- define "nld.alertGroups" -}}
{{- $p := .Values.monitoring.prometheusRule }}
{{- $ray := include "nld.raySelector" . }}
{{- $gw := include "nld.gatewaySelector" . }}
{{- $release := printf "%s/%s" .Release.Namespace .Release.Name }}
{{- $labels := mergeOverwrite (dict "release" .Release.Name) (deepCopy $p.alertLabels) }}
groups:
  - name: nld-gateway.{{ .Release.Namespace }}.{{ .Release.Name }}
    rules:
      - alert: NLDReplicasMissing
        # Serve replicas reporting, in the cluster with the most of them (an upgrade's two
        # clusters are counted apart), below the fewest the chart asks for.
        expr: (max(count by (ray_io_cluster) (ray_nld_replica_num_requests_running{{ $ray }})) or vector(0)) < {{ include "nld.serveMinReplicas" . }}
        for: {{ $p.replicaDownFor }}
        labels:
          {{- toYaml (mergeOverwrite (dict "severity" "critical") $labels) | nindent 10 }}
        annotations:
          summary: "{{ $release }}: fewer Serve replicas than {{ include "nld.serveMinReplicas" . }}"
          description: "Only {{ "{{" }} $value {{ "}}" }} NLD replicas report metrics. Check the RayService status, the worker pods (GPUs, taints, weights) and the Serve controller logs."
      - alert: NLDGateway5xxRate
        expr: |
          sum(rate(nld_gateway_requests_total{{ $gw | replace "}" ",status=~\"5..\"}" }}[5m]))
            / sum(rate(nld_gateway_requests_total{{ $gw }}[5m])) > {{ $p.errorRateThreshold }}
        for: 5m
        labels:
          {{- toYaml (mergeOverwrite (dict "severity" "warning") $labels) | nindent 10 }}
        annotations:
          summary: "{{ $release }}: more than {{ mulf $p.errorRateThreshold 100 }}% of completions fail with 5xx"
          description: "{{ "{{" }} $value | humanizePercentage {{ "}}" }} of the gateway's completion requests answered 5xx over 5 minutes (no_replica, replica_lost, upstream_timeout...)."
      - alert: NLDReplicaQueueDeep
        expr: max by (ray_io_cluster, pod) (ray_nld_replica_waiting_requests{{ $ray }}) > {{ $p.queueDepthThreshold }}
        for: 5m
        labels:
          {{- toYaml (mergeOverwrite (dict "severity" "warning") $labels) | nindent 10 }}
        annotations:
          summary: "{{ $release }}: a replica's queue stays above {{ $p.queueDepthThreshold }} waiting requests"
          description: "{{ "{{" }} $labels.pod {{ "}}" }} has {{ "{{" }} $value {{ "}}" }} requests waiting for a KV slot; beyond replicas.engine.max_waiting they get 429. Add replicas (policy.autoscaling) or KV slots."
      - alert: NLDReplicaKVCacheFull
        expr: max by (ray_io_cluster, pod) (ray_nld_replica_kv_cache_usage_ratio{{ $ray }}) > {{ $p.kvCacheUsageThreshold }}
        for: 10m
        labels:
          {{- toYaml (mergeOverwrite (dict "severity" "warning") $labels) | nindent 10 }}
        annotations:
          summary: "{{ $release }}: a replica's KV cache stays above {{ mulf $p.kvCacheUsageThreshold 100 }}%"
          description: "{{ "{{" }} $labels.pod {{ "}}" }} uses {{ "{{" }} $value | humanizePercentage {{ "}}" }} of its KV cache; new requests queue."
      - alert: NLDPolicySignalStale
        # The series the policy's fleet signal reads are gone: the policy then holds its mode
        # (or falls back), blind to load.
        expr: absent_over_time(ray_nld_replica_num_requests_running{{ $ray }}[{{ $p.signalStaleFor }}])
        labels:
          {{- toYaml (mergeOverwrite (dict "severity" "warning") $labels) | nindent 10 }}
        annotations:
          summary: "{{ $release }}: the policy's load signal has no data"
          description: "No ray_nld_replica_num_requests_running series of this release for {{ $p.signalStaleFor }}: the mode policy cannot see load. Check the PodMonitor, Prometheus targets and the replicas."
{{- end }}
