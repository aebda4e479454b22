"""The one interface the gateway uses to pick a decoding mode.

Contract: `ModePolicy.decide(ModeRequest) -> ModeDecision` is synchronous, cheap (called on
every request, on the event loop) and never raises for a valid request; `snapshot()` returns
the JSON that `GET /v1/nld/policy` serves; `engine_settings()` is the `replicas.wire.EngineSettings`
dict the replicas should apply now (None: nothing to impose); `start()` (on the gateway's event
loop) / `await stop()` begin and end background work (signal polling); `reload(force)` re-reads
a policy file when it changed and says whether the policy was swapped. Every method is part of
the protocol, so callers never probe with `hasattr`; `ModePolicyBase` gives the optional ones as
no-ops (no settings, nothing to start, stop or reload), and every policy subclasses it.
Policies read their signals in the background; `decide` only reads the current state.
Non-goals: talking to replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from replicas.wire import MODES, REQUESTED_MODES, SPEC_ALGORITHMS  # the one vocabulary (torch-free)

__all__ = ["MODES", "REQUESTED_MODES", "SPEC_ALGORITHMS", "ModeRequest", "ModeDecision", "ModePolicy",
           "ModePolicyBase"]


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

    def engine_settings(self) -> dict | None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def reload(self, force: bool = False) -> bool: ...


class ModePolicyBase:
    """The protocol's optional methods as no-ops; subclasses implement `decide` and `snapshot`."""

    def decide(self, request: ModeRequest) -> ModeDecision:
        raise NotImplementedError

    def snapshot(self) -> dict:
        raise NotImplementedError

    def engine_settings(self) -> dict | None:
        return None  # no engine settings to impose

    def start(self) -> None:
        return None  # no background work

    async def stop(self) -> None:
        return None

    def reload(self, force: bool = False) -> bool:
        return False  # nothing to re-read
