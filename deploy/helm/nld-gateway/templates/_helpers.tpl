{{/* Names ---------------------------------------------------------------------------- */}}

{{- define "nld.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name. KubeRay derives longer names from the RayService name (`<name>-raycluster-<5>`,
`<name>-serve-svc`, pod names with more suffixes), so the prefix is kept to 40 characters.
*/}}
{{- define "nld.fullname" -}}
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

{{- define "nld.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "nld.gatewayName" -}}{{ include "nld.fullname" . }}-gateway{{- end }}
{{- define "nld.rayServiceName" -}}{{ include "nld.fullname" . }}{{- end }}
{{- define "nld.policyConfigMapName" -}}{{ include "nld.fullname" . }}-policy{{- end }}
{{- define "nld.dashboardConfigMapName" -}}{{ include "nld.fullname" . }}-dashboard{{- end }}

{{- define "nld.apiKeySecretName" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecret }}{{ else }}{{ include "nld.fullname" . }}-api-keys{{ end }}
{{- end }}

{{- define "nld.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}{{ default (printf "%s-gateway" (include "nld.fullname" .)) .Values.gateway.serviceAccount.name }}{{ else }}{{ default "default" .Values.gateway.serviceAccount.name }}{{ end }}
{{- end }}

{{- define "nld.rayServiceAccountName" -}}
{{- if .Values.replicas.serviceAccount.create }}{{ default (printf "%s-ray" (include "nld.fullname" .)) .Values.replicas.serviceAccount.name }}{{ else }}{{ default "default" .Values.replicas.serviceAccount.name }}{{ end }}
{{- end }}

{{- define "nld.gatewayMetricsServiceName" -}}{{ include "nld.gatewayName" . }}-metrics{{- end }}

{{/* The claim holding the weights (model.source pvc, or download with storage shared). */}}
{{- define "nld.modelClaimName" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "pvc" }}{{ $m.pvc.claimName }}
{{- else if $m.download.pvc.existingClaim }}{{ $m.download.pvc.existingClaim }}
{{- else }}{{ include "nld.fullname" . }}-model{{ end }}
{{- end }}

{{/* True ("true") when the weights come from the chart's shared download (Job + claim). */}}
{{- define "nld.sharedDownload" -}}
{{- if and (eq .Values.model.source "download") (eq .Values.model.download.storage "shared") }}true{{ end }}
{{- end }}

{{/*
The Serve Service KubeRay creates for a RayService: `<rayservice>-serve-svc`. With a
`NewClusterWithIncrementalUpgrade` strategy the traffic split lives in a Gateway API Gateway,
so `gateway.replicaUrl` must name it (checked in nld.checkValues).
*/}}
{{- define "nld.replicaUrl" -}}
{{- if .Values.gateway.replicaUrl }}{{ .Values.gateway.replicaUrl }}{{ else }}http://{{ include "nld.rayServiceName" . }}-serve-svc.{{ .Release.Namespace }}.svc:{{ .Values.replicas.serve.port }}{{ end }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------- */}}

{{- define "nld.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nld.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels that never change with the chart or app version. The Ray pod templates carry only these:
KubeRay hashes `rayClusterConfig`, and a label that changed with every chart release would
start a whole new RayCluster (twice the GPUs) on each upgrade.
*/}}
{{- define "nld.stableLabels" -}}
{{ include "nld.selectorLabels" . }}
app.kubernetes.io/part-of: nld-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "nld.labels" -}}
helm.sh/chart: {{ include "nld.chart" . }}
{{ include "nld.stableLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "nld.gatewaySelectorLabels" -}}
{{ include "nld.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "nld.raySelectorLabels" -}}
{{ include "nld.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end }}

{{- define "nld.workerSelectorLabels" -}}
{{ include "nld.raySelectorLabels" . }}
nld-gateway/ray-node: worker
{{- end }}

{{/*
PromQL selector of this release's Ray series, from the labels the chart's PodMonitor attaches
(`namespace`, and `app_kubernetes_io_instance` from the pod label). Usable in `policy.signals`
queries as `{{ include "nld.raySelector" . }}` (they are rendered with `tpl`).
*/}}
{{- define "nld.raySelector" -}}
{namespace="{{ .Release.Namespace }}",app_kubernetes_io_instance="{{ .Release.Name }}"}
{{- end }}

{{/* PromQL selector of this release's gateway series (the ServiceMonitor's `service` label). */}}
{{- define "nld.gatewaySelector" -}}
{namespace="{{ .Release.Namespace }}",service="{{ include "nld.gatewayMetricsServiceName" . }}"}
{{- end }}

{{/*
"true" when the cluster serves a prometheus-operator kind; call with (list $ "ServiceMonitor").
Either the kind (`monitoring.coreos.com/v1/ServiceMonitor`, as Helm reads it from the API
server) or the group version (`--api-versions monitoring.coreos.com/v1`) counts.
*/}}
{{- define "nld.hasMonitoringAPI" -}}
{{- $root := index . 0 }}
{{- if or ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" (index . 1))) ($root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/* Images ---------------------------------------------------------------------------- */}}

{{/* `registry/repository:tag` (or `@digest`); call with (dict "image" .Values.x.image "root" $). */}}
{{- define "nld.image" -}}
{{- $repo := .image.repository }}
{{- if .image.registry }}{{ $repo = printf "%s/%s" (trimSuffix "/" .image.registry) .image.repository }}{{ end }}
{{- if .image.digest }}{{ $repo }}@{{ .image.digest }}{{ else }}{{ $repo }}:{{ default .root.Chart.AppVersion .image.tag }}{{ end }}
{{- end }}

{{/* Model ----------------------------------------------------------------------------- */}}

{{- define "nld.modelPath" -}}
{{- $sub := trimAll "/" .Values.model.subPath }}
{{- if $sub }}{{ printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) $sub }}{{ else }}{{ .Values.model.mountPath }}{{ end }}
{{- end }}

{{/* What the ready marker holds once the weights are complete: `<repo>@<revision>`. */}}
{{- define "nld.modelId" -}}
{{ .Values.model.download.repo }}@{{ .Values.model.download.revision }}
{{- end }}

{{/* Serve ----------------------------------------------------------------------------- */}}

{{/*
The fixed Serve replica count: `replicas.serve.numReplicas`, or (null) one replica per
`numGpus` GPUs of the worker pods, so that fixed workers never hold idle GPUs by default.
*/}}
{{- define "nld.serveReplicas" -}}
{{- $s := .Values.replicas.serve }}
{{- $w := .Values.replicas.workers }}
{{- if not (kindIs "invalid" $s.numReplicas) }}{{ int $s.numReplicas }}
{{- else if gt (float64 $s.numGpus) 0.0 }}{{ max 1 (int (floor (divf (mul $w.replicas $w.gpusPerWorker) $s.numGpus))) }}
{{- else }}{{ max 1 (int $w.replicas) }}{{ end }}
{{- end }}

{{/* The fewest Serve replicas: autoscaling's min_replicas (1 when unset), else the fixed count. */}}
{{- define "nld.serveMinReplicas" -}}
{{- $a := .Values.policy.autoscaling }}
{{- if $a }}{{ if hasKey $a "min_replicas" }}{{ int $a.min_replicas }}{{ else }}1{{ end }}{{ else }}{{ include "nld.serveReplicas" . }}{{ end }}
{{- end }}

{{/* The most Serve replicas: autoscaling's max_replicas (1 when unset), else the fixed count. */}}
{{- define "nld.serveMaxReplicas" -}}
{{- $a := .Values.policy.autoscaling }}
{{- if $a }}{{ if hasKey $a "max_replicas" }}{{ int $a.max_replicas }}{{ else }}1{{ end }}{{ else }}{{ include "nld.serveReplicas" . }}{{ end }}
{{- end }}

{{/* `args` of the Serve application: a replicas.config.ReplicaConfig. */}}
{{- define "nld.replicaArgs" -}}
{{- $v := .Values }}
{{- $modelPath := include "nld.modelPath" . }}
{{- $lora := "" }}
{{- if and $v.model.lora.enabled $v.model.lora.subfolder }}
{{- $lora = printf "%s/%s" $modelPath (trimAll "/" $v.model.lora.subfolder) }}
{{- end }}
{{- $args := dict "model_path" $modelPath "model_name" $v.model.name "use_lora" $v.model.lora.enabled "device" $v.replicas.serve.device "dtype" $v.replicas.serve.dtype "engine" $v.replicas.engine "advertise_address" (eq $v.replicas.serve.ingress "haproxy") }}
{{- if $lora }}{{ $_ := set $args "lora_path" $lora }}{{ end }}
{{- if not (kindIs "invalid" $v.replicas.serve.maxPromptTokens) }}{{ $_ := set $args "max_prompt_tokens" $v.replicas.serve.maxPromptTokens }}{{ end }}
{{- if not (kindIs "invalid" $v.replicas.serve.torchThreads) }}{{ $_ := set $args "torch_threads" $v.replicas.serve.torchThreads }}{{ end }}
{{- toYaml $args }}
{{- end }}

{{/* The RayService's serveConfigV2 (a ray.serve.schema.ServeDeploySchema document). */}}
{{- define "nld.serveConfig" -}}
{{- $v := .Values }}
{{- $s := $v.replicas.serve }}
{{- $actor := dict "num_gpus" $s.numGpus "num_cpus" $s.numCpus }}
{{- $dep := dict "name" $s.deploymentName "max_ongoing_requests" $s.maxOngoingRequests "ray_actor_options" $actor "health_check_period_s" $s.healthCheckPeriodS "health_check_timeout_s" $s.healthCheckTimeoutS "graceful_shutdown_timeout_s" $s.gracefulShutdownTimeoutS }}
{{- if $v.policy.autoscaling }}
{{- $_ := set $dep "autoscaling_config" $v.policy.autoscaling }}
{{- else }}
{{- $_ := set $dep "num_replicas" (include "nld.serveReplicas" . | int) }}
{{- end }}
{{- $app := dict "name" $s.applicationName "route_prefix" "/" "import_path" $s.importPath "args" (include "nld.replicaArgs" . | fromYaml) "deployments" (list $dep) }}
{{- $cfg := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" $s.port) "applications" (list $app) }}
{{- toYaml $cfg }}
{{- end }}

{{/* Seconds a Ray pod gets to stop; call with (dict "root" $ "group" <head or workers values>). */}}
{{- define "nld.rayGrace" -}}
{{- $shutdown := int .root.Values.replicas.serve.gracefulShutdownTimeoutS }}
{{- if kindIs "invalid" .group.terminationGracePeriodSeconds }}{{ add $shutdown 30 }}{{ else }}{{ int .group.terminationGracePeriodSeconds }}{{ end }}
{{- end }}

{{/*
Consistency checks that the values schema cannot express; each fails the render with a
message naming the keys.
*/}}
{{- define "nld.checkValues" -}}
{{- $v := .Values }}
{{- $r := $v.replicas }}
{{- $w := $r.workers }}
{{- if and (not (kindIs "invalid" $r.serve.numReplicas)) $v.policy.autoscaling }}
{{- fail "replicas.serve.numReplicas and policy.autoscaling are both set: the Serve replica count has one source; set numReplicas for a fixed count or policy.autoscaling for Serve autoscaling, not both" }}
{{- end }}
{{- $minReplicas := include "nld.serveMinReplicas" . | int }}
{{- $pods := $w.replicas }}
{{- if $r.autoscaler.enabled }}{{ $pods = $w.maxReplicas }}{{ end }}
{{- $gpus := mul $pods $w.gpusPerWorker }}
{{- if and (gt (float64 $r.serve.numGpus) 0.0) (gt (mulf (float64 $minReplicas) (float64 $r.serve.numGpus)) (float64 $gpus)) }}
{{- fail (printf "replicas: %d replicas x %v GPUs (replicas.serve.numGpus) need more GPUs than the %d worker pods x %d GPUs (replicas.workers) provide; add workers or enable replicas.autoscaler" $minReplicas $r.serve.numGpus (int $pods) (int $w.gpusPerWorker)) }}
{{- end }}
{{- if $r.autoscaler.enabled }}
{{- if or (gt (int $w.minReplicas) (int $w.replicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "replicas.workers: need minReplicas (%d) <= replicas (%d) <= maxReplicas (%d)" (int $w.minReplicas) (int $w.replicas) (int $w.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if $v.policy.autoscaling }}
{{- if gt (include "nld.serveMinReplicas" . | int) (include "nld.serveMaxReplicas" . | int) }}
{{- fail (printf "policy.autoscaling: min_replicas (%v) must not exceed max_replicas (%v)" $v.policy.autoscaling.min_replicas $v.policy.autoscaling.max_replicas) }}
{{- end }}
{{- end }}
{{- if and (eq $r.serve.ingress "haproxy") (lt (float64 $r.serve.gracefulShutdownTimeoutS) (addf $r.serve.haproxy.drainSeconds 5)) }}
{{- fail (printf "replicas.serve.gracefulShutdownTimeoutS (%v) must be at least replicas.serve.haproxy.drainSeconds + 5 (%v): Ray Serve raises it to that for direct ingress, past the pods' termination grace" $r.serve.gracefulShutdownTimeoutS (addf $r.serve.haproxy.drainSeconds 5)) }}
{{- end }}
{{- range $group := list "head" "workers" }}
{{- $g := index $r $group }}
{{- if and (not (kindIs "invalid" $g.terminationGracePeriodSeconds)) (lt (int $g.terminationGracePeriodSeconds) (int $r.serve.gracefulShutdownTimeoutS)) }}
{{- fail (printf "replicas.%s.terminationGracePeriodSeconds (%d) is shorter than replicas.serve.gracefulShutdownTimeoutS (%d): stopping pods would cut requests that Serve still drains" $group (int $g.terminationGracePeriodSeconds) (int $r.serve.gracefulShutdownTimeoutS)) }}
{{- end }}
{{- end }}
{{- $u := $r.upgradeStrategy }}
{{- if eq $u.type "NewClusterWithIncrementalUpgrade" }}
{{- if not $r.autoscaler.enabled }}
{{- fail "replicas.upgradeStrategy NewClusterWithIncrementalUpgrade needs replicas.autoscaler.enabled: KubeRay moves capacity through Serve's target_capacity and Ray's autoscaler" }}
{{- end }}
{{- if not $u.clusterUpgradeOptions.gatewayClassName }}
{{- fail "replicas.upgradeStrategy.clusterUpgradeOptions.gatewayClassName is required for NewClusterWithIncrementalUpgrade" }}
{{- end }}
{{- if not $v.gateway.replicaUrl }}
{{- fail "replicas.upgradeStrategy NewClusterWithIncrementalUpgrade splits traffic in a Gateway API Gateway: set gateway.replicaUrl to that Gateway's address (the -serve-svc Service only reaches the active cluster)" }}
{{- end }}
{{- if eq $v.gateway.replicaRouting "direct" }}
{{- fail "replicas.upgradeStrategy NewClusterWithIncrementalUpgrade shifts traffic between two clusters in the Gateway API Gateway: set gateway.replicaRouting to ingress (direct routes would send to both clusters' replicas and bypass that split)" }}
{{- end }}
{{- if gt (int $u.clusterUpgradeOptions.stepSizePercent) (int $u.clusterUpgradeOptions.maxSurgePercent) }}
{{- fail "replicas.upgradeStrategy.clusterUpgradeOptions: stepSizePercent must not exceed maxSurgePercent" }}
{{- end }}
{{- end }}
{{- if and (contains "{prometheus_url}" (include "nld.policyFile" .)) (not $v.monitoring.prometheus.url) }}
{{- fail "the policy file reads Prometheus ({prometheus_url}) but monitoring.prometheus.url is empty" }}
{{- end }}
{{- $policy := include "nld.policyFile" . | fromYaml }}
{{- if or (not $policy) (hasKey $policy "Error") }}
{{- fail "policy.file is not a YAML mapping (a policy file: signals, mode, engine)" }}
{{- end }}
{{- if and $r.gcsFaultTolerance.enabled (not $r.gcsFaultTolerance.redisAddress) }}
{{- fail "replicas.gcsFaultTolerance.enabled needs replicas.gcsFaultTolerance.redisAddress (an external Redis, host:port)" }}
{{- end }}
{{- end }}

{{/* Policy ---------------------------------------------------------------------------- */}}

{{/*
The policy file the gateway runs, as it is (never templated): `policy.file` when set, else the
preset `files/policies/<policy.preset>.yaml` (a byte-identical copy of policies/presets/).
*/}}
{{- define "nld.policyFile" -}}
{{- if .Values.policy.file }}{{ .Values.policy.file }}
{{- else }}
{{- $path := printf "files/policies/%s.yaml" .Values.policy.preset }}
{{- $text := .Files.Get $path }}
{{- if not $text }}{{ fail (printf "policy.preset %q: the chart has no %s" .Values.policy.preset $path) }}{{ end }}
{{- $text }}
{{- end }}
{{- end }}

{{/* Ray pods -------------------------------------------------------------------------- */}}

{{- define "nld.rayEnv" -}}
- name: RAY_metrics_report_interval_ms
  value: {{ .Values.replicas.metricsReportIntervalMs | int | quote }}
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: HF_HOME
  value: /tmp/hf
- name: HF_HUB_OFFLINE
  value: "1"
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/torchinductor
{{- $serve := .Values.replicas.serve }}
{{- if eq $serve.ingress "haproxy" }}
{{- /* Ray Serve's ingress switches (replicas/ingress.py `serve_env` is the reference; a test compares) */}}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "1"
- name: RAY_SERVE_HAPROXY_STATS_PORT
  value: {{ $serve.haproxy.statsPort | int | quote }}
- name: RAY_SERVE_HAPROXY_METRICS_PORT
  value: {{ $serve.haproxy.metricsPort | int | quote }}
- name: RAY_SERVE_FALLBACK_PROXY_HTTP_PORT
  value: "8500"
- name: RAY_SERVE_FALLBACK_PROXY_GRPC_PORT
  value: "9500"
- name: RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
  value: {{ $serve.haproxy.drainSeconds | toString | quote }}
- name: RAY_SERVE_HAPROXY_NBTHREAD
  value: {{ $serve.haproxy.threads | int | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT
  value: {{ $serve.haproxy.replicaPortMin | int | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
  value: {{ $serve.haproxy.replicaPortMax | int | quote }}
{{- end }}
{{- with .Values.replicas.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes of a Ray pod; call with (dict "root" $ "mountModel" bool "group" <head or workers values>).
*/}}
{{- define "nld.rayVolumes" -}}
{{- $v := .root.Values -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $v.replicas.shmSize }}
- name: tmp
  emptyDir:
    sizeLimit: {{ $v.replicas.tmpSize }}
{{- if .mountModel }}
{{- if and (eq $v.model.source "download") (eq $v.model.download.storage "perPod") }}
- name: model
  emptyDir:
    sizeLimit: {{ $v.model.download.perPod.sizeLimit }}
{{- if $v.model.download.tokenSecret.name }}
{{ include "nld.hfTokenVolume" .root }}
{{- end }}
{{- else }}
- name: model
  persistentVolumeClaim:
    claimName: {{ include "nld.modelClaimName" .root }}
    readOnly: true
{{- end }}
{{- end }}
{{- with .group.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volume mounts of a Ray container; call with (dict "root" $ "mountModel" bool "group" ...). */}}
{{- define "nld.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- if .mountModel }}
- name: model
  mountPath: {{ .root.Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- with .group.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "nld.hfTokenVolume" -}}
- name: hf-token
  secret:
    secretName: {{ .Values.model.download.tokenSecret.name }}
    defaultMode: 0400
    items:
      - key: {{ .Values.model.download.tokenSecret.key }}
        path: token
{{- end }}

{{/*
The downloader container, shared by the Job (storage: shared) and the per-pod init container
(storage: perPod): `huggingface_hub.snapshot_download` into `<mountPath>/<subPath>`, then an
atomic ready marker `.nld-ready` holding `<repo>@<revision>`. A revision pinned to a commit
whose marker is already there is not fetched again (upgrades then need no Hub access).
*/}}
{{- define "nld.downloadContainer" -}}
{{- $v := .Values }}
{{- $d := $v.model.download -}}
- name: download-model
  image: {{ include "nld.image" (dict "image" $v.replicas.image "root" .) }}
  imagePullPolicy: {{ $v.replicas.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import json, os, pathlib, re
      target = pathlib.Path(os.environ["NLD_MODEL_DIR"])
      marker = target / ".nld-ready"
      expected = os.environ["NLD_MODEL_ID"]
      revision = os.environ["NLD_MODEL_REVISION"]
      current = marker.read_text().strip() if marker.is_file() else None
      if current == expected and re.fullmatch(r"[0-9a-f]{40}", revision):
          print("model already complete in", target, "as", expected, flush=True)
      else:
          from huggingface_hub import snapshot_download
          target.mkdir(parents=True, exist_ok=True)
          patterns = json.loads(os.environ["NLD_ALLOW_PATTERNS"]) or None
          snapshot_download(repo_id=os.environ["NLD_MODEL_REPO"], revision=revision, local_dir=str(target),
                            allow_patterns=patterns)
          tmp = marker.with_name(".nld-ready.tmp")
          tmp.write_text(expected + "\n")
          os.replace(tmp, marker)
          print("model ready in", target, "as", expected, flush=True)
  env:
    - name: NLD_MODEL_REPO
      value: {{ $d.repo | quote }}
    - name: NLD_MODEL_REVISION
      value: {{ $d.revision | quote }}
    - name: NLD_MODEL_ID
      value: {{ include "nld.modelId" . | quote }}
    - name: NLD_MODEL_DIR
      value: {{ include "nld.modelPath" . | quote }}
    - name: NLD_ALLOW_PATTERNS
      value: {{ $d.allowPatterns | toJson | quote }}
    - name: HF_HOME
      value: /tmp/hf
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    {{- with $d.endpoint }}
    - name: HF_ENDPOINT
      value: {{ . | quote }}
    {{- end }}
    {{- with $d.proxy.http }}
    - name: HTTP_PROXY
      value: {{ . | quote }}
    - name: http_proxy
      value: {{ . | quote }}
    {{- end }}
    {{- with $d.proxy.https }}
    - name: HTTPS_PROXY
      value: {{ . | quote }}
    - name: https_proxy
      value: {{ . | quote }}
    {{- end }}
    {{- with $d.proxy.noProxy }}
    - name: NO_PROXY
      value: {{ . | quote }}
    - name: no_proxy
      value: {{ . | quote }}
    {{- end }}
    {{- if $d.tokenSecret.name }}
    - name: HF_TOKEN_PATH
      value: /var/run/secrets/nld/hf-token/token
    {{- end }}
    {{- with $d.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  resources:
    {{- toYaml $d.resources | nindent 4 }}
  securityContext:
    {{- toYaml $v.replicas.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $v.model.mountPath }}
    - name: tmp
      mountPath: /tmp
    {{- if $d.tokenSecret.name }}
    - name: hf-token
      mountPath: /var/run/secrets/nld/hf-token
      readOnly: true
    {{- end }}
{{- end }}

{{/*
Init container of the Ray pods with storage: shared: waits until the download Job's ready
marker names this revision, so Serve never starts on a partial checkpoint.
*/}}
{{- define "nld.waitForModelContainer" -}}
{{- $v := .Values -}}
- name: wait-for-model
  image: {{ include "nld.image" (dict "image" $v.replicas.image "root" .) }}
  imagePullPolicy: {{ $v.replicas.image.pullPolicy }}
  command:
    - sh
    - -c
    - |
      until [ "$(cat "$NLD_MODEL_DIR/.nld-ready" 2>/dev/null)" = "$NLD_MODEL_ID" ]; do
        echo "waiting for $NLD_MODEL_ID in $NLD_MODEL_DIR (written by the model download Job)"
        sleep "$NLD_POLL_SECONDS"
      done
      echo "model $NLD_MODEL_ID is ready"
  env:
    - name: NLD_MODEL_DIR
      value: {{ include "nld.modelPath" . | quote }}
    - name: NLD_MODEL_ID
      value: {{ include "nld.modelId" . | quote }}
    - name: NLD_POLL_SECONDS
      value: {{ $v.model.download.job.waitPollSeconds | int | quote }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      cpu: 100m
      memory: 64Mi
  securityContext:
    {{- toYaml $v.replicas.securityContext | nindent 4 }}
  volumeMounts:
    - name: model
      mountPath: {{ $v.model.mountPath }}
      readOnly: true
{{- end }}

{{/* initContainers of a Ray pod that mounts the model (empty when none is needed). */}}
{{- define "nld.rayInitContainers" -}}
{{- if eq .Values.model.source "download" }}
{{- if eq .Values.model.download.storage "perPod" }}
{{- include "nld.downloadContainer" . }}
{{- else }}
{{- include "nld.waitForModelContainer" . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Topology spread constraints with the chart's labels as the default selector; call with
(dict "constraints" <list> "labels" <map>).
*/}}
{{- define "nld.topologySpread" -}}
{{- range .constraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $.labels) }}
{{- end }}
- {{- toYaml $c | nindent 2 }}
{{- end }}
{{- end }}

{{/*
checkov annotations for suppressions that hold for a pod template, with their reasons;
call with (dict "root" $ "image" <image values> "extra" (list "CKV_...=reason")).
*/}}
{{- define "nld.checkovSkips" -}}
{{- $skips := .extra | default list }}
{{- if not .image.digest }}
{{- $skips = append $skips "CKV_K8S_43=the image is pinned by its version tag (the chart appVersion); set image.digest to pin it by digest" }}
{{- end }}
{{- if ne .image.pullPolicy "Always" }}
{{- $skips = append $skips "CKV_K8S_15=version tags are immutable, so IfNotPresent is safe and avoids a registry round trip per pod start; set image.pullPolicy Always if tags are reused" }}
{{- end }}
{{- range $i, $s := $skips }}
checkov.io/skip{{ add1 $i }}: {{ $s | quote }}
{{- end }}
{{- end }}
