"""The engine as of another git commit, importable next to the current one (before/after runs).

`load_engine(ref)` extracts `replicas/engine/` at `ref` (with `git archive`) into
`.cache/engine-baselines/<sha>/` once and imports it under its own package name, so one process
can drive the old and the new engine on the same prompts, interleaved. The engine package only
uses relative imports, so the copy is self-contained. Non-goals: other packages, dirty trees.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_engine(ref: str, cache_dir: Path = ROOT / ".cache" / "engine-baselines") -> ModuleType:
    sha = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    dest = cache_dir / sha
    package = dest / "replicas" / "engine"
    if not (package / "__init__.py").is_file():
        tar = subprocess.run(["git", "archive", sha, "replicas/engine"], cwd=ROOT, check=True, capture_output=True).stdout
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(dest, filter="data")
    name = f"nld_engine_{sha[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.git_sha = sha
    return module
