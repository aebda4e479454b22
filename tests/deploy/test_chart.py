"""The Helm chart, rendered offline with the Helm v4 engine for every `ci/*-values.yaml` scenario:
lint, Kubernetes 1.30 schemas, the KubeRay CRD, Ray Serve's config schema and the project's own
config models, the policy, the values schema, and what each scenario must produce."""

from __future__ import annotations

import base64
import copy
import importlib
import json
import re
import tomllib

import jsonschema
import kubernetes_validate
import pytest
import yaml

from . import chart as C

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(params=C.SCENARIOS)
def scenario(request):
    return request.param


def test_scenarios_cover_the_issue():
    assert {"defaults", "gpu-autoscaling", "auth-existing-secret", "monitoring", "ingress", "download", "production",
            "incremental-upgrade"} <= set(C.SCENARIOS)


def test_chart_metadata_matches_the_project():
    meta = yaml.safe_load((C.CHART_DIR / "Chart.yaml").read_text())
    project = tomllib.loads((C.REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert meta["apiVersion"] == "v2" and meta["name"] == "nld-gateway" and meta["type"] == "application"
    assert meta["appVersion"] == project["version"], "Chart.yaml appVersion must be the project version"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])


# --- helm lint --strict ------------------------------------------------------------------------


def test_helm_lint_strict(scenario):
    report = C.helm().lint(str(C.CHART_DIR), C.scenario_values(scenario), strict=True,
                           namespace=C.NAMESPACE, kube_version=f"v{C.KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error; 1 is info
    assert not report["errors"] and not problems, json.dumps(report, indent=2)


# --- Kubernetes 1.30 and the KubeRay CRD ------------------------------------------------------


def test_core_objects_valid_for_kubernetes_1_30(scenario):
    _, objs = C.render_scenario(scenario)
    kinds = {o["kind"] for o in objs}
    assert kinds <= C.CORE_KINDS | C.CUSTOM_KINDS, f"unexpected kinds {kinds - C.CORE_KINDS - C.CUSTOM_KINDS}"
    for obj in objs:
        if obj["kind"] in C.CORE_KINDS:
            try:
                kubernetes_validate.validate(obj, C.KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        meta = obj["metadata"]
        assert meta.get("namespace") in (C.NAMESPACE, "monitoring"), f"{obj['kind']} lacks an explicit namespace"
        assert len(meta["name"]) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"])
        assert meta["labels"]["app.kubernetes.io/instance"] == C.RELEASE


def test_ray_pod_templates_valid_for_kubernetes_1_30(scenario):
    """The head and worker pod templates are validated as core Pods too (stricter than the CRD)."""
    _, objs = C.render_scenario(scenario)
    for group, template in C.ray_pod_templates(C.one(objs, "RayService")).items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ray-{group}", **template["metadata"]},
               "spec": template["spec"]}
        try:
            kubernetes_validate.validate(pod, C.KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{group}: {'.'.join(map(str, e.path))}: {e.message}")


def test_rayservice_valid_against_the_kuberay_crd(scenario):
    _, objs = C.render_scenario(scenario)
    rayservice = C.one(objs, "RayService")
    assert rayservice["apiVersion"] == "ray.io/v1"
    errors = sorted(jsonschema.Draft7Validator(C.rayservice_schema()).iter_errors(rayservice), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_the_strict_crd_schema_rejects_unknown_fields():
    _, objs = C.render_scenario("defaults")
    bad = copy.deepcopy(C.one(objs, "RayService"))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["gpus"] = 1
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    messages = [e.message for e in jsonschema.Draft7Validator(C.rayservice_schema()).iter_errors(bad)]
    assert any("'gpus' was unexpected" in m for m in messages) and any("is not of type 'string'" in m for m in messages)


# --- serveConfigV2: Ray Serve's schema and the project's builder and config ----------------------


def _unknown_keys(data: dict, model) -> set[str]:
    return set(data) - set(model.model_fields)


def test_serve_config_parses_with_ray_serve_schema(scenario):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    _, objs = C.render_scenario(scenario)
    raw = C.serve_config(objs)
    ServeDeploySchema.model_validate(raw)
    # Serve's models ignore unknown keys; a misspelt option would silently do nothing, so check them.
    assert not _unknown_keys(raw, ServeDeploySchema)
    assert not _unknown_keys(raw["http_options"], HTTPOptionsSchema)
    (app,) = raw["applications"]
    assert not _unknown_keys(app, ServeApplicationSchema)
    assert app["route_prefix"] == "/" and app["import_path"] == "replicas.app:build_app"
    (dep,) = app["deployments"]
    assert dep["name"] == "NLDReplica"
    assert not _unknown_keys(dep, DeploymentSchema)
    assert not _unknown_keys(dep["ray_actor_options"], RayActorOptionsSchema)
    RayActorOptionsSchema.model_validate(dep["ray_actor_options"])
    if "autoscaling_config" in dep:
        assert not _unknown_keys(dep["autoscaling_config"], AutoscalingConfig)
        AutoscalingConfig.model_validate(dep["autoscaling_config"])
        assert "num_replicas" not in dep
    else:
        assert dep["num_replicas"] >= 1


def test_serve_import_path_resolves_to_the_project_builder(scenario):
    """`import_path` names `replicas.app:build_app`, which Ray Serve calls with `args` (a
    ReplicaConfig) the way it does on the cluster, and the deployment options are ones
    `serve.deployment` accepts."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from replicas.config import ReplicaConfig

    _, objs = C.render_scenario(scenario)
    (app,) = C.serve_config(objs)["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    assert builder is importlib.import_module("replicas.app").build_app
    config = ReplicaConfig.model_validate(app["args"])
    assert config.model_path.startswith("/models")
    application = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    assert isinstance(application, serve.Application)
    (dep,) = app["deployments"]
    options = {k: v for k, v in dep.items() if k != "name"}
    serve.deployment(name=dep["name"], **options)(type("Probe", (), {}))  # raises on a bad option


def test_replica_args_follow_the_values():
    _, objs = C.render_scenario("download")
    values = C.merged_values("download")
    (app,) = C.serve_config(objs)["applications"]
    args = app["args"]
    assert args["model_path"] == "/models/nemotron-labs-diffusion-8b"
    assert args["lora_path"] == "/models/nemotron-labs-diffusion-8b/linear_spec_lora"
    assert args["use_lora"] is True and args["device"] == "cuda" and args["dtype"] == "bfloat16"
    assert args["engine"] == values["replicas"]["engine"]
    assert args["model_name"] == values["model"]["name"]
    (dep,) = app["deployments"]
    assert dep["ray_actor_options"]["num_gpus"] == values["replicas"]["serve"]["numGpus"]


# --- the policy ConfigMap ------------------------------------------------------------------------


def _policy_text(objs) -> str:
    return C.one(objs, "ConfigMap", "-policy")["data"]["policy.yaml"]


RAY_SELECTOR = f'{{namespace="{C.NAMESPACE}",app_kubernetes_io_instance="{C.RELEASE}"}}'
PRESETS = C.REPO_ROOT / "policies" / "presets"
CHART_PRESETS = C.CHART_DIR / "files" / "policies"


def _gateway_args(objs):
    from gateway.cli import build_parser

    pod = C.one(objs, "Deployment")["spec"]["template"]["spec"]
    return build_parser().parse_args(_container(pod, "gateway")["args"])


def test_the_charts_presets_are_the_repositorys_byte_for_byte():
    """Helm reads files inside the chart only: its copy of policies/presets/ must not drift."""
    ours = {p.name: p.read_bytes() for p in sorted(CHART_PRESETS.glob("*.yaml"))}
    theirs = {p.name: p.read_bytes() for p in sorted(PRESETS.glob("*.yaml"))}
    assert ours.keys() == theirs.keys() and "cluster.yaml" in ours
    assert ours == theirs, "copy policies/presets/*.yaml to deploy/helm/nld-gateway/files/policies/"
    schema = json.loads((C.CHART_DIR / "values.schema.json").read_text())
    assert sorted(schema["properties"]["policy"]["properties"]["preset"]["enum"]) == sorted(
        p.removesuffix(".yaml") for p in theirs)


def test_policy_configmap_is_the_preset_file_as_is(scenario):
    """The policy file is the chosen preset, byte for byte (never templated); Serve's autoscaling
    is `policy.autoscaling` from the values, in the RayService."""
    _, objs = C.render_scenario(scenario)
    values = C.merged_values(scenario)
    assert _policy_text(objs) == (PRESETS / f"{values['policy']['preset']}.yaml").read_text()
    (dep,) = C.serve_config(objs)["applications"][0]["deployments"]
    assert dep.get("autoscaling_config") == values["policy"].get("autoscaling")


@pytest.mark.parametrize("preset", ["cluster", "adaptive", "static", "latency", "throughput"])
def test_every_preset_mounts_as_is(preset):
    objs = C.objects(C.render({"policy": {"preset": preset}}))
    assert _policy_text(objs) == (PRESETS / f"{preset}.yaml").read_text()


def test_a_users_policy_file_replaces_the_preset():
    mine = "signals: [{name: x, source: local}]\nmode: {signal: x, enter_loaded_above: 3, leave_loaded_below: 1}\n"
    objs = C.objects(C.render({"policy": {"preset": "latency", "file": mine}}))
    assert _policy_text(objs) == mine


def test_policy_configmap_validates_and_resolves_with_the_gateways_flags(scenario):
    """What the gateway runs: the mounted file, its placeholders filled from the container's
    flags (`--prometheus-url`, `--ray-selector`): this Prometheus and this release's series."""
    from gateway.cli import policy_spec
    from policies.schema import parse_policy

    _, objs = C.render_scenario(scenario)
    values = C.merged_values(scenario)
    spec = parse_policy(_policy_text(objs))  # raises PolicyFileError with field paths
    assert spec.mode.enter_loaded_above > spec.mode.leave_loaded_below
    ns = _gateway_args(objs)
    if values["gateway"]["policy"]["source"] == "fixed":
        return
    resolved = spec.resolved(policy_spec(ns).ports)
    prom = [s for s in resolved.signals if s.source == "prometheus"]
    assert {s.name for s in prom} == {"fleet_concurrency", "replicas"}
    assert all(s.url == values["monitoring"]["prometheus"]["url"] for s in prom)
    assert all(f"ray_nld_replica_num_requests_running{RAY_SELECTOR}" in s.query for s in prom)


def test_a_policy_change_rolls_the_gateway():
    def checksum(values):
        objs = C.objects(C.render(values))
        return C.one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/policy"]

    base = checksum({})
    assert checksum({}) == base
    assert checksum({"policy": {"preset": "latency"}}) != base
    mine = (PRESETS / "cluster.yaml").read_text().replace("enter_loaded_above: 8", "enter_loaded_above: 12")
    assert checksum({"policy": {"file": mine}}) != base
    assert checksum({"monitoring": {"prometheus": {"url": "http://prom.example:9090"}}}) != base


def test_without_policy_autoscaling_the_replica_count_is_fixed():
    objs = C.objects(C.render({"policy": {"autoscaling": None}, "replicas": {"serve": {"numReplicas": 1}}}))
    (dep,) = C.serve_config(objs)["applications"][0]["deployments"]
    assert dep["num_replicas"] == 1 and "autoscaling_config" not in dep


# --- values.schema.json and the chart's own checks ---------------------------------------------

BAD_VALUES = [
    ({"replicas": {"workers": {"replicas": "two"}}}, "at '/replicas/workers/replicas': got string, want integer"),
    ({"gateway": {"replicaCont": 3}}, "at '/gateway': additional properties 'replicaCont' not allowed"),
    ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
    ({"model": {"source": "s3"}}, "at '/model/source': value must be one of 'pvc', 'download'"),
    ({"model": {"pvc": {"claimName": ""}}}, "at '/model/pvc/claimName'"),
    ({"model": {"mountPath": "models"}}, "at '/model/mountPath'"),
    ({"replicas": {"serve": {"device": "tpu"}}}, "at '/replicas/serve/device': value must be one of 'cpu', 'cuda'"),
    ({"replicas": {"serve": {"numGpus": -1}}}, "at '/replicas/serve/numGpus'"),
    ({"replicas": {"serve": {"ingress": "nginx"}}}, "at '/replicas/serve/ingress': value must be one of 'haproxy', 'proxy'"),
    ({"replicas": {"serve": {"haproxy": {"threads": 0}}}}, "at '/replicas/serve/haproxy/threads'"),
    ({"replicas": {"serve": {"importPath": "replicas app"}}}, "at '/replicas/serve/importPath'"),
    ({"replicas": {"engine": {"max_batch_size": 0}}}, "at '/replicas/engine/max_batch_size'"),
    ({"replicas": {"engine": {"max_batch": 8}}}, "at '/replicas/engine': additional properties 'max_batch' not allowed"),
    ({"replicas": {"workers": {"resources": {"limits": {"memory": "lots"}}}}}, "at '/replicas/workers/resources/limits/memory'"),
    ({"gateway": {"image": {"digest": "latest"}}}, "at '/gateway/image/digest'"),
    ({"gateway": {"service": {"type": "External"}}}, "at '/gateway/service/type'"),
    ({"gateway": {"ingress": {"enabled": True, "hosts": []}}}, "at '/gateway/ingress/hosts'"),
    ({"auth": {"enabled": "yes"}}, "at '/auth/enabled': got string, want boolean"),
    ({"auth": {"apiKeys": {"team a": "key"}}}, "at '/auth/apiKeys': additional properties 'team a' not allowed"),
    ({"policy": {"autoscaling": {"min_replica": 1}}}, "additional properties 'min_replica' not allowed"),
    ({"policy": {"rules": []}}, "at '/policy': additional properties 'rules' not allowed"),
    ({"monitoring": {"podMonitor": {"interval": "5 seconds"}}}, "at '/monitoring/podMonitor/interval'"),
    ({"replicas": {"workers": {"runtimeClassName": "NVIDIA runtime"}}}, "at '/replicas/workers/runtimeClassName'"),
    ({"replicas": {"workers": {"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "Always"}}}},
     "at '/replicas/workers/podDisruptionBudget/unhealthyPodEvictionPolicy'"),
    ({"gateway": {"podDisruptionBudget": {"unhealthyPodEvictionPolicy": "Never"}}},
     "at '/gateway/podDisruptionBudget/unhealthyPodEvictionPolicy'"),
    ({"replicas": {"upgradeStrategy": {"type": "Rolling"}}}, "at '/replicas/upgradeStrategy/type'"),
    ({"replicas": {"workers": {"terminationGracePeriodSeconds": "1m"}}}, "at '/replicas/workers/terminationGracePeriodSeconds'"),
    ({"replicas": {"workers": {"extraVolumeMounts": [{"name": "x"}]}}}, "at '/replicas/workers/extraVolumeMounts/0'"),
    ({"replicas": {"head": {"extraContainers": [{"name": "sidecar"}]}}}, "at '/replicas/head/extraContainers/0'"),
    ({"replicas": {"gcsFaultTolerance": {"redisAddress": "redis"}}}, "at '/replicas/gcsFaultTolerance/redisAddress'"),
    ({"model": {"download": {"storage": "s3"}}}, "at '/model/download/storage'"),
    ({"model": {"download": {"pvc": {"accessModes": ["ReadWriteAll"]}}}}, "at '/model/download/pvc/accessModes/0'"),
    ({"gateway": {"image": {"registry": "https://ghcr.io"}}}, "at '/gateway/image/registry'"),
    ({"monitoring": {"prometheusRule": {"errorRateThreshold": 5}}}, "at '/monitoring/prometheusRule/errorRateThreshold'"),
    ({"networkPolicy": {"metricsFrom": [{"namespace": "monitoring"}]}}, "additional properties 'namespace' not allowed"),
    ({"gateway": {"packAr": -1}}, "at '/gateway/packAr'"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[json.dumps(v)[:60] for v, _ in BAD_VALUES])
def test_values_violating_the_schema_fail_to_render_with_a_clear_message(override, message):
    helm = C.helm()
    with pytest.raises(helm.HelmValuesError) as info:
        C.render(override)
    text = str(info.value)
    assert "values don't meet the specifications of the schema" in text and message in text, text
    report = C.helm().lint(str(C.CHART_DIR), override, strict=True)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


BAD_COMBINATIONS = [
    ({"policy": {"autoscaling": {"min_replicas": 3, "max_replicas": 3}}},
     "replicas: 3 replicas x 1 GPUs (replicas.serve.numGpus) need more GPUs than the 1 worker pods x 1 GPUs"),
    ({"policy": {"autoscaling": {"min_replicas": 2, "max_replicas": 1}}, "replicas": {"workers": {"replicas": 2}}},
     "policy.autoscaling: min_replicas (2) must not exceed max_replicas (1)"),
    ({"replicas": {"autoscaler": {"enabled": True}, "workers": {"replicas": 1, "minReplicas": 2, "maxReplicas": 4}}},
     "replicas.workers: need minReplicas (2) <= replicas (1) <= maxReplicas (4)"),
    ({"gateway": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
     "gateway.autoscaling: minReplicas (5) must not exceed maxReplicas (2)"),
    ({"monitoring": {"prometheus": {"url": ""}}},
     "the policy file reads Prometheus ({prometheus_url}) but monitoring.prometheus.url is empty"),
    ({"policy": {"file": "- just\n- a list\n"}}, "policy.file is not a YAML mapping"),
    ({"replicas": {"serve": {"numReplicas": 2}, "workers": {"replicas": 2}}, "policy": {"autoscaling": {"max_replicas": 2}}},
     "replicas.serve.numReplicas and policy.autoscaling are both set: the Serve replica count has one source"),
    ({"replicas": {"workers": {"terminationGracePeriodSeconds": 30}}},
     "replicas.workers.terminationGracePeriodSeconds (30) is shorter than replicas.serve.gracefulShutdownTimeoutS (60)"),
    ({"replicas": {"head": {"terminationGracePeriodSeconds": 10}}},
     "replicas.head.terminationGracePeriodSeconds (10) is shorter than replicas.serve.gracefulShutdownTimeoutS (60)"),
    ({"replicas": {"serve": {"gracefulShutdownTimeoutS": 30}}},
     "replicas.serve.gracefulShutdownTimeoutS (30) must be at least replicas.serve.haproxy.drainSeconds + 5 (35)"),
    ({"replicas": {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}}},
     "replicas.upgradeStrategy NewClusterWithIncrementalUpgrade needs replicas.autoscaler.enabled"),
    ({"replicas": {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}, "autoscaler": {"enabled": True}}},
     "replicas.upgradeStrategy.clusterUpgradeOptions.gatewayClassName is required"),
    ({"replicas": {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade",
                                       "clusterUpgradeOptions": {"gatewayClassName": "istio"}},
                   "autoscaler": {"enabled": True}}},
     "set gateway.replicaUrl to that Gateway's address"),
    ({"replicas": {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade",
                                       "clusterUpgradeOptions": {"gatewayClassName": "istio"}},
                   "autoscaler": {"enabled": True}}, "gateway": {"replicaUrl": "http://gw:8000"}},
     "set gateway.replicaRouting to ingress"),
    ({"replicas": {"gcsFaultTolerance": {"enabled": True}}},
     "replicas.gcsFaultTolerance.enabled needs replicas.gcsFaultTolerance.redisAddress"),
]


@pytest.mark.parametrize("override,message", BAD_COMBINATIONS, ids=[m.split(":")[0] for _, m in BAD_COMBINATIONS])
def test_inconsistent_values_fail_to_render_with_a_clear_message(override, message):
    with pytest.raises(C.helm().HelmRenderError) as info:
        C.render(override)
    assert message in str(info.value), str(info.value)


def test_values_schema_matches_the_project_models():
    from ray.serve.config import AutoscalingConfig

    from replicas.config import EngineLimits, ReplicaConfig

    schema = json.loads((C.CHART_DIR / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    replicas = schema["properties"]["replicas"]["properties"]
    assert set(replicas["engine"]["properties"]) == set(EngineLimits.model_fields)
    serve = replicas["serve"]["properties"]
    assert set(serve["device"]["enum"]) == set(ReplicaConfig.model_fields["device"].annotation.__args__)
    assert set(serve["dtype"]["enum"]) == set(ReplicaConfig.model_fields["dtype"].annotation.__args__)
    autoscaling = schema["properties"]["policy"]["properties"]["autoscaling"]["oneOf"][1]["properties"]
    assert set(autoscaling) <= set(AutoscalingConfig.model_fields)
    defaults = yaml.safe_load((C.CHART_DIR / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    EngineLimits.model_validate(defaults["replicas"]["engine"])


# --- what each scenario produces --------------------------------------------------------------


def _container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def test_defaults_are_secure_and_request_one_gpu_per_replica():
    rendered, objs = C.render_scenario("defaults")
    rayservice = C.one(objs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0" and cluster["enableInTreeAutoscaling"] is False
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 1
    worker = _container(group["template"]["spec"], "ray-worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (dep,) = C.serve_config(objs)["applications"][0]["deployments"]
    assert dep["ray_actor_options"]["num_gpus"] == 1
    assert dep["max_ongoing_requests"] > C.merged_values("defaults")["replicas"]["engine"]["max_batch_size"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["metrics-export-port"] == "8080"
    assert group["rayStartParams"]["metrics-export-port"] == "8080"
    for template in C.ray_pod_templates(rayservice).values():
        spec = template["spec"]
        (ray,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert env["RAY_metrics_report_interval_ms"] == "500"
        assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in ray["ports"]
        mounts = {m["mountPath"]: m for m in ray["volumeMounts"]}
        assert "/dev/shm" in mounts
        shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert ray["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert ray["securityContext"]["allowPrivilegeEscalation"] is False
    # the model: the PVC, read-only, on the workers
    model = next(v for v in group["template"]["spec"]["volumes"] if v["name"] == "model")
    assert model["persistentVolumeClaim"] == {"claimName": "nld-model", "readOnly": True}
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in worker["volumeMounts"]
    assert "initContainers" not in group["template"]["spec"]
    # the gateway
    deployment = C.one(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    gateway = _container(pod, "gateway")
    sc = gateway["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 10000 and pod["automountServiceAccountToken"] is False
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gateway["resources"]["requests"]["cpu"] and gateway["resources"]["requests"]["memory"]
    args = gateway["args"]
    assert args[0] == "serve"
    assert args[args.index("--replica-url") + 1] == f"http://{rayservice['metadata']['name']}-serve-svc.{C.NAMESPACE}.svc:8000"
    assert args[args.index("--policy") + 1] == "/etc/nld/policy/policy.yaml"  # the adaptive YAML policy
    assert args[args.index("--api-key-file") + 1] == "/etc/nld/api-keys"
    assert args[args.index("--model-name") + 1] == "nld"
    assert pod["serviceAccountName"] == C.one(objs, "ServiceAccount", "-gateway")["metadata"]["name"]
    # auth on by default: a chart-created Secret with one generated key
    secret = C.one(objs, "Secret")
    assert list(secret["data"]) == ["generated"]
    assert next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == secret["metadata"]["name"]
    assert not C.find(objs, "Ingress") and not C.find(objs, "HorizontalPodAutoscaler")
    assert not C.find(objs, "ServiceMonitor") and not C.find(objs, "PodMonitor")
    pdb = C.one(objs, "PodDisruptionBudget", "-gateway")["spec"]
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    notes = rendered[f"{C.CHART_DIR.name}/templates/NOTES.txt"]
    assert "port-forward svc/" in notes and "/v1/nld/policy" in notes and "jsonpath='{.data.generated}'" in notes


def test_gateway_args_parse_with_the_gateway_cli(scenario):
    """The container runs `nld-gateway <args>`: the rendered args must be ones `gateway.cli` accepts."""
    from gateway.cli import build_parser

    _, objs = C.render_scenario(scenario)
    values = C.merged_values(scenario)
    pod = C.one(objs, "Deployment")["spec"]["template"]["spec"]
    ns = build_parser().parse_args(_container(pod, "gateway")["args"])
    assert ns.command == "serve" and ns.host == "0.0.0.0" and ns.port == values["gateway"]["port"]
    assert ns.metrics_port == values["gateway"]["metricsPort"] != ns.port
    serve_svc = f"http://{C.one(objs, 'RayService')['metadata']['name']}-serve-svc.{C.NAMESPACE}.svc:8000"
    assert ns.replica_url == (values["gateway"]["replicaUrl"] or serve_svc)
    assert ns.model_name == values["model"]["name"]
    assert (ns.api_key_file is not None) == values["auth"]["enabled"]
    if values["auth"]["enabled"]:
        assert ns.key_reload_interval == values["gateway"]["keyReloadIntervalSeconds"]
    if values["gateway"]["policy"]["source"] == "fixed":
        assert ns.mode == values["gateway"]["policy"]["fixedMode"]
        policy_file = yaml.safe_load((PRESETS / f"{values['policy']['preset']}.yaml").read_text())
        assert ns.client_override == policy_file["mode"]["client_override"]
    else:
        assert ns.policy == "/etc/nld/policy/policy.yaml"


def test_fixed_policy_source_passes_mode_flags():
    objs = C.objects(C.render({"gateway": {"policy": {"source": "fixed"}}}))
    args = _container(C.one(objs, "Deployment")["spec"]["template"]["spec"], "gateway")["args"]
    assert args[args.index("--mode") + 1] == "self_spec" and args[args.index("--client-override") + 1] == "allow"
    assert "--policy" not in args


def test_policy_file_source_passes_the_policy_configmap():
    objs = C.objects(C.render({"gateway": {"policy": {"source": "file"}}}))
    pod = C.one(objs, "Deployment")["spec"]["template"]["spec"]
    args = _container(pod, "gateway")["args"]
    assert args[args.index("--policy") + 1] == "/etc/nld/policy/policy.yaml" and "--mode" not in args
    volume = next(v for v in pod["volumes"] if v["name"] == "policy")
    assert volume["configMap"]["name"] == C.one(objs, "ConfigMap", "-policy")["metadata"]["name"]
    assert {"name": "policy", "mountPath": "/etc/nld/policy", "readOnly": True} in _container(pod, "gateway")["volumeMounts"]


def test_network_policy_lets_only_the_gateway_reach_the_serve_port(scenario):
    _, objs = C.render_scenario(scenario)
    ray_policy = C.one(objs, "NetworkPolicy", "-ray")
    gateway_labels = C.one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    ray_labels = ray_policy["spec"]["podSelector"]["matchLabels"]
    for template in C.ray_pod_templates(C.one(objs, "RayService")).values():
        assert ray_labels.items() <= template["metadata"]["labels"].items()
    assert ray_policy["spec"]["policyTypes"] == ["Ingress"]
    serve_port = 8000
    reaching = []
    for rule in ray_policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if not ports or serve_port in ports:
            reaching.append(rule["from"])
    # Ray's own pods (all ports, Ray's internal traffic), the gateway pods and the peers named in
    # networkPolicy.serveFrom (an incremental upgrade's Gateway data plane), nothing else.
    expected = [[{"podSelector": {"matchLabels": labels}}] for labels in (ray_labels, gateway_labels)]
    if C.merged_values(scenario)["networkPolicy"]["serveFrom"]:
        expected.append(C.merged_values(scenario)["networkPolicy"]["serveFrom"])
    assert sorted(json.dumps(r, sort_keys=True) for r in reaching) == sorted(json.dumps(e, sort_keys=True) for e in expected)


@pytest.mark.parametrize("routing, ingress", [("direct", "haproxy"), ("ingress", "haproxy"), ("direct", "proxy")])
def test_direct_routes_reach_the_replicas_own_ports_only_from_the_gateway(routing, ingress):
    """`gateway.replicaRouting: direct` behind HAProxy: the gateway gets `--replica-routing direct`, the
    replicas name their own port (`advertise_address`), Ray Serve takes those ports from the chart's
    range and only the gateway's pods may reach that range; otherwise the range stays closed."""
    values = {"gateway": {"replicaRouting": routing},
              "replicas": {"serve": {"ingress": ingress, "haproxy": {"replicaPortMin": 31000, "replicaPortMax": 31500}}}}
    objs = C.objects(C.render(values))
    args = C.one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--replica-routing") + 1] == routing
    assert "--no-stream-channels" not in args  # stream channels on by default
    rayservice = C.one(objs, "RayService")
    serve_args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert serve_args["advertise_address"] is (ingress == "haproxy")
    ray_policy = C.one(objs, "NetworkPolicy", "-ray")
    ranges = [(rule["from"], p) for rule in ray_policy["spec"]["ingress"] for p in rule.get("ports", [])
              if "endPort" in p]
    if routing == "direct" and ingress == "haproxy":
        gateway_labels = C.one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
        assert ranges == [([{"podSelector": {"matchLabels": gateway_labels}}],
                           {"protocol": "TCP", "port": 31000, "endPort": 31500})]
        for template in C.ray_pod_templates(rayservice).values():
            env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
            assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == \
                ("31000", "31500")
    else:
        assert ranges == []


def test_stream_channels_can_be_turned_off():
    objs = C.objects(C.render({"gateway": {"streamChannels": False}}))
    args = C.one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-stream-channels" in args


def test_pack_ar_reaches_the_gateway_only_when_set():
    def gateway_args(values: dict) -> list[str]:
        return C.one(C.objects(C.render(values)), "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--pack-ar" not in gateway_args({})  # spread, as the gateway's default
    args = gateway_args({"gateway": {"packAr": 4}})
    assert args[args.index("--pack-ar") + 1] == "4"


def test_gpu_workers_with_two_replicas_and_autoscaling():
    _, objs = C.render_scenario("gpu-autoscaling")
    cluster = C.one(objs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 4)
    assert group["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    # KubeRay gives the autoscaler sidecar its own ServiceAccount: the head must not override it
    assert "serviceAccountName" not in cluster["headGroupSpec"]["template"]["spec"]
    (dep,) = C.serve_config(objs)["applications"][0]["deployments"]
    assert dep["autoscaling_config"]["min_replicas"] == 2 and dep["autoscaling_config"]["max_replicas"] == 4
    hpa = C.one(objs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert "replicas" not in C.one(objs, "Deployment")["spec"]


def test_auth_with_an_existing_secret():
    rendered, objs = C.render_scenario("auth-existing-secret")
    assert not C.find(objs, "Secret")
    pod = C.one(objs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "nld-api-keys" and "items" not in volume["secret"]
    args = _container(pod, "gateway")["args"]
    assert args[args.index("--api-key-file") + 1] == "/etc/nld/api-keys"
    # one entry of the Secret holding keys one per line
    objs = C.objects(C.render({"auth": {"existingSecret": "keys", "existingSecretKey": "api-keys.txt"}}))
    pod = C.one(objs, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["items"] == [{"key": "api-keys.txt", "path": "keys"}]
    args = _container(pod, "gateway")["args"]
    assert args[args.index("--api-key-file") + 1] == "/etc/nld/api-keys/keys"
    # auth off: no key file, no Secret
    objs = C.objects(C.render({"auth": {"enabled": False}}))
    assert not C.find(objs, "Secret") and "--api-key-file" not in _container(
        C.one(objs, "Deployment")["spec"]["template"]["spec"], "gateway")["args"]


def test_chart_created_api_keys_rotate_without_a_restart():
    _, objs = C.render_scenario("download")
    secret = C.one(objs, "Secret")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == C.merged_values("download")["auth"]["apiKeys"]
    # a key change updates the mounted Secret, which the gateway re-reads: the pod template
    # (hence the pods) stays the same
    rotated = C.deep_merge(C.scenario_values("download"), {"auth": {"apiKeys": {"team-a": "nld-team-a-key-rotated"}}})
    template = C.one(objs, "Deployment")["spec"]["template"]
    assert C.one(C.objects(C.render(rotated)), "Deployment")["spec"]["template"] == template
    assert not any(k.startswith("checksum/api-keys") for k in template["metadata"]["annotations"])
    args = _container(template["spec"], "gateway")["args"]
    assert args[args.index("--key-reload-interval") + 1] == "10"


def test_service_monitor_pod_monitor_and_dashboard():
    _, objs = C.render_scenario("monitoring")
    service = C.one(objs, "Service", "-gateway-metrics")
    api_service = C.one(objs, "Service", "-gateway")
    sm = C.one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # the ServiceMonitor scrapes the metrics Service's port, never the API Service
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert not sm["spec"]["selector"]["matchLabels"].items() <= api_service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics" == service["spec"]["ports"][0]["name"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics" and service["spec"]["type"] == "ClusterIP"
    gateway = _container(C.one(objs, "Deployment")["spec"]["template"]["spec"], "gateway")
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in gateway["ports"]
    assert [p["name"] for p in api_service["spec"]["ports"]] == ["http"]
    pm = C.one(objs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in pm["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    # the labels the policy's queries and the alerts select on
    assert relabel["ray_io_cluster"] == ["__meta_kubernetes_pod_label_ray_io_cluster"]
    assert relabel["app_kubernetes_io_instance"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"]
    for template in C.ray_pod_templates(C.one(objs, "RayService")).values():
        assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert "metrics" in {p["name"] for p in template["spec"]["containers"][0]["ports"]}
    dashboard_cm = C.one(objs, "ConfigMap", "-dashboard")
    assert dashboard_cm["metadata"]["namespace"] == "monitoring"
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard_cm["data"]["nld-gateway.json"]) == C.load_dashboard()
    # the policy file's {prometheus_url}: this scenario's Prometheus, passed to the gateway
    assert _gateway_args(objs).prometheus_url == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    assert "{prometheus_url}" in _policy_text(objs)


def test_ingress_on():
    rendered, objs = C.render_scenario("ingress")
    ingress = C.one(objs, "Ingress")
    service = C.one(objs, "Service", "-gateway")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "nld.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert ingress["spec"]["tls"] == [{"secretName": "nld-example-tls", "hosts": ["nld.example.com"]}]
    gateway_policy = C.one(objs, "NetworkPolicy", "-gateway")
    froms = [r.get("from") for r in gateway_policy["spec"]["ingress"]]
    assert all(froms), "with gatewayIngressFrom set, no rule may admit everyone"
    # the metrics port only from the scrapers; the API port from the ingress controller and the helm test pod
    by_port = {r["ports"][0]["port"]: r["from"] for r in gateway_policy["spec"]["ingress"]}
    assert by_port[9090] == C.merged_values("ingress")["networkPolicy"]["metricsFrom"]
    assert any(p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "helm-test"
               for p in by_port[8000])
    test_pod = C.one(objs, "Pod")
    assert test_pod["metadata"]["labels"]["app.kubernetes.io/component"] == "helm-test"
    assert "export NLD_URL=https://nld.example.com" in rendered[f"{C.CHART_DIR.name}/templates/NOTES.txt"]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_model_downloaded_once_by_a_hook_job_into_a_shared_claim():
    _, objs = C.render_scenario("download")
    claim = C.one(objs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "nld-nld-gateway-model"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["resources"]["requests"]["storage"] == "64Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    job = C.one(objs, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
    assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation"
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["activeDeadlineSeconds"] == 3600
    (download,) = pod["containers"]
    env = _env(download)
    assert env["NLD_MODEL_REPO"] == "nvidia/Nemotron-Labs-Diffusion-8B" and env["NLD_MODEL_REVISION"] == "main"
    assert env["NLD_MODEL_DIR"] == "/models/nemotron-labs-diffusion-8b"
    assert env["NLD_MODEL_ID"] == "nvidia/Nemotron-Labs-Diffusion-8B@main"
    assert env["HF_TOKEN_PATH"] == "/var/run/secrets/nld/hf-token/token"
    assert not any("valueFrom" in e for e in download["env"]), "the token is a mounted file, not an env var"
    token = next(v for v in pod["volumes"] if v["name"] == "hf-token")
    assert token["secret"]["secretName"] == "hf-token" and token["secret"]["items"] == [{"key": "token", "path": "token"}]
    assert next(v for v in pod["volumes"] if v["name"] == "model")["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"]}
    assert {"name": "model", "mountPath": "/models"} in download["volumeMounts"]  # read-write: the only writer
    assert download["securityContext"]["readOnlyRootFilesystem"] is True
    compile(download["command"][2], "download-model", "exec")
    # every worker mounts the claim read-only and waits for the marker; nobody else downloads
    cluster = C.one(objs, "RayService")["spec"]["rayClusterConfig"]
    spec = cluster["workerGroupSpecs"][0]["template"]["spec"]
    (wait,) = spec["initContainers"]
    assert wait["name"] == "wait-for-model" and wait["command"][:2] == ["sh", "-c"]
    assert _env(wait)["NLD_MODEL_ID"] == env["NLD_MODEL_ID"] and _env(wait)["NLD_MODEL_DIR"] == env["NLD_MODEL_DIR"]
    assert all(m.get("readOnly") for m in wait["volumeMounts"])
    assert next(v for v in spec["volumes"] if v["name"] == "model")["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"], "readOnly": True}
    assert not any(v["name"] == "hf-token" for v in spec["volumes"]), "workers never see the Hub token"
    worker = _container(spec, "ray-worker")
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in worker["volumeMounts"]
    assert _env(worker)["HF_HUB_OFFLINE"] == "1"  # the replicas never reach the Hub
    assert "initContainers" not in cluster["headGroupSpec"]["template"]["spec"]
    # an existing claim: no chart-created claim, the Job and the workers use it
    objs = C.objects(C.render(C.deep_merge(C.scenario_values("download"),
                                           {"model": {"download": {"pvc": {"existingClaim": "weights-rwx"}}}})))
    assert not C.find(objs, "PersistentVolumeClaim")
    assert C.one(objs, "Job")["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "weights-rwx"


def test_download_job_env_has_proxy_endpoint_and_extra_env():
    _, objs = C.render_scenario("production")
    (download,) = C.one(objs, "Job")["spec"]["template"]["spec"]["containers"]
    env = _env(download)
    assert env["HF_ENDPOINT"] == "https://hf-mirror.internal.example"
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.internal.example:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == ".svc,.cluster.local,10.0.0.0/8"
    assert "HTTP_PROXY" not in env  # not set in the values
    assert json.loads(env["NLD_ALLOW_PATTERNS"]) == ["*.json", "*.safetensors", "tokenizer*", "linear_spec_lora/*"]
    claim = C.one(objs, "PersistentVolumeClaim")
    assert claim["spec"]["storageClassName"] == "filestore-rwx" and claim["spec"]["resources"]["requests"]["storage"] == "80Gi"


def test_per_pod_download_stays_an_explicit_choice():
    rendered, objs = C.render_scenario("incremental-upgrade")
    assert not C.find(objs, "Job") and not C.find(objs, "PersistentVolumeClaim")
    spec = C.one(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    (init,) = spec["initContainers"]
    assert init["name"] == "download-model"
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    assert next(v for v in spec["volumes"] if v["name"] == "model")["emptyDir"] == {"sizeLimit": "40Gi"}
    assert "storage=perPod: every worker pod downloads the checkpoint again" in rendered[f"{C.CHART_DIR.name}/templates/NOTES.txt"]


# --- the values documentation and the dashboard --------------------------------------------------


def test_every_value_is_documented_and_the_readme_table_is_current():
    import runpy

    doc = runpy.run_path(str(C.REPO_ROOT / "deploy" / "helm" / "values_doc.py"))
    rows = doc["value_rows"](C.CHART_DIR / "values.yaml")  # raises on an undocumented key
    assert len(rows) > 100
    readme = (C.CHART_DIR / "README.md").read_text()
    assert doc["render_table"](rows) in readme, "README values table is stale: run python deploy/helm/values_doc.py"


REPLICA_METRICS = {"ray_nld_replica_running_requests", "ray_nld_replica_waiting_requests",
                   "ray_nld_replica_kv_cache_usage_ratio", "ray_nld_replica_generated_tokens_total",
                   "ray_nld_replica_forward_passes_total", "ray_nld_replica_tokens_per_forward",
                   "ray_nld_replica_accepted_length", "ray_nld_replica_time_to_first_token_seconds",
                   "ray_nld_replica_inter_token_latency_seconds"}
GATEWAY_METRICS = {"nld_gateway_requests_total", "nld_gateway_request_seconds", "nld_gateway_inflight_requests"}
POLICY_METRICS = {"nld_policy_mode", "nld_policy_switches_total", "nld_policy_signal"}


def test_dashboard_metric_names_are_in_one_place():
    dashboard = C.load_dashboard()
    names = C.dashboard_metrics(dashboard)
    assert set(names.values()) == REPLICA_METRICS | GATEWAY_METRICS | POLICY_METRICS
    used = set()
    for expr in C.dashboard_exprs(dashboard):
        assert not re.search(r"\b(ray_)?nld_\w+", expr), f"metric name outside the m_* constants: {expr}"
        refs = set(re.findall(r"\$\{(m_\w+)\}", expr))
        assert refs and refs <= set(names), expr
        used |= refs
    assert used == set(names), f"unused metric constants: {set(names) - used}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("mode", "switches", "tokens per forward", "tokens per second", "latency", "running", "waiting"):
        assert topic in titles


def test_dashboard_metrics_exist_in_the_code():
    """Replica and gateway metric names come from the code that exports them (Ray prefixes `ray_`,
    counters end in `_total`, histograms are queried through `_bucket`/`_sum`/`_count`)."""
    replica_src = (C.REPO_ROOT / "replicas" / "metrics.py").read_text()
    gateway_src = (C.REPO_ROOT / "gateway" / "metrics.py").read_text()
    for metric in REPLICA_METRICS:
        base = metric.removeprefix("ray_").removesuffix("_total")
        assert f'"{base}"' in replica_src, f"{metric}: replicas/metrics.py declares no {base!r}"
    for metric in GATEWAY_METRICS:
        base = metric.removesuffix("_total")
        assert f'"{base}"' in gateway_src, f"{metric}: gateway/metrics.py declares no {base!r}"


@pytest.mark.parametrize("ingress", ["haproxy", "proxy"])
def test_ray_pods_get_exactly_the_ingress_settings_of_replicas_ingress(ingress):
    """The chart's Ray Serve switches are those `replicas.ingress.serve_env` gives the local stack
    (one reference), with the chart's ports; `proxy` sets none (Serve's defaults)."""
    from replicas.ingress import IngressConfig, serve_env

    values = {"replicas": {"serve": {"ingress": ingress, "haproxy": {"statsPort": 18404, "metricsPort": 19101,
                                                                      "drainSeconds": 20, "threads": 3}}}}
    rayservice = C.one(C.objects(C.render(values)), "RayService")
    expected = serve_env(IngressConfig(kind=ingress, stats_port=18404, metrics_port=19101, drain_s=20,
                                       haproxy_threads=3))
    for template in C.ray_pod_templates(rayservice).values():
        (ray,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in ray["env"] if e["name"].startswith("RAY_SERVE_")}
        assert env == (expected if ingress == "haproxy" else {})
