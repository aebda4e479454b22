"""Fuzz the gateway's own OpenAPI schema with schemathesis (positive and negative cases) against
the app with a fake replica client: no 5xx, every documented status and schema holds, and every
error body is the OpenAI envelope.

`test_fuzz_openapi` covers every operation with schemathesis' own strings (any Unicode text
except lone surrogates, which it never generates). `test_fuzz_completions_with_hostile_text`
runs the two completion endpoints again with text schemathesis cannot make: every string of a
generated body may get lone UTF-16 surrogates (what JavaScript clients send when they cut a
string inside a pair), astral and combining characters, bidi controls, NUL and non-ASCII
scripts spliced in. They travel as JSON escapes (`\\ud800`), as they would on the wire."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from gateway import GatewayConfig, create_app
from tests.gateway.fakes import FakeReplicaClient
from policies import FixedModePolicy

# Auth off (the local default): 401s are covered by test_errors, and schemathesis' auth probes
# would need its own credential plumbing.
APP = create_app(GatewayConfig(max_tokens_limit=64, default_max_tokens=16), FakeReplicaClient(), FixedModePolicy())
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
completions = schemathesis.openapi.from_asgi("/openapi.json", APP).include(
    path=["/v1/completions", "/v1/chat/completions"])

LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d"]  # high, low, half of an emoji
NON_ASCII = ["é", "ß", "中文", "日本語", "😀", "e\u0301", "\u202e", "\u200b", "\ufeff", "\x00", "Ωμέγα", "\U0010ffff"]


def error_envelope(ctx, response, case) -> None:
    """Every 4xx/5xx body is {"error": {"message", "type", "param", "code"}}."""
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and isinstance(body["error"]["type"], str)
    assert body["error"]["code"] is not None, body


def no_server_error(ctx, response, case) -> None:
    assert response.status_code < 500, (response.status_code, response.content[:500])


def _has_lone_surrogate(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def schema_valid_data_is_accepted(ctx, response, case) -> None:
    """schemathesis' positive_data_acceptance, knowing the limits no static schema can state: a
    schema-valid request may still not fit the replicas' context (400 context_length_exceeded)
    or ask a block longer than the model's (400 naming block_length)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code in (200, 404, 429):
        return
    assert response.status_code == 400, (response.status_code, response.content[:500])
    err = json.loads(response.content)["error"]
    assert err["code"] == "context_length_exceeded" or err["param"] == "block_length", err


def _text_of(content):
    """A message's content as the server reads it: a string, or of each content part its text."""
    if isinstance(content, list):
        return [{"text": part["text"]} if isinstance(part, dict) and "text" in part else part for part in content]
    return content


def surrogates_never_reach_a_replica(ctx, response, case) -> None:
    """A lone surrogate in text the replicas would get (prompt, messages, stop) is never a 200."""
    body = case.body if isinstance(case.body, dict) else {}
    forwarded = {k: body[k] for k in ("prompt", "stop") if k in body}
    messages = body.get("messages")
    if isinstance(messages, list):  # of a message, only its text reaches a replica (extra keys are dropped,
        # in the message and in each content part alike)
        forwarded["messages"] = [{k: _text_of(m[k]) if k == "content" else m[k] for k in ("content", "name") if k in m}
                                 for m in messages if isinstance(m, dict)]
    # what the server decodes: two spliced halves ("\ud800" then "\udc00") travel as JSON escapes
    # that a JSON parser joins into one valid character
    if _has_lone_surrogate(json.loads(json.dumps(forwarded))):
        assert response.status_code >= 400, response.content[:500]


def _string_paths(value, path=()):
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _string_paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _string_paths(v, path + (i,))


def _splice(body, path, piece: str, at: float):
    if not path:
        return body[: int(len(body) * at)] + piece + body[int(len(body) * at):]
    out = dict(body) if isinstance(body, dict) else list(body)
    out[path[0]] = _splice(body[path[0]], path[1:], piece, at)
    return out


@completions.hook
def flatmap_body(context, body):
    """Splice hostile text into some of the body's strings (every one may be picked)."""
    if not isinstance(body, dict):
        return st.just(body)
    paths = list(_string_paths(body))
    # what reaches the replicas: prompts, stop strings, message texts and names (not roles, types)
    text = [p for p in paths if p[0] in ("prompt", "stop") or (p[0] == "messages" and p[-1] in ("content", "text",
                                                                                                "name"))]
    if text:  # mostly there, sometimes anywhere
        where = st.one_of(st.sampled_from(text), st.sampled_from(text), st.sampled_from(text), st.sampled_from(paths))
    else:
        where = st.sampled_from(paths or [()])
    edits = st.lists(st.tuples(where, st.sampled_from(LONE_SURROGATES + NON_ASCII), st.floats(0, 1)),
                     min_size=1, max_size=4)

    def apply(args):
        served, chosen = args
        out = {**body, "model": "nld"} if served else body  # half the cases get past the model check
        for path, piece, at in chosen:
            if path and path != ("model",):
                out = _splice(out, path, piece, at)
        return out

    return st.tuples(st.booleans(), edits).map(apply)


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzz_openapi(case):
    case.call_and_validate(additional_checks=[error_envelope, no_server_error, schema_valid_data_is_accepted],
                           excluded_checks=[positive_data_acceptance])


@pytest.mark.slow
@completions.parametrize()
@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_fuzz_completions_with_hostile_text(case):
    # spliced text may break an enum or a constant, and the hook may complete a body generated to be
    # invalid (it sets `model`), so neither schemathesis' positive nor negative acceptance applies
    case.call_and_validate(additional_checks=[error_envelope, no_server_error, surrogates_never_reach_a_replica],
                           excluded_checks=[positive_data_acceptance, negative_data_rejection])
