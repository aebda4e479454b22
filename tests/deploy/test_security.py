"""Static security scan of the rendered manifests with checkov (offline: `--skip-download`).

checkov pins dependencies that clash with the project's (networkx<2.7, packaging 23.2), so it
lives in its own virtual environment: `$NLD_CHECKOV` when set, else `.cache/checkov-venv`,
created here from PyPI on first use (about a minute; later runs reuse it). Without the
Bridgecrew platform checkov reports no severities, so the bar is stricter than "no high
findings": no failed check at all. A finding the chart accepts is suppressed in the template
with a `checkov.io/skipN: CKV_...=<reason>` annotation, and the reasons are listed in the
chart README. KubeRay's RayService is not a kind checkov knows, so its head and worker pod
templates are scanned as Pods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from . import chart as C

CHECKOV_VERSION = "3.3.30"
CHECKOV_VENV = C.REPO_ROOT / ".cache" / "checkov-venv"
# Accepted findings and where; each is explained in the chart README and in its annotation.
ALLOWED_SUPPRESSIONS = {
    "CKV_K8S_43": "image pinned by tag, not digest",
    "CKV_K8S_15": "pull policy IfNotPresent",
    "CKV_K8S_8": "Ray pods: KubeRay injects liveness probes; the download Job and the helm test pod run to completion",
    "CKV_K8S_9": "Ray pods: KubeRay injects readiness probes; the download Job and the helm test pod serve nothing",
    "CKV_K8S_40": "Ray pods and the download Job: the Ray image's uid 1000",
    "CKV_K8S_38": "Ray head with the in-tree autoscaler: KubeRay's ServiceAccount",
}
# Where each suppression may appear (checkov resource kinds): never on the gateway Deployment.
SUPPRESSION_KINDS = {"CKV_K8S_8": {"Pod", "Job"}, "CKV_K8S_9": {"Pod", "Job"}, "CKV_K8S_40": {"Pod", "Job"},
                     "CKV_K8S_38": {"Pod"}}
# Helm merges maps with the defaults, so keys are removed with null.
_NO_CONTAINER_HARDENING = {"allowPrivilegeEscalation": None, "readOnlyRootFilesystem": None, "capabilities": None}
INSECURE = {"gateway": {"securityContext": _NO_CONTAINER_HARDENING},
            "replicas": {"securityContext": _NO_CONTAINER_HARDENING}}

pytestmark = pytest.mark.slow


def checkov() -> Path:
    if os.environ.get("NLD_CHECKOV"):
        return Path(os.environ["NLD_CHECKOV"])
    exe = CHECKOV_VENV / "bin" / "checkov"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(CHECKOV_VENV)], check=True)
        subprocess.run([str(CHECKOV_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        f"checkov=={CHECKOV_VERSION}"], check=True)
    return exe


def scan_documents(objs) -> list[dict]:
    docs = []
    for obj in objs:
        docs.append(obj)
        if obj["kind"] == "RayService":
            for group, template in C.ray_pod_templates(obj).items():
                meta = {**template["metadata"], "name": f"{obj['metadata']['name']}-{group}",
                        "namespace": obj["metadata"]["namespace"]}
                docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]})
    return docs


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkov")
    (root / "chart").mkdir()
    (root / "control").mkdir()
    for name in C.SCENARIOS:
        _, objs = C.render_scenario(name)
        (root / "chart" / f"{name}.yaml").write_text(yaml.safe_dump_all(scan_documents(objs)))
    (root / "control" / "insecure.yaml").write_text(yaml.safe_dump_all(scan_documents(C.objects(C.render(INSECURE)))))
    proc = subprocess.run(
        [str(checkov()), "--directory", str(root), "--framework", "kubernetes", "--skip-download",
         "--output", "json", "--soft-fail"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    results = {"passed_checks": [], "failed_checks": [], "skipped_checks": [], "parsing_errors": []}
    for r in reports:
        for key in results:
            results[key] += r["results"].get(key, [])

    def where(path_part):
        return {k: [c for c in v if path_part in c["file_path"]] for k, v in results.items() if k != "parsing_errors"}

    return {"chart": where("/chart/"), "control": where("/control/"), "parsing_errors": results["parsing_errors"]}


def test_checkov_finds_no_unexplained_issue(scan):
    assert not scan["parsing_errors"]
    chart = scan["chart"]
    failed = [f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})" for c in chart["failed_checks"]]
    assert not failed, "checkov findings (fix them or suppress them in the template with a reason):\n" + "\n".join(failed)
    scanned = {c["resource"].split(".")[0] for c in chart["passed_checks"]}
    assert {"Deployment", "Pod", "Job", "Service", "Secret", "ServiceAccount"} <= scanned


def test_every_suppression_is_known_and_has_a_reason(scan):
    skipped = scan["chart"]["skipped_checks"]
    assert skipped
    for c in skipped:
        reason = (c.get("check_result") or {}).get("suppress_comment") or ""
        assert c["check_id"] in ALLOWED_SUPPRESSIONS, f"new suppression {c['check_id']} on {c['resource']}"
        assert len(reason) > 20, f"{c['check_id']} on {c['resource']} is suppressed without a reason"
        if c["check_id"] in SUPPRESSION_KINDS:
            kind = c["resource"].split(".")[0]
            assert kind in SUPPRESSION_KINDS[c["check_id"]], f"{c['check_id']} is suppressed on a {kind}"


def test_the_scan_catches_an_insecure_override(scan):
    """Control: with the security contexts emptied, checkov must report the issues."""
    failed = {(c["check_id"], c["resource"].split(".")[0]) for c in scan["control"]["failed_checks"]}
    for check in ("CKV_K8S_20", "CKV_K8S_22", "CKV_K8S_28", "CKV_K8S_37"):  # privilege escalation, RO rootfs, NET_RAW, caps
        assert (check, "Deployment") in failed and (check, "Pod") in failed, sorted(failed)
