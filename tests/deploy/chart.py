"""Offline rendering and validation helpers for the Helm chart (no cluster, no helm binary).

The Helm v4 engine comes from `helm-python-sdk` (a bundled libhelm, called through ctypes).
Scenarios are the chart's `ci/*-values.yaml` files (the chart-testing convention), so `ct lint`
and these tests exercise the same value sets. `render(values, api_versions=...)` also renders
the way `helm install` does against a cluster that serves those API versions (Helm's
`.Capabilities.APIVersions`), through a client-only dry-run install of the same engine; the
scenarios render as on a cluster with the prometheus-operator CRDs (`CLUSTER_API_VERSIONS`).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "nld-gateway"
SHARED_DIR = REPO_ROOT.parent / "shared"
RAYSERVICE_CRD = SHARED_DIR / "schemas" / "crds" / "ray.io_rayservices.yaml"
KUBE_VERSION = "1.30.0"
RELEASE = "nld"
NAMESPACE = "serving"

SCENARIOS = sorted(p.name[: -len("-values.yaml")] for p in (CHART_DIR / "ci").glob("*-values.yaml"))
CORE_KINDS = {"ConfigMap", "Secret", "Service", "ServiceAccount", "Deployment", "Ingress", "Job", "Pod",
              "PersistentVolumeClaim", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
CUSTOM_KINDS = {"RayService", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
# What `helm install` finds on a cluster with the prometheus-operator: Helm lists every
# group/version and group/version/Kind the API server serves.
MONITORING_API_VERSIONS = ("monitoring.coreos.com/v1", "monitoring.coreos.com/v1/ServiceMonitor",
                           "monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/PrometheusRule")
CLUSTER_API_VERSIONS = MONITORING_API_VERSIONS


def helm():
    import helm_python  # noqa: PLC0415 - a 250 MB native library: load it only when a test needs it

    return helm_python


def scenario_values(name: str) -> dict:
    return yaml.safe_load((CHART_DIR / "ci" / f"{name}-values.yaml").read_text()) or {}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@functools.cache
def _chart():
    return helm().Chart.load(str(CHART_DIR))


def load_chart(path: Path):
    return helm().Chart.load(str(path))


def _dry_run_install(chart, values: dict, name: str, namespace: str, api_versions) -> dict:
    """A client-only `helm install --dry-run=client --api-versions ... --kube-version ...`: the
    release (manifest without hooks, notes). helm-python-sdk 0.2.2 wraps `helm_install` without
    the `api_versions` option, which the bundled library accepts, so it is called directly."""
    from helm_python import _native
    from helm_python.config import Config

    opts = {"namespace": namespace, "dry_run": "client", "api_versions": list(api_versions),
            "kube_version": f"v{KUBE_VERSION}"}
    config = Config(namespace=namespace)
    try:
        payload = _native.call_string("helm_install", config._raw(), Config._context_arg(None), chart._raw(), None,
                                      name, json.dumps(values), json.dumps(opts))
    finally:
        config.close()
    return json.loads(payload)


def render(values: dict | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE,
           api_versions=None, chart=None) -> dict[str, str]:
    """Template path -> rendered text (what `helm template` prints), NOTES.txt and hooks included.

    `api_versions`: the API versions the cluster serves (Helm's `.Capabilities.APIVersions`);
    None renders with the engine's defaults, which include no CustomResourceDefinition."""
    chart = chart or _chart()
    rendered = chart.render(values or {}, name=name, namespace=namespace)
    if api_versions is None:
        return rendered
    release = _dry_run_install(chart, values or {}, name, namespace, api_versions)
    by_path: dict[str, list[str]] = {}
    for doc in release["manifest"].split("\n---\n"):
        m = re.match(r"\s*(?:---\s*)?# Source: (\S+)\n", doc)
        if m:
            by_path.setdefault(m.group(1), []).append(doc[m.end():])
    out = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            out[path] = release.get("notes", "")
        elif "helm.sh/hook:" in text:  # hooks are not in the release manifest; they need no CRD
            out[path] = text
        else:
            out[path] = "\n---\n".join(by_path.get(path, []))
    return out


def objects(rendered: dict[str, str]) -> list[dict]:
    """Every Kubernetes object in the rendered manifests (NOTES.txt excluded)."""
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


@functools.cache
def render_scenario(name: str) -> tuple[dict[str, str], tuple]:
    """Cached (rendered text, objects) of a ci/ scenario, on a cluster with the prometheus-operator
    CRDs. Callers must not mutate the objects."""
    rendered = render(scenario_values(name), api_versions=CLUSTER_API_VERSIONS)
    return rendered, tuple(objects(rendered))


def merged_values(name: str) -> dict:
    return _chart().merge_values(scenario_values(name))


def find(objs, kind: str, name_suffix: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name_suffix is None or o["metadata"]["name"].endswith(name_suffix))]


def one(objs, kind: str, name_suffix: str | None = None) -> dict:
    found = find(objs, kind, name_suffix)
    assert len(found) == 1, f"expected one {kind}{' *' + name_suffix if name_suffix else ''}, got {len(found)}"
    return found[0]


def serve_config(objs) -> dict:
    return yaml.safe_load(one(objs, "RayService")["spec"]["serveConfigV2"])


def ray_pod_templates(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    out = {"head": cluster["headGroupSpec"]["template"]}
    for group in cluster.get("workerGroupSpecs", []):
        out[f"worker-{group['groupName']}"] = group["template"]
    return out


# --- the KubeRay CRD as a strict JSON schema --------------------------------------------------


def _strict(node):
    """OpenAPI v3 structural schema -> JSON schema that, like `kubectl apply` (strict field
    validation), rejects unknown fields: `additionalProperties: false` wherever properties are
    listed and unknown fields are not preserved; `nullable` becomes a null type; `x-kubernetes-*`
    keys (CEL rules, list types) are dropped."""
    if isinstance(node, list):
        return [_strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def rayservice_schema() -> dict:
    if not RAYSERVICE_CRD.is_file():
        raise FileNotFoundError(f"{RAYSERVICE_CRD} is missing: the tests expect shared/ beside the repository "
                                "(see shared/schemas/README.md)")
    crd = yaml.load(RAYSERVICE_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is `{type: object}` in CRDs (the API server validates it); check the basics here.
    schema["properties"]["metadata"] = {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                       "namespace": {"type": "string"},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
        "additionalProperties": False,
    }
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    return schema


# --- the Grafana dashboard --------------------------------------------------------------------


def dashboard_metrics(dashboard: dict) -> dict[str, str]:
    """The dashboard's metric-name constants (`m_*` template variables): name -> metric."""
    return {v["name"]: v["query"] for v in dashboard["templating"]["list"]
            if v["type"] == "constant" and v["name"].startswith("m_")}


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def load_dashboard() -> dict:
    return json.loads((CHART_DIR / "files" / "dashboard.json").read_text())
