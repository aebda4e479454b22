"""What an operator hits on the first install and the first upgrade (issue 17), and the chart's
fleet signal (issue 14): the KubeRay minimum, GPU pod settings, one Serve replica count,
upgrades that keep the Ray cluster, weights downloaded once, GCS fault tolerance and Ray auth,
drains, monitors gated on the cluster's APIs, alert rules through promtool, the policy's
PromQL in a real Prometheus, and the `helm test` pod run against a real gateway."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.version import Version

from . import chart as C

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
NOTES = f"{C.CHART_DIR.name}/templates/NOTES.txt"


def _container(pod_spec: dict, name: str) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# --- 1. the KubeRay minimum ---------------------------------------------------------------------

# RayService fields the chart may render -> the KubeRay release that added them (KubeRay's
# release notes and CRD history; the CRD in ../shared/schemas is v1.7).
KUBERAY_FEATURES = {
    "spec.rayClusterDeletionDelaySeconds": "1.5.0",
    "spec.upgradeStrategy.type": "1.3.0",
    "spec.upgradeStrategy.clusterUpgradeOptions": "1.5.1",  # NewClusterWithIncrementalUpgrade, alpha
    "spec.rayClusterConfig.workerGroupSpecs[].idleTimeoutSeconds": "1.3.0",
    "spec.rayClusterConfig.gcsFaultToleranceOptions": "1.3.0",
    "spec.rayClusterConfig.authOptions": "1.5.1",
}


def _paths(node, prefix="") -> set[str]:
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            out |= _paths(v, p)
    elif isinstance(node, list):
        for item in node:
            out |= _paths(item, prefix + "[]")
    return out


def declared_kuberay_minimum() -> Version:
    meta = yaml.safe_load((C.CHART_DIR / "Chart.yaml").read_text())
    return Version(meta["annotations"]["nld-gateway/kuberay-min-version"])


def test_declared_kuberay_minimum_covers_every_field_the_chart_renders():
    minimum = declared_kuberay_minimum()
    needed = {}
    for scenario in C.SCENARIOS:
        used = _paths(C.one(C.render_scenario(scenario)[1], "RayService"))
        for field, version in KUBERAY_FEATURES.items():
            if field in used:
                needed[field] = Version(version)
    assert {"spec.rayClusterDeletionDelaySeconds", "spec.rayClusterConfig.authOptions",
            "spec.rayClusterConfig.workerGroupSpecs[].idleTimeoutSeconds"} <= set(needed)
    assert minimum == max(needed.values()), f"Chart.yaml declares {minimum}, the rendered fields need {needed}"
    meta = yaml.safe_load((C.CHART_DIR / "Chart.yaml").read_text())
    assert f">= {minimum}" in meta["annotations"]["nld-gateway/requires"]
    readme = (C.CHART_DIR / "README.md").read_text()
    assert f"KubeRay operator](https://docs.ray.io/en/latest/cluster/kubernetes/getting-started.html)\n  >= {minimum}" in readme
    assert "1.1" not in meta["annotations"]["nld-gateway/requires"]


# --- 2. pod settings of a GPU cluster ---------------------------------------------------------------


def test_production_pod_settings_reach_the_pods():
    _, objs = C.render_scenario("production")
    rayservice = C.one(objs, "RayService")
    cluster = rayservice["spec"]["rayClusterConfig"]
    worker_tpl = cluster["workerGroupSpecs"][0]["template"]
    worker = worker_tpl["spec"]
    assert worker["runtimeClassName"] == "nvidia" and worker["priorityClassName"] == "inference-critical"
    (spread,) = worker["topologySpreadConstraints"]
    assert spread["matchLabelKeys"] == ["ray.io/cluster"]
    assert spread["labelSelector"]["matchLabels"].items() <= worker_tpl["metadata"]["labels"].items()
    assert spread["labelSelector"]["matchLabels"]["nld-gateway/ray-node"] == "worker"
    assert {"name": "nccl-topology", "configMap": {"name": "nccl-topology"}} in worker["volumes"]
    ray = _container(worker, "ray-worker")
    assert {"name": "nccl-topology", "mountPath": "/etc/nccl", "readOnly": True} in ray["volumeMounts"]
    assert ray["envFrom"] == [{"configMapRef": {"name": "nld-ray-tuning"}}]
    assert _container(worker, "dcgm-log-shipper")["image"] == "registry.internal.example/log-shipper:1.4.2"
    assert ray["resources"]["requests"]["ephemeral-storage"] == "20Gi"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["priorityClassName"] == "inference-critical" and "runtimeClassName" not in head
    assert _container(head, "ray-head")["resources"]["requests"]["ephemeral-storage"] == "10Gi"
    gateway_pod = C.one(objs, "Deployment")["spec"]["template"]["spec"]
    gateway = _container(gateway_pod, "gateway")
    assert gateway_pod["priorityClassName"] == "inference-critical"
    assert gateway["envFrom"] == [{"configMapRef": {"name": "nld-gateway-extra-env"}}]
    assert gateway["resources"]["requests"]["ephemeral-storage"] == "256Mi"
    # defaults: no runtime class, and NOTES tell when it is needed
    rendered, objs = C.render_scenario("defaults")
    worker = C.one(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "runtimeClassName" not in worker
    assert "set\n   replicas.workers.runtimeClassName (e.g. nvidia)" in rendered[NOTES]


def test_every_image_names_its_registry():
    for scenario in C.SCENARIOS:
        _, objs = C.render_scenario(scenario)
        pods = [o["spec"]["template"]["spec"] for o in objs if o["kind"] in ("Deployment", "Job")]
        pods += [o["spec"] for o in objs if o["kind"] == "Pod"]
        pods += [t["spec"] for t in C.ray_pod_templates(C.one(objs, "RayService")).values()]
        for pod in pods:
            for c in pod.get("initContainers", []) + pod["containers"]:
                host = c["image"].split("/")[0]
                assert "/" in c["image"] and ("." in host or ":" in host), f"{scenario}: {c['image']} has no registry"
    _, objs = C.render_scenario("defaults")
    assert _container(C.one(objs, "Deployment")["spec"]["template"]["spec"], "gateway")["image"] == \
        "ghcr.io/nld-gateway/nld-gateway:0.1.0"


# --- 3. one source of truth for the Serve replica count ----------------------------------------


def _serve_deployment(objs) -> dict:
    (dep,) = C.serve_config(objs)["applications"][0]["deployments"]
    return dep


def test_the_replica_count_follows_the_worker_gpus_unless_set():
    rendered = C.render({"replicas": {"workers": {"replicas": 4}}})
    assert _serve_deployment(C.objects(rendered))["num_replicas"] == 4  # 4 workers x 1 GPU / 1 GPU
    assert "WARNING" not in rendered[NOTES].split("4. Replicas and GPUs:")[1]
    rendered = C.render({"replicas": {"workers": {"replicas": 2, "gpusPerWorker": 4}, "serve": {"numGpus": 2}}})
    assert _serve_deployment(C.objects(rendered))["num_replicas"] == 4
    assert _serve_deployment(C.render_scenario("production")[1])["num_replicas"] == 4


def test_notes_warn_about_idle_gpus():
    rendered = C.render({"replicas": {"workers": {"replicas": 4}, "serve": {"numReplicas": 2}}})
    assert _serve_deployment(C.objects(rendered))["num_replicas"] == 2
    notes = rendered[NOTES]
    assert "WARNING: at most 2 Serve replica(s) x 1 GPU(s) use 2 of the 4 GPUs the worker" in notes
    assert "2 GPU(s) stay idle" in notes
    # the issue's case: autoscaling capped at one replica on four GPU workers
    rendered = C.render({"replicas": {"workers": {"replicas": 4}}, "policy": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}})
    assert "3 GPU(s) stay idle. Raise policy.autoscaling.max_replicas" in rendered[NOTES]
    # with Ray's autoscaler only the minimum worker pods always hold GPUs
    rendered, _ = C.render_scenario("gpu-autoscaling")
    assert "stay idle" not in rendered[NOTES]


# --- 4. upgrades keep the Ray cluster --------------------------------------------------------------


def _bumped_chart(tmp_path: Path, version: str, app_version: str):
    copy = tmp_path / f"chart-{version}"
    shutil.copytree(C.CHART_DIR, copy)
    meta = (copy / "Chart.yaml").read_text()
    meta = re.sub(r"(?m)^version: .*$", f"version: {version}", meta)
    meta = re.sub(r'(?m)^appVersion: .*$', f'appVersion: "{app_version}"', meta)
    (copy / "Chart.yaml").write_text(meta)
    return C.load_chart(copy)


def _ray_cluster_config_text(rendered: dict[str, str]) -> str:
    text = rendered[f"{C.CHART_DIR.name}/templates/rayservice.yaml"]
    start = text.index("\n  rayClusterConfig:\n")
    return text[start:]


@pytest.mark.parametrize("scenario", ["defaults", "production", "gpu-autoscaling"])
def test_a_chart_bump_leaves_the_ray_cluster_config_byte_identical(tmp_path, scenario):
    """KubeRay starts a new RayCluster (twice the GPUs under NewCluster) whenever the hash of
    `rayClusterConfig` changes: a new chart version and appVersion, with the images pinned, must
    leave it byte-identical (the RayService's own labels may change)."""
    values = C.deep_merge(C.scenario_values(scenario), {"replicas": {"image": {"tag": "0.1.0"}},
                                                         "gateway": {"image": {"tag": "0.1.0"}}})
    old = C.render(values, chart=C.load_chart(C.CHART_DIR))
    new = C.render(values, chart=_bumped_chart(tmp_path, "7.3.1", "9.9.9"))
    assert _ray_cluster_config_text(new) == _ray_cluster_config_text(old)
    old_rs, new_rs = C.one(C.objects(old), "RayService"), C.one(C.objects(new), "RayService")
    assert old_rs["metadata"]["labels"]["helm.sh/chart"] != new_rs["metadata"]["labels"]["helm.sh/chart"]
    assert old_rs["spec"]["rayClusterConfig"] == new_rs["spec"]["rayClusterConfig"]
    for template in C.ray_pod_templates(new_rs).values():
        labels = template["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and "app.kubernetes.io/version" not in labels
        assert "9.9.9" not in json.dumps(template)


def test_with_the_default_tag_a_new_app_version_changes_only_the_images(tmp_path):
    """Without a pinned tag the images follow appVersion: then the Ray cluster must change (new
    code), and the image is the only thing that does."""
    old = _ray_cluster_config_text(C.render(C.scenario_values("production"), chart=C.load_chart(C.CHART_DIR)))
    new = _ray_cluster_config_text(C.render(C.scenario_values("production"), chart=_bumped_chart(tmp_path, "0.2.0", "0.2.0")))
    changed = [(a, b) for a, b in zip(old.splitlines(), new.splitlines()) if a != b]
    assert len(old.splitlines()) == len(new.splitlines()) and changed
    for a, b in changed:
        assert re.fullmatch(r"\s*image: ghcr\.io/nld-gateway/nld-replica:0\.1\.0", a), a
        assert b == a.replace("0.1.0", "0.2.0")


def test_upgrade_strategy_is_exposed():
    _, objs = C.render_scenario("defaults")
    assert C.one(objs, "RayService")["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    _, objs = C.render_scenario("incremental-upgrade")
    spec = C.one(objs, "RayService")["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewClusterWithIncrementalUpgrade", "clusterUpgradeOptions": {
        "gatewayClassName": "istio", "maxSurgePercent": 25, "stepSizePercent": 25, "intervalSeconds": 60}}
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    args = _container(C.one(objs, "Deployment")["spec"]["template"]["spec"], "gateway")["args"]
    assert args[args.index("--replica-url") + 1] == C.merged_values("incremental-upgrade")["gateway"]["replicaUrl"]


# --- 5. weights downloaded once: the scripts the pods run ------------------------------------------


FAKE_HUB = '''
import json, os, pathlib
def snapshot_download(repo_id, revision, local_dir, allow_patterns=None):
    log = pathlib.Path(os.environ["FAKE_HUB_LOG"])
    log.write_text(log.read_text() + json.dumps([repo_id, revision, allow_patterns]) + "\\n" if log.exists() else
                   json.dumps([repo_id, revision, allow_patterns]) + "\\n")
    (pathlib.Path(local_dir) / "config.json").write_text("{}")
    return local_dir
'''


def _run_container(container: dict, env: dict, **kw) -> subprocess.CompletedProcess:
    merged = {**os.environ, **_env(container), **env}
    cmd = container["command"]
    cmd = [sys.executable, *cmd[1:]] if cmd[0] == "python" else cmd
    return subprocess.run(cmd, env=merged, capture_output=True, text=True, **kw)


def test_the_download_script_writes_the_ready_marker_last_and_skips_a_complete_pinned_commit(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "huggingface_hub.py").write_text(FAKE_HUB)
    log = tmp_path / "hub.log"
    target = tmp_path / "models" / "m"
    values = {"model": {"source": "download", "subPath": "m",
                        "download": {"revision": "0123456789abcdef0123456789abcdef01234567", "allowPatterns": ["*.json"]}}}
    (download,) = C.one(C.objects(C.render(values)), "Job")["spec"]["template"]["spec"]["containers"]
    env = {"PYTHONPATH": str(hub), "FAKE_HUB_LOG": str(log), "NLD_MODEL_DIR": str(target)}
    proc = _run_container(download, env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    marker = target / ".nld-ready"
    assert marker.read_text() == "nvidia/Nemotron-Labs-Diffusion-8B@0123456789abcdef0123456789abcdef01234567\n"
    assert (target / "config.json").is_file() and not (target / ".nld-ready.tmp").exists()
    assert json.loads(log.read_text()) == ["nvidia/Nemotron-Labs-Diffusion-8B", "0123456789abcdef0123456789abcdef01234567", ["*.json"]]
    # an upgrade with the same pinned commit: no Hub access at all
    proc = _run_container(download, {**env, "PYTHONPATH": str(tmp_path / "no-hub-here")}, timeout=60)
    assert proc.returncode == 0 and "already complete" in proc.stdout, proc.stderr
    # a branch is re-checked every time (it may have moved)
    (branch,) = C.one(C.objects(C.render({"model": {"source": "download", "subPath": "m"}})), "Job")[
        "spec"]["template"]["spec"]["containers"]
    proc = _run_container(branch, env, timeout=60)
    assert proc.returncode == 0 and marker.read_text() == "nvidia/Nemotron-Labs-Diffusion-8B@main\n"
    assert len(log.read_text().splitlines()) == 2


def test_workers_wait_for_the_marker_of_their_revision(tmp_path):
    values = {"model": {"source": "download", "download": {"job": {"waitPollSeconds": 1}}}}
    spec = C.one(C.objects(C.render(values)), "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    (wait,) = spec["initContainers"]
    target = tmp_path / "models"
    target.mkdir()
    env = {"NLD_MODEL_DIR": str(target)}
    with pytest.raises(subprocess.TimeoutExpired):  # no marker yet: it keeps waiting
        _run_container(wait, env, timeout=2.5)
    (target / ".nld-ready").write_text("nvidia/Nemotron-Labs-Diffusion-8B@other-revision\n")
    with pytest.raises(subprocess.TimeoutExpired):  # another revision's weights: still waiting
        _run_container(wait, env, timeout=2.5)
    (target / ".nld-ready").write_text("nvidia/Nemotron-Labs-Diffusion-8B@main\n")
    proc = _run_container(wait, env, timeout=10)
    assert proc.returncode == 0 and "is ready" in proc.stdout


# --- 6, 7. GCS fault tolerance, Ray auth, the gateway's metrics port -------------------------------


def test_gcs_fault_tolerance_and_ray_token_auth():
    _, objs = C.render_scenario("production")
    cluster = C.one(objs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis-master.redis.svc:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "password"}}}}
    assert cluster["authOptions"] == {"mode": "token"}  # on by default
    _, objs = C.render_scenario("defaults")
    cluster = C.one(objs, "RayService")["spec"]["rayClusterConfig"]
    assert "gcsFaultToleranceOptions" not in cluster and cluster["authOptions"] == {"mode": "token"}
    cluster = C.one(C.objects(C.render({"replicas": {"rayAuth": {"enabled": False}}})), "RayService")["spec"]["rayClusterConfig"]
    assert "authOptions" not in cluster
    cluster = C.one(C.objects(C.render({"replicas": {"rayAuth": {"secretName": "ray-token"}}})), "RayService")[
        "spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}


def test_the_ingress_never_routes_the_metrics_port():
    _, objs = C.render_scenario("production")
    ingress = C.one(objs, "Ingress")
    api = C.one(objs, "Service", "-gateway")
    backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": api["metadata"]["name"], "port": {"name": "http"}}]
    assert {p["name"] for p in api["spec"]["ports"]} == {"http"}
    metrics = C.one(objs, "Service", "-gateway-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and metrics["spec"]["ports"][0]["targetPort"] == "metrics"
    args = _container(C.one(objs, "Deployment")["spec"]["template"]["spec"], "gateway")["args"]
    assert args[args.index("--metrics-port") + 1] == "9090" and args[args.index("--port") + 1] == "8000"


# --- 8. drains --------------------------------------------------------------------------------------


def test_pdbs_and_termination_grace():
    _, objs = C.render_scenario("production")
    rayservice = C.one(objs, "RayService")
    workers = C.one(objs, "PodDisruptionBudget", "-ray-workers")["spec"]
    assert workers["maxUnavailable"] == 1 and workers["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    templates = C.ray_pod_templates(rayservice)
    selector = workers["selector"]["matchLabels"].items()
    assert selector <= templates["worker-gpu"]["metadata"]["labels"].items()
    assert not selector <= templates["head"]["metadata"]["labels"].items()
    shutdown = C.serve_config(objs)["applications"][0]["deployments"][0]["graceful_shutdown_timeout_s"]
    for template in templates.values():
        assert template["spec"]["terminationGracePeriodSeconds"] == shutdown + 30 >= shutdown
    assert C.one(objs, "PodDisruptionBudget", "-gateway")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    objs = C.objects(C.render({"replicas": {"workers": {"terminationGracePeriodSeconds": 600}}}))
    spec = C.one(objs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 600
    assert not C.find(C.objects(C.render({"replicas": {"workers": {"podDisruptionBudget": {"enabled": False}}}})),
                      "PodDisruptionBudget", "-ray-workers")


# --- 9. monitoring ----------------------------------------------------------------------------------

MONITOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_without_the_monitoring_crds_no_monitor_renders():
    for scenario in ("monitoring", "production"):
        rendered = C.render(C.scenario_values(scenario))  # a cluster without the prometheus-operator
        objs = C.objects(rendered)
        assert not {o["kind"] for o in objs} & MONITOR_KINDS, scenario
        assert C.one(objs, "RayService")  # the rest is there
        notes = rendered[NOTES]
        for kind in ("ServiceMonitor", "PodMonitor"):
            assert f"WARNING: monitoring asks for a {kind}, but this cluster does not serve monitoring.coreos.com/v1" in notes
    # the same values on a cluster that serves the API render every monitor, whichever form Helm lists
    for api_versions in (C.MONITORING_API_VERSIONS, ("monitoring.coreos.com/v1",)):
        objs = C.objects(C.render(C.scenario_values("production"), api_versions=api_versions))
        assert {o["kind"] for o in objs} >= MONITOR_KINDS
        for o in objs:
            if o["kind"] in MONITOR_KINDS:  # the gate checks what it renders
                assert f"{o['apiVersion']}/{o['kind']}" in C.MONITORING_API_VERSIONS
    # only the ServiceMonitor kind served: only it renders
    objs = C.objects(C.render(C.scenario_values("production"), api_versions=("monitoring.coreos.com/v1/ServiceMonitor",)))
    assert {o["kind"] for o in objs} & MONITOR_KINDS == {"ServiceMonitor"}


def _rule_groups(scenario: str = "production") -> dict:
    _, objs = C.render_scenario(scenario)
    return copy.deepcopy({"groups": C.one(objs, "PrometheusRule")["spec"]["groups"]})


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus package (apt-get install prometheus)")
    return exe


def test_alert_rules_pass_promtool_check_rules(tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(_rule_groups()))
    proc = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "SUCCESS: 5 rules found" in proc.stdout, proc.stdout + proc.stderr
    names = [r["alert"] for r in _rule_groups()["groups"][0]["rules"]]
    assert names == ["NLDReplicasMissing", "NLDGateway5xxRate", "NLDReplicaQueueDeep", "NLDReplicaKVCacheFull",
                     "NLDPolicySignalStale"]
    # control: promtool does reject a broken expression
    broken = _rule_groups()
    broken["groups"][0]["rules"][0]["expr"] += " )"
    rules.write_text(yaml.safe_dump(broken))
    assert subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True, timeout=60).returncode != 0


RAY = 'namespace="serving",app_kubernetes_io_instance="nld"'
GW = 'namespace="serving",service="nld-nld-gateway-gateway-metrics"'
ALERT_LABELS = {"release": "nld", "team": "inference"}


def _replica_series(n: int, cluster: str = "nld-nld-gateway-abcde", values: str = "2x20") -> list[dict]:
    return [{"series": f'ray_nld_replica_num_requests_running{{{RAY},ray_io_cluster="{cluster}",pod="w{i}"}}',
             "values": values} for i in range(n)]


def test_alert_rules_fire_on_synthetic_series_with_promtool_test_rules(tmp_path):
    """Each alert fires on series that should trigger it and stays silent otherwise
    (production values: 4 fixed replicas, alertLabels team=inference)."""
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(_rule_groups()))
    missing = "Only 3 NLD replicas report metrics. Check the RayService status, the worker pods (GPUs, taints, weights) and the Serve controller logs."
    tests = [
        {"interval": "1m", "input_series": _replica_series(3),  # 3 of 4 replicas report
         "alert_rule_test": [
             {"eval_time": "3m", "alertname": "NLDReplicasMissing", "exp_alerts": []},  # still pending (for: 5m)
             {"eval_time": "10m", "alertname": "NLDReplicasMissing", "exp_alerts": [{
                 "exp_labels": {**ALERT_LABELS, "severity": "critical"},
                 "exp_annotations": {"summary": "serving/nld: fewer Serve replicas than 4", "description": missing}}]},
             {"eval_time": "10m", "alertname": "NLDPolicySignalStale", "exp_alerts": []}]},
        {"interval": "1m",  # an upgrade: the old cluster keeps 2, the new one has all 4: no alert
         "input_series": _replica_series(2, "nld-nld-gateway-old00") + _replica_series(4, "nld-nld-gateway-new00"),
         "alert_rule_test": [{"eval_time": "10m", "alertname": "NLDReplicasMissing", "exp_alerts": []}]},
        {"interval": "1m",  # no series at all: the policy is blind
         "input_series": [{"series": f'ray_nld_replica_num_requests_running{{namespace="other",app_kubernetes_io_instance="x"}}',
                           "values": "1x20"}],
         "alert_rule_test": [{"eval_time": "5m", "alertname": "NLDPolicySignalStale", "exp_alerts": [{
             "exp_labels": {**ALERT_LABELS, "severity": "warning", "namespace": "serving", "app_kubernetes_io_instance": "nld"},
             "exp_annotations": {"summary": "serving/nld: the policy's load signal has no data",
                                 "description": "No ray_nld_replica_num_requests_running series of this release for 2m: the mode policy cannot see load. Check the PodMonitor, Prometheus targets and the replicas."}}]}]},
        {"interval": "1m",  # 10% of answers are 5xx; another release's errors do not count
         "input_series": [{"series": f'nld_gateway_requests_total{{{GW},mode="ar",status="200"}}', "values": "0+90x30"},
                          {"series": f'nld_gateway_requests_total{{{GW},mode="none",status="503"}}', "values": "0+10x30"},
                          {"series": 'nld_gateway_requests_total{namespace="serving",service="x-gateway-metrics",mode="ar",status="500"}',
                           "values": "0+1000x30"}],
         "alert_rule_test": [{"eval_time": "20m", "alertname": "NLDGateway5xxRate", "exp_alerts": [{
             "exp_labels": {**ALERT_LABELS, "severity": "warning"},
             "exp_annotations": {"summary": "serving/nld: more than 5% of completions fail with 5xx",
                                 "description": "10% of the gateway's completion requests answered 5xx over 5 minutes (no_replica, replica_lost, upstream_timeout...)."}}]}]},
        {"interval": "1m",  # 1% errors: below the threshold
         "input_series": [{"series": f'nld_gateway_requests_total{{{GW},mode="ar",status="200"}}', "values": "0+99x30"},
                          {"series": f'nld_gateway_requests_total{{{GW},mode="ar",status="500"}}', "values": "0+1x30"}],
         "alert_rule_test": [{"eval_time": "20m", "alertname": "NLDGateway5xxRate", "exp_alerts": []}]},
        {"interval": "1m",
         "input_series": [
             {"series": f'ray_nld_replica_waiting_requests{{{RAY},ray_io_cluster="c1",pod="w0",replica="r0"}}', "values": "100x20"},
             {"series": f'ray_nld_replica_waiting_requests{{{RAY},ray_io_cluster="c1",pod="w1",replica="r1"}}', "values": "3x20"},
             {"series": f'ray_nld_replica_kv_cache_usage_ratio{{{RAY},ray_io_cluster="c1",pod="w1",replica="r1"}}', "values": "0.99x20"},
             {"series": f'ray_nld_replica_kv_cache_usage_ratio{{{RAY},ray_io_cluster="c1",pod="w0",replica="r0"}}', "values": "0.5x20"}],
         "alert_rule_test": [
             {"eval_time": "10m", "alertname": "NLDReplicaQueueDeep", "exp_alerts": [{
                 "exp_labels": {**ALERT_LABELS, "severity": "warning", "ray_io_cluster": "c1", "pod": "w0"},
                 "exp_annotations": {"summary": "serving/nld: a replica's queue stays above 64 waiting requests",
                                     "description": "w0 has 100 requests waiting for a KV slot; beyond replicas.engine.max_waiting they get 429. Add replicas (policy.autoscaling) or KV slots."}}]},
             {"eval_time": "15m", "alertname": "NLDReplicaKVCacheFull", "exp_alerts": [{
                 "exp_labels": {**ALERT_LABELS, "severity": "warning", "ray_io_cluster": "c1", "pod": "w1"},
                 "exp_annotations": {"summary": "serving/nld: a replica's KV cache stays above 95%",
                                     "description": "w1 uses 99% of its KV cache; new requests queue."}}]}]},
    ]
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = subprocess.run([_promtool(), "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "SUCCESS" in proc.stdout, proc.stdout + proc.stderr


# --- issue 14, point 2: the fleet signal in a real Prometheus ------------------------------------

MODES = ("ar", "diffusion", "self_spec", "prefill")


def synthetic_exposition() -> str:
    """What Prometheus would hold after the chart's PodMonitor scraped the Ray pods of this
    release (namespace, app_kubernetes_io_instance and ray_io_cluster attached): the active
    cluster's 3 replicas (per-mode series and the label-free total), an upgrade's new cluster
    (3 replicas, idle), and another release with heavy load that must not count."""
    running = {"r0": {"ar": 1, "diffusion": 0, "self_spec": 3, "prefill": 0},   # 4
               "r1": {"ar": 5, "diffusion": 1, "self_spec": 1, "prefill": 1},   # 8
               "r2": {"ar": 10, "diffusion": 0, "self_spec": 0, "prefill": 2}}  # 12 -> 8 per replica
    lines = ["# TYPE ray_nld_replica_running_requests gauge", "# TYPE ray_nld_replica_num_requests_running gauge"]

    def emit(ns, release, cluster, replica, per_mode):
        base = (f'namespace="{ns}",app_kubernetes_io_instance="{release}",ray_io_cluster="{cluster}",'
                f'application="nld",deployment="NLDReplica",replica="{replica}",model="nld"')
        for mode in MODES:
            lines.append(f'ray_nld_replica_running_requests{{{base},mode="{mode}"}} {per_mode.get(mode, 0)}')
        lines.append(f"ray_nld_replica_num_requests_running{{{base}}} {sum(per_mode.values())}")

    for replica, per_mode in running.items():
        emit("serving", "nld", "nld-nld-gateway-active", replica, per_mode)
    for replica in ("n0", "n1", "n2"):
        emit("serving", "nld", "nld-nld-gateway-pending", replica, {})
    for replica in ("x0", "x1"):
        emit("other-team", "nld", "nld-nld-gateway-zzzzz", replica, {"ar": 40, "self_spec": 40})
    emit("serving", "other", "other-nld-gateway-yyyyy", "y0", {"ar": 64})
    return "\n".join(lines) + "\n"


class _Exporter(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_the_charts_fleet_signal_reads_per_replica_concurrency_in_a_real_prometheus():
    from policies.expr import compile_expression
    from policies.schema import parse_policy
    from policies.signals import PrometheusSource
    from tests.prometheus import PrometheusServer

    from gateway.cli import build_parser, policy_spec

    _, objs = C.render_scenario("monitoring")
    pod = C.one(objs, "Deployment")["spec"]["template"]["spec"]
    args = next(c for c in pod["containers"] if c["name"] == "gateway")["args"]
    # the mounted file, its placeholders filled as the gateway fills them from its flags
    ports = policy_spec(build_parser().parse_args(args)).ports
    policy = parse_policy(C.one(objs, "ConfigMap", "-policy")["data"]["policy.yaml"]).resolved(ports)
    signals = {s.name: s for s in policy.signals if s.source == "prometheus"}
    assert set(signals) == {"fleet_concurrency", "replicas"}

    _Exporter.body = synthetic_exposition().encode()
    exporter = ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    prom = PrometheusServer.start([f"127.0.0.1:{exporter.server_address[1]}"], scrape_interval_s=0.5)
    try:
        deadline = time.monotonic() + 30
        while not prom.query("ray_nld_replica_num_requests_running"):
            assert time.monotonic() < deadline, "Prometheus scraped nothing"
            time.sleep(0.2)
        # the series are there: 3 active replicas x 4 modes, and the naive query reads a quarter
        assert len(prom.query('ray_nld_replica_running_requests{ray_io_cluster="nld-nld-gateway-active"}')) == 12
        naive = prom.query('sum(ray_nld_replica_running_requests{ray_io_cluster="nld-nld-gateway-active"})'
                           ' / count(ray_nld_replica_running_requests{ray_io_cluster="nld-nld-gateway-active"})')
        assert float(naive[0]["value"][1]) == pytest.approx(2.0)  # 24 / 12 series: a quarter of 8

        async def read_all() -> dict[str, float]:
            async with httpx.AsyncClient() as http:
                out = {}
                for name, spec in signals.items():
                    # the rendered signal, pointed at this Prometheus, read by the policy's own source
                    out[name] = await PrometheusSource(spec.model_copy(update={"url": prom.url}), http).read()
                return out

        values = asyncio.run(read_all())
        assert values["fleet_concurrency"] == pytest.approx(8.0)  # (4 + 8 + 12) / 3 replicas
        assert values["replicas"] == 3.0  # counted, not a constant
        expr = compile_expression(policy.mode.signal)
        assert expr.evaluate({**values, "local_inflight": 30}) == pytest.approx(10.0)  # 30 in flight / 3 replicas
        assert expr.evaluate({**values, "local_inflight": 3}) == pytest.approx(8.0)
        # the policy switches to the loaded mode at 8 per replica, not at 32
        assert policy.mode.enter_loaded_above == 8
    finally:
        prom.stop()
        exporter.shutdown()


# --- 10. the helm test pod ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["defaults", "production"])
def test_the_helm_test_pod_passes_against_a_real_gateway_and_fails_without_a_model(tmp_path, scenario):
    """The pod's script, run as the pod would (its env, its key mount layout), against a real
    gateway in front of the fake replica server."""
    from gateway import GatewayConfig, create_app
    from tests.gateway.fakes import FakeReplicaState, fake_replica_app
    from gateway.replica_client import HttpReplicaClient
    from policies import FixedModePolicy
    from tests.gateway.servers import serve_in_thread

    rendered, objs = C.render_scenario(scenario)
    pod = C.one(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    values = C.merged_values(scenario)
    env = _env(container)
    assert env["NLD_URL"] == f"http://{C.one(objs, 'Service', '-gateway')['metadata']['name']}.{C.NAMESPACE}.svc:80"
    # the mounted key: a Secret directory (defaults) or one entry holding keys one per line (production)
    keys = tmp_path / "api-keys"
    keys.mkdir()
    key_file = keys / ("keys" if env["NLD_API_KEY_FILE"].endswith("/keys") else "generated")
    key_file.write_text("# platform keys\nsk-smoke-1\nsk-smoke-2\n" if key_file.name == "keys" else "sk-smoke-1")
    local_key_path = str(key_file if key_file.name == "keys" else keys)
    state = FakeReplicaState()
    with serve_in_thread(fake_replica_app(state)) as replica_url:
        config = GatewayConfig(replica_url=replica_url, model_name=values["model"]["name"], auth_enabled=True,
                               api_keys={"sk-smoke-1", "sk-smoke-2"})
        with serve_in_thread(create_app(config, HttpReplicaClient(config), FixedModePolicy())) as url:
            run_env = {"NLD_URL": url, "NLD_API_KEY_FILE": local_key_path, "HOME": str(tmp_path)}
            proc = _run_container(container, run_env, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "ok /ready" in proc.stdout and "ok /v1/models" in proc.stdout and "ok /v1/completions" in proc.stdout
            assert state.requests and state.requests[-1].max_tokens == values["tests"]["maxTokens"]
            # a release serving another model id fails the test
            proc = _run_container(container, {**run_env, "NLD_MODEL": "not-this-model"}, timeout=120)
            assert proc.returncode != 0 and "FAIL /v1/models" in proc.stderr
            # a wrong key fails too
            key_file.write_text("sk-wrong")
            proc = _run_container(container, run_env, timeout=120)
            assert proc.returncode != 0 and "FAIL /v1/models: 401" in proc.stderr
        # no gateway: it gives up after its deadline instead of hanging
        proc = _run_container(container, {**run_env, "NLD_URL": "http://127.0.0.1:9", "NLD_READY_TIMEOUT_S": "1"}, timeout=60)
        assert proc.returncode != 0 and "FAIL /ready" in proc.stderr
    assert "helm test nld -n serving" in rendered[NOTES]
