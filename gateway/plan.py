"""`Plan` and `Opened`: one completion request, decided, and its upstream streams once opened.

Contract: plain dataclasses shared by `gateway.service` (which builds them), `gateway.render`
(which reads a `Plan`) and `gateway.completion` (which carries them between the two); they
import nothing of the gateway, so those modules need not import each other. Non-goals:
behaviour (see `gateway.service`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from replicas.wire import GenerateChunk, GenerateRequest

from .replica_client import ReplicaStream


@dataclass
class Plan:
    """One completion request, decided: its mode and the upstream request of every choice."""
    id: str
    created: int
    chat: bool
    model: str
    mode: str
    reason: str
    n: int
    requests: list[GenerateRequest]
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"  # the field the client set (for errors about it)


@dataclass
class Opened:
    """Upstream streams of one request with their first chunks (already received)."""
    streams: list[ReplicaStream]
    firsts: list[GenerateChunk]
    mode: str
    closed: bool = False
    status: int = 200  # what metrics record for a streamed request
    done: list[bool] = field(default_factory=list)
