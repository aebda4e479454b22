"""The chart's values schema, generated from one typed source: `build_schema()`.

Contract: `build_schema()` returns `deploy/helm/nld-gateway/values.schema.json` as a dict, built
with the typed builders of `nodes` (section by section: `model`, `replicas`, `gateway`,
`release`, shared `definitions`); the parts that mirror the code come from the code itself
(`replicas.engine` is `replicas.config.EngineLimits`, `gateway.policy.fixedMode` is
`replicas.wire.MODES`, `policy.preset` is the presets the chart ships). `render()` is the file's
text. Regenerate with `make chart-schema` (`python -m deploy.helm.values_schema`);
`--check` exits 1 when the committed file is stale (tests/deploy checks it too).
Non-goals: defaults and descriptions of values (values.yaml), the policy file's own schema
(`policies.schema`).
"""

from __future__ import annotations

import json
from pathlib import Path

from .definitions import DEFINITIONS
from .gateway import GATEWAY
from .model import MODEL
from .release import SECTIONS
from .replicas import REPLICAS

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "nld-gateway" / "values.schema.json"
ORDER = ("global", "nameOverride", "fullnameOverride", "commonLabels", "imagePullSecrets", "model", "replicas",
         "gateway", "auth", "policy", "monitoring", "tests", "networkPolicy")
REQUIRED = ("model", "replicas", "gateway", "auth", "policy", "monitoring", "networkPolicy")


def build_schema() -> dict:
    sections = {**SECTIONS, "model": MODEL, "replicas": REPLICAS, "gateway": GATEWAY}
    assert set(sections) == set(ORDER), sorted(set(sections) ^ set(ORDER))
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "nld-gateway chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": {name: sections[name] for name in ORDER},
        "required": list(REQUIRED),
        "definitions": DEFINITIONS,
    }


def render() -> str:
    return json.dumps(build_schema(), indent=2) + "\n"
