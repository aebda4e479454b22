"""Build the gateway's mode policy from a YAML file path (None: the fixed self_spec policy).

Contract: `load_policy(path)` returns a `ModePolicy`; until the YAML policy schema lands it
accepts only the fixed policy's keys (`mode`, `client_override`). Raises `ValueError` naming
the field on a bad file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from policies import FixedModePolicy, ModePolicy


def load_policy(path: str | Path | None) -> ModePolicy:
    if path is None:
        return FixedModePolicy()
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a policy file is a YAML mapping")
    unknown = set(data) - {"mode", "client_override"}
    if unknown:
        raise ValueError(f"{path}: unknown policy key {sorted(unknown)[0]!r}")
    return FixedModePolicy(**data)
