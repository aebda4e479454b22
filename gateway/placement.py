"""Placement: which healthy replica a direct request goes to (`gateway.direct` asks).

Contract of `choose(replicas, start, fill_below)`: `replicas` are objects with `healthy` (bool) and
`inflight` (this gateway's requests there); `start` rotates ties (the caller advances it per
request). With `fill_below` 0 it returns the healthy replica with the fewest requests in flight:
requests spread. With `fill_below` N > 0 it returns the healthy replica with the MOST requests in
flight among those with fewer than N, and only when every healthy replica has N or more, the
least loaded: requests fill one replica up to N before the next gets any. None when no replica is
healthy.

Why fill: an AR step of a few rows costs a CPU engine about what a step of one row more costs
(one torch thread: 3.1 ms at 1 row, 4.2 ms at 2, 4.1 ms at 4; docs/PERFORMANCE.md, "Packing `ar`
requests"), so two replicas stepping two rows each make what one replica stepping four makes,
while both take a CPU from the serving path. The gateway fills only requests that run `ar`
(`GatewayConfig.pack_ar`); self-speculation's blocks are wide enough to keep spreading.
Non-goals: what other gateways send (each counts only its own requests), the replicas' own view
of their queues, and requests through the ingress (HAProxy or Serve's proxy balance those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Placeable(Protocol):
    healthy: bool
    inflight: int


R = TypeVar("R", bound=Placeable)


def choose(replicas: Sequence[R], start: int, fill_below: int = 0) -> R | None:
    n = len(replicas)
    order = [replicas[(start + k) % n] for k in range(n)] if n else []
    healthy = [r for r in order if r.healthy]
    if not healthy:
        return None
    if fill_below > 0:
        open_ = [r for r in healthy if r.inflight < fill_below]
        if open_:
            return max(open_, key=lambda r: r.inflight)  # first of the busiest, in rotation order
    return min(healthy, key=lambda r: r.inflight)  # first of the least loaded, in rotation order
