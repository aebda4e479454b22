"""Mode and autoscaling policies: which decoding mode `auto` requests get. No torch, no Ray.

`ModePolicy` is the one interface the gateway calls; `FixedModePolicy` always picks one mode;
`AdaptiveModePolicy` (built from a YAML `PolicyFile` by `build_policy`, hot-reloaded by
`PolicyHolder`) follows concurrency signals from Prometheus, the replicas (their metrics pages, or the reports on
their answers: `ReplicaReports`) or the gateway.
"""

from .adaptive import AdaptiveModePolicy, PolicyMetrics
from .base import ModeDecision, ModePolicy, ModePolicyBase, ModeRequest
from .build import PRESETS, PolicyHolder, build_policy
from .fixed import FixedModePolicy
from .reports import REPORTS_URL, ReplicaReports
from .schema import PolicyFile, PolicyFileError, StackPorts, load_policy_file, parse_policy

__all__ = [
    "ModePolicy", "ModePolicyBase", "ModeRequest", "ModeDecision", "FixedModePolicy", "AdaptiveModePolicy", "PolicyMetrics",
    "PolicyFile", "PolicyFileError", "PolicyHolder", "build_policy", "load_policy_file", "parse_policy", "PRESETS",
    "StackPorts", "ReplicaReports", "REPORTS_URL",
]
