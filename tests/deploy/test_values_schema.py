"""The chart's values.schema.json is generated from one typed source (`deploy/helm/values_schema`):
the committed file is current, and the parts that mirror the code are the code's own models."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
import pytest

from deploy.helm.values_schema import SCHEMA_FILE, build_schema, render
from deploy.helm.values_schema.nodes import from_model, obj, string
from replicas.config import EngineLimits, ReplicaConfig
from replicas.wire import MODES

from . import chart as C


def test_the_committed_schema_is_the_generated_one():
    assert SCHEMA_FILE.read_text() == render(), "values.schema.json is stale: run `make chart-schema`"
    check = subprocess.run([sys.executable, "-m", "deploy.helm.values_schema", "--check"], cwd=C.REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_the_mirrored_parts_come_from_the_code():
    props = build_schema()["properties"]
    engine = props["replicas"]["properties"]["engine"]
    assert engine == from_model(EngineLimits, description="replicas.config.EngineLimits")
    assert set(engine["properties"]) == set(EngineLimits.model_fields)
    serve = props["replicas"]["properties"]["serve"]["properties"]
    assert serve["dtype"]["enum"] == ["float32", "bfloat16", "float16"]
    assert tuple(props["gateway"]["properties"]["policy"]["properties"]["fixedMode"]["enum"]) == MODES
    assert ReplicaConfig.model_fields["device"].annotation.__args__ == tuple(serve["device"]["enum"])


@pytest.mark.parametrize("engine, ok", [
    ({}, True),
    ({"max_batch_size": 0}, False),
    ({"num_kv_blocks": None, "max_block_length": 8}, True),
    ({"max_block_length": 1}, False),
    ({"spec_algorithm": "quadratic"}, True),
    ({"spec_algorithm": "cubic"}, False),
    ({"kv_watermark": 1}, False),
    ({"gpu_memory_utilization": 1}, True),
    ({"gpu_memory_utilization": 0}, False),
    ({"draft_tiers": [{"max_running": 4, "block_length": 32}]}, True),
    ({"draft_tiers": [{"max_running": 4}]}, False),
    ({"nope": 1}, False),
])
def test_engine_values_are_accepted_exactly_when_the_replica_accepts_them(engine, ok):
    node = build_schema()["properties"]["replicas"]["properties"]["engine"]
    schema_ok = jsonschema.Draft7Validator(node).is_valid(engine)
    try:
        EngineLimits.model_validate(engine)
        model_ok = True
    except ValueError:
        model_ok = False
    assert schema_ok == model_ok == ok


def test_builders_name_their_keywords():
    assert string(min_length=1, pattern="^a") == {"type": "string", "minLength": 1, "pattern": "^a"}
    assert obj({"a": string()}, required=["a"]) == {"type": "object", "additionalProperties": False,
                                                   "properties": {"a": {"type": "string"}}, "required": ["a"]}
    with pytest.raises(TypeError):
        string(minLength=1)  # a JSON Schema spelling is not a builder keyword: no silently ignored key
