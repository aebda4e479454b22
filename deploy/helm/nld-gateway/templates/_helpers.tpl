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

{{/* The Serve Service KubeRay creates for a RayService: `<rayservice>-serve-svc`. */}}
{{- define "nld.replicaUrl" -}}
{{- if .Values.gateway.replicaUrl }}{{ .Values.gateway.replicaUrl }}{{ else }}http://{{ include "nld.rayServiceName" . }}-serve-svc.{{ .Release.Namespace }}.svc:{{ .Values.replicas.serve.port }}{{ end }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------- */}}

{{- define "nld.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nld.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "nld.labels" -}}
helm.sh/chart: {{ include "nld.chart" . }}
{{ include "nld.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: nld-gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "nld.gatewaySelectorLabels" -}}
{{ include "nld.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "nld.raySelectorLabels" -}}
{{ include "nld.selectorLabels" . }}
app.kubernetes.io/component: ray
{{- end }}

{{/* Images ---------------------------------------------------------------------------- */}}

{{/* Call with (dict "image" .Values.x.image "root" $). */}}
{{- define "nld.image" -}}
{{- if .image.digest }}{{ .image.repository }}@{{ .image.digest }}{{ else }}{{ .image.repository }}:{{ default .root.Chart.AppVersion .image.tag }}{{ end }}
{{- end }}

{{/* Model ----------------------------------------------------------------------------- */}}

{{- define "nld.modelPath" -}}
{{- $sub := trimAll "/" .Values.model.subPath }}
{{- if $sub }}{{ printf "%s/%s" (trimSuffix "/" .Values.model.mountPath) $sub }}{{ else }}{{ .Values.model.mountPath }}{{ end }}
{{- end }}

{{/* Serve ----------------------------------------------------------------------------- */}}

{{/* `args` of the Serve application: a replicas.config.ReplicaConfig. */}}
{{- define "nld.replicaArgs" -}}
{{- $v := .Values }}
{{- $modelPath := include "nld.modelPath" . }}
{{- $lora := "" }}
{{- if and $v.model.lora.enabled $v.model.lora.subfolder }}
{{- $lora = printf "%s/%s" $modelPath (trimAll "/" $v.model.lora.subfolder) }}
{{- end }}
{{- $args := dict "model_path" $modelPath "model_name" $v.model.name "use_lora" $v.model.lora.enabled "device" $v.replicas.serve.device "dtype" $v.replicas.serve.dtype "engine" $v.replicas.engine }}
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
{{- $_ := set $dep "num_replicas" $s.numReplicas }}
{{- end }}
{{- $app := dict "name" $s.applicationName "route_prefix" "/" "import_path" $s.importPath "args" (include "nld.replicaArgs" . | fromYaml) "deployments" (list $dep) }}
{{- $cfg := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" $s.port) "applications" (list $app) }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Capacity check: the replicas Serve must start (num_replicas, or autoscaling min_replicas) need
GPUs on the worker pods that can exist; otherwise the RayService never becomes ready.
*/}}
{{- define "nld.checkCapacity" -}}
{{- $v := .Values }}
{{- $w := $v.replicas.workers }}
{{- $minReplicas := $v.replicas.serve.numReplicas }}
{{- if $v.policy.autoscaling }}{{ $minReplicas = $v.policy.autoscaling.min_replicas | default 1 }}{{ end }}
{{- $pods := $w.replicas }}
{{- if $v.replicas.autoscaler.enabled }}{{ $pods = $w.maxReplicas }}{{ end }}
{{- $gpus := mul $pods $w.gpusPerWorker }}
{{- if and (gt (float64 $v.replicas.serve.numGpus) 0.0) (gt (mulf (float64 $minReplicas) (float64 $v.replicas.serve.numGpus)) (float64 $gpus)) }}
{{- fail (printf "replicas: %v replicas x %v GPUs (replicas.serve.numGpus) need more GPUs than the %d worker pods x %d GPUs (replicas.workers) provide; add workers or enable replicas.autoscaler" $minReplicas $v.replicas.serve.numGpus (int $pods) (int $w.gpusPerWorker)) }}
{{- end }}
{{- if $v.replicas.autoscaler.enabled }}
{{- if or (gt (int $w.minReplicas) (int $w.replicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "replicas.workers: need minReplicas (%d) <= replicas (%d) <= maxReplicas (%d)" (int $w.minReplicas) (int $w.replicas) (int $w.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if $v.policy.autoscaling }}
{{- if gt (int ($v.policy.autoscaling.min_replicas | default 1)) (int ($v.policy.autoscaling.max_replicas | default 1)) }}
{{- fail (printf "policy.autoscaling: min_replicas (%v) must not exceed max_replicas (%v)" $v.policy.autoscaling.min_replicas $v.policy.autoscaling.max_replicas) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Policy ---------------------------------------------------------------------------- */}}

{{/* The policy YAML: `.Values.policy` verbatim, Prometheus signals defaulting their `url`. */}}
{{- define "nld.policyYaml" -}}
{{- $policy := deepCopy .Values.policy }}
{{- if hasKey $policy "signals" }}
{{- $signals := list }}
{{- range $i, $sig := $policy.signals }}
{{- $sig = deepCopy $sig }}
{{- if and (eq (toString $sig.source) "prometheus") (not $sig.url) }}
{{- if not $.Values.monitoring.prometheus.url }}
{{- fail (printf "policy.signals[%d] (%s) reads Prometheus but has no url and monitoring.prometheus.url is empty" $i (toString $sig.name)) }}
{{- end }}
{{- $_ := set $sig "url" $.Values.monitoring.prometheus.url }}
{{- end }}
{{- $signals = append $signals $sig }}
{{- end }}
{{- $_ := set $policy "signals" $signals }}
{{- end }}
{{- toYaml $policy }}
{{- end }}

{{/* Ray pods -------------------------------------------------------------------------- */}}

{{- define "nld.rayEnv" -}}
- name: RAY_metrics_report_interval_ms
  value: {{ .Values.replicas.metricsReportIntervalMs | int | quote }}
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: HF_HOME
  value: /tmp/hf
- name: TRITON_CACHE_DIR
  value: /tmp/triton
- name: TORCHINDUCTOR_CACHE_DIR
  value: /tmp/torchinductor
{{- with .Values.replicas.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes of a Ray pod; call with (dict "root" $ "mountModel" bool). */}}
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
{{- if eq $v.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $v.model.pvc.claimName }}
    readOnly: true
{{- else }}
- name: model
{{- if $v.model.download.cache.claimName }}
  persistentVolumeClaim:
    claimName: {{ $v.model.download.cache.claimName }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $v.model.download.cache.sizeLimit }}
{{- end }}
{{- if $v.model.download.tokenSecret.name }}
- name: hf-token
  secret:
    secretName: {{ $v.model.download.tokenSecret.name }}
    defaultMode: 0400
    items:
      - key: {{ $v.model.download.tokenSecret.key }}
        path: token
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volume mounts of a Ray container; call with (dict "root" $ "mountModel" bool). */}}
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
{{- end }}

{{/* The model download init container (model.source: download). */}}
{{- define "nld.downloadInitContainer" -}}
{{- $v := .Values }}
{{- $d := $v.model.download -}}
- name: download-model
  image: {{ include "nld.image" (dict "image" $v.replicas.image "root" .) }}
  imagePullPolicy: {{ $v.replicas.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import json, os
      from huggingface_hub import snapshot_download
      patterns = json.loads(os.environ["NLD_ALLOW_PATTERNS"]) or None
      path = snapshot_download(repo_id=os.environ["NLD_MODEL_REPO"], revision=os.environ["NLD_MODEL_REVISION"],
                               local_dir=os.environ["NLD_MODEL_DIR"], allow_patterns=patterns)
      print("model ready in", path, flush=True)
  env:
    - name: NLD_MODEL_REPO
      value: {{ $d.repo | quote }}
    - name: NLD_MODEL_REVISION
      value: {{ $d.revision | quote }}
    - name: NLD_MODEL_DIR
      value: {{ include "nld.modelPath" . | quote }}
    - name: NLD_ALLOW_PATTERNS
      value: {{ $d.allowPatterns | toJson | quote }}
    - name: HF_HOME
      value: /tmp/hf
    - name: HF_HUB_DISABLE_TELEMETRY
      value: "1"
    {{- if $d.tokenSecret.name }}
    - name: HF_TOKEN_PATH
      value: /var/run/secrets/nld/hf-token/token
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
