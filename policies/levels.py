"""The adaptive policy's parts that hold no logic: its levels, the record of a switch, and its
Prometheus metrics (`nld_policy_mode`, `nld_policy_switches`, `nld_policy_signal`,
`nld_policy_predicted_tokens_per_second`).
Non-goals: deciding anything (`policies.adaptive`), serving the metrics (the gateway).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge


@dataclass(frozen=True)
class Level:
    mode: str
    enter_above: float = float("-inf")
    leave_below: float = float("-inf")
    spec_algorithm: str | None = None  # self_spec levels: the algorithm; None: the replica's default


@dataclass
class Switch:
    at: float  # wall clock (unix seconds)
    from_mode: str
    to_mode: str
    reason: str
    detail: str


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.mode = Gauge("nld_policy_mode", "1 for the mode auto requests get now", ["mode"], registry=registry)
        self.switches = Counter("nld_policy_switches", "mode switches", ["from", "to", "reason"], registry=registry)
        self.signal = Gauge("nld_policy_signal", "signal values (and the smoothed decision value)", ["name"],
                            registry=registry)
        self.predicted = Gauge("nld_policy_predicted_tokens_per_second", "goodput: predicted tokens/s per replica "
                               "of each mode at the load decided on", ["mode"], registry=registry)
