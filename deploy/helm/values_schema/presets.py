"""The policy presets the chart ships: the names of `files/policies/*.yaml` (a copy of `policies/presets/`)."""

from __future__ import annotations

from pathlib import Path

CHART_PRESETS = Path(__file__).resolve().parents[1] / "nld-gateway" / "files" / "policies"


def preset_names() -> list[str]:
    return sorted(p.stem for p in CHART_PRESETS.glob("*.yaml"))
