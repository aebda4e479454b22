"""The Dockerfiles under deploy/docker/ (not built here: no Docker engine in CI).

Static checks that keep them consistent with the project and the chart, and a run of the
gateway's imports in a fresh interpreter showing that the slim gateway image needs nothing
beyond gateway-requirements.txt (in particular no torch and no Ray).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import yaml
from packaging.requirements import Requirement

from . import chart as C

DOCKER_DIR = C.REPO_ROOT / "deploy" / "docker"
PYPROJECT = tomllib.loads((C.REPO_ROOT / "pyproject.toml").read_text())


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (DOCKER_DIR / dockerfile).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def build_args(ins) -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)


def gateway_requirements() -> list[Requirement]:
    lines = (DOCKER_DIR / "gateway-requirements.txt").read_text().splitlines()
    return [Requirement(x) for x in (line.split("#")[0].strip() for line in lines) if x]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_gateway_requirements_follow_pyproject():
    project = {canonical(Requirement(r).name): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    for req in gateway_requirements():
        assert canonical(req.name) in project, f"{req.name} is not a project dependency"
        assert req.specifier == project[canonical(req.name)].specifier, f"{req.name}: {req.specifier} != pyproject"
    names = {canonical(r.name) for r in gateway_requirements()}
    assert not names & {"torch", "ray", "numpy", "safetensors", "tokenizers"}


IMPORT_PROBE = r"""
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
import gateway, policies
mods = ["gateway." + m.name for m in pkgutil.iter_modules(gateway.__path__) if m.name != "__main__"]
mods += ["policies." + m.name for m in pkgutil.iter_modules(policies.__path__)]
mods += ["replicas.wire", "replicas.config"]
for m in mods:
    importlib.import_module(m)
from gateway.cli import build_parser
build_parser().parse_args(["serve", "--replica-url", "http://replicas:8000"])
import uvloop
from gateway.listeners import loop_factory
assert loop_factory("auto") is uvloop.new_event_loop  # the image's gateway runs on uvloop
print(json.dumps({"modules": mods, "path": [p for p in sys.path if "site-packages" in p]}))
"""


def _closure(requirements: list[Requirement]) -> set[str]:
    """Distribution names that `pip install -r gateway-requirements.txt` brings (from this venv)."""
    import importlib.metadata as md

    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in seen:
            continue
        seen.add(name)
        for r in map(Requirement, md.requires(req.name) or []):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(r)
    return seen


def test_the_gateway_imports_only_what_its_image_installs(tmp_path):
    """Import every gateway module in an interpreter that sees only the stdlib, the project's
    packages and the distributions gateway-requirements.txt installs (symlinked from this venv),
    as in the slim image: a missing dependency, torch or Ray fails the import."""
    import importlib.metadata as md

    site = tmp_path / "site-packages"
    site.mkdir()
    for name in _closure(gateway_requirements()):
        dist = md.distribution(name)
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            src = dist.locate_file(top)
            if src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    for package in ("gateway", "policies", "replicas"):
        (site / package).symlink_to(C.REPO_ROOT / package)
    proc = subprocess.run([sys.executable, "-S", "-E", "-c", IMPORT_PROBE, str(site)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, ("the gateway image would fail to import (add the package to "
                                  "deploy/docker/gateway-requirements.txt):\n" + proc.stderr[-3000:])
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "gateway.cli" in probe["modules"] and probe["path"] == [str(site)]


def _copy_sources(ins) -> list[str]:
    out = []
    for op, rest in ins:
        if op == "COPY" and "--from=" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            out += parts[:-1]
    return out


def _ignored(dockerfile: str, path: str) -> bool:
    """Whether <Dockerfile>.dockerignore (an allow-list: `*` then `!path`) leaves `path` out."""
    rules = [r.strip() for r in (DOCKER_DIR / f"{dockerfile}.dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    return not any(path.rstrip("/") == a or path.startswith(a + "/") for a in allowed)


def test_gateway_dockerfile():
    ins = instructions("gateway.Dockerfile")
    image = build_args(ins)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", image), image
    assert ins[-1][0] == "CMD" or ins[-1][0] == "ENTRYPOINT"
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] == "10001:10001"
    values = yaml.safe_load((C.CHART_DIR / "values.yaml").read_text())
    assert values["gateway"]["podSecurityContext"]["runAsUser"] == 10001
    entrypoint = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    assert entrypoint == ["nld-gateway"] and "nld-gateway" in PYPROJECT["project"]["scripts"]
    run = " ".join(rest for op, rest in ins if op == "RUN")
    assert "--no-deps ." in run and "-r /tmp/gateway-requirements.txt" in run
    for src in _copy_sources(ins):
        assert (C.REPO_ROOT / src).exists(), src
        assert not _ignored("gateway.Dockerfile", src), f"{src} is excluded by the .dockerignore"


def test_replica_dockerfile():
    ins = instructions("replica.Dockerfile")
    args = build_args(ins)
    values = yaml.safe_load((C.CHART_DIR / "values.yaml").read_text())
    ray_version = values["replicas"]["rayVersion"]
    ray_pin = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "ray")
    assert str(ray_pin.specifier) == f"=={ray_version}", "values.yaml rayVersion must match pyproject's ray pin"
    assert args["RAY_IMAGE"] == f"rayproject/ray:{ray_version}-py311-gpu"
    assert ("FROM", "${RAY_IMAGE}") in ins
    torch_pin = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch")
    assert Requirement(args["TORCH_SPEC"].strip('"')).specifier == torch_pin.specifier
    users = [rest for op, rest in ins if op == "USER"]
    assert users[-1] == "1000:100"
    sc = values["replicas"]["podSecurityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"]) == (1000, 100)
    run = " ".join(rest for op, rest in ins if op == "RUN")
    assert "huggingface_hub" in run, "the download init container runs huggingface_hub in this image"
    for src in _copy_sources(ins):
        assert (C.REPO_ROOT / src).exists(), src
        assert not _ignored("replica.Dockerfile", src), f"{src} is excluded by the .dockerignore"
