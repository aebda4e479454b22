"""The import graph, from the source (ast; nothing imported): the layers import one way and no
project module imports itself back, at module level or inside a function.

Rules (docs/ARCHITECTURE.md, "Imports"):
- `replicas.wire` is the shared vocabulary and wire types: it imports no project module, so any
  layer may import it.
- `gateway` imports neither torch nor ray, and of `replicas` only the wire modules
  (`replicas.wire`, `replicas.channel_wire`: the stream channel's framing, also a leaf).
- `policies` imports neither torch, ray nor fastapi, nor the gateway; of `replicas` only `replicas.wire`.
- `replicas.engine` imports neither ray, fastapi, starlette nor `policies` / `gateway`; of the rest
  of `replicas` only `replicas.wire`.
- `replicas` (outside the engine) imports neither `gateway` nor `policies`.
Imports inside `if TYPE_CHECKING:` are annotations only and never run: they are not edges.
Each gateway and policies module also imports alone in a fresh interpreter (they have no side
effects at import), which a cycle that depends on import order would break.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "policies", "replicas")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every module `path` imports, by absolute name: `from x import y` is x.y when that is a
    project module (importing a sibling through its package), else x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if is_type_checking(block) for b in block.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in typing_only:  # `if TYPE_CHECKING:` imports never run
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    return found


MODULES = project_modules()
GRAPH = {name: imports_of(name, path, set(MODULES)) for name, path in MODULES.items()}


def within(mod: str, prefix: str) -> bool:
    return mod == prefix or mod.startswith(prefix + ".")


def project_edges(name: str) -> set[str]:
    """The project modules `name` imports (a `from pkg import name` of a function is not a module)."""
    return {m for m in GRAPH[name] if m in GRAPH and m != name}


def violations(prefix: str, forbidden: tuple[str, ...], allowed_replicas: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for name, imported in GRAPH.items():
        if not within(name, prefix):
            continue
        for m in sorted(imported):
            if any(within(m, f) for f in forbidden) and not any(within(m, a) for a in allowed_replicas):
                bad.append(f"{name} imports {m}")
    return bad


def test_the_graph_is_read_from_every_module():
    assert {"gateway.bootstrap", "gateway.plan", "policies.base", "replicas.wire", "replicas.app",
            "replicas.engine.batch_engine"} <= GRAPH.keys()
    assert "gateway.bootstrap" in project_edges("gateway.cli") and "torch" in GRAPH["replicas.engine.model"]


def test_wire_is_a_leaf():
    for wire in ("replicas.wire", "replicas.channel_wire"):
        assert not {m for m in GRAPH[wire] if m.split(".")[0] in PACKAGES}


def test_gateway_imports_no_torch_ray_or_replica_internals():
    assert violations("gateway", ("torch", "ray", "replicas"),
                      allowed_replicas=("replicas.wire", "replicas.channel_wire")) == []


def test_policies_import_no_torch_ray_fastapi_or_gateway():
    assert violations("policies", ("torch", "ray", "fastapi", "starlette", "gateway", "replicas"),
                      allowed_replicas=("replicas.wire",)) == []


def test_engine_imports_no_ray_fastapi_policies_or_replica_layers():
    engine_rest = tuple(m for m in GRAPH if within(m, "replicas") and not within(m, "replicas.engine")
                        and m not in ("replicas", "replicas.wire"))
    assert violations("replicas.engine", ("ray", "fastapi", "starlette", "policies", "gateway") + engine_rest) == []


def test_replicas_import_neither_gateway_nor_policies():
    assert violations("replicas", ("gateway", "policies")) == []


def find_cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(project_edges(n)):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)) is not None:
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(GRAPH):
        if n not in state and (c := visit(n)) is not None:
            return c
    return None


def test_no_import_cycles_between_modules():
    """`from . import render` is an edge to `gateway.render`, not to the package: a package's
    `__init__` that re-exports its modules is not a cycle with them."""
    assert find_cycle() is None, " -> ".join(find_cycle() or [])


def test_find_cycle_sees_a_function_level_cycle(monkeypatch):
    """The checker itself: a cycle through an import inside a function (cli <-> up, before the
    composition root) is found."""
    monkeypatch.setitem(GRAPH, "gateway.bootstrap", GRAPH["gateway.bootstrap"] | {"gateway.cli"})
    cycle = find_cycle()
    assert cycle is not None and "gateway.cli" in cycle and "gateway.bootstrap" in cycle


LIGHT = sorted(m for m in GRAPH if (within(m, "gateway") or within(m, "policies")) and not m.endswith("__main__"))


def import_alone(module: str) -> tuple[str, int, str]:
    # a generous limit: the shared test machine may be paused for minutes
    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    return module, r.returncode, r.stderr[-500:]


def test_each_gateway_and_policies_module_imports_alone():
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [r for r in pool.map(import_alone, LIGHT) if r[1] != 0]
    assert len(LIGHT) > 20 and failed == []
