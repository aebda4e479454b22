"""The one interface the gateway uses to pick a decoding mode.

Contract: `ModePolicy.decide(ModeRequest) -> ModeDecision` is synchronous, cheap (called on
every request, on the event loop) and never raises for a valid request; `snapshot()` returns
the JSON that `GET /v1/nld/policy` serves. Policies read their signals in the background;
`decide` only reads the current state. Non-goals: talking to replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MODES = ("ar", "diffusion", "self_spec")
SPEC_ALGORITHMS = ("linear", "quadratic")
REQUESTED = ("auto",) + MODES


@dataclass(frozen=True)
class ModeRequest:
    requested_mode: str = "auto"  # "auto" or an explicit mode from the client
    model: str = ""
    max_tokens: int | None = None


@dataclass(frozen=True)
class ModeDecision:
    mode: str  # the mode the request runs in
    reason: str  # "client", "policy:<why>", "clamped", ...
    spec_algorithm: str | None = None  # self_spec: the level's algorithm ("linear" | "quadratic"); None: the replica's


class ModePolicy(Protocol):
    def decide(self, request: ModeRequest) -> ModeDecision: ...

    def snapshot(self) -> dict: ...
