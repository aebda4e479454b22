"""`FixedModePolicy`: `auto` requests always get one configured mode; explicit modes are honoured
(`client_override="allow"`), refused to the fixed mode (`"deny"`), or limited to an allowed set
(`"clamp"`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import MODES, SPEC_ALGORITHMS, ModeDecision, ModePolicyBase, ModeRequest


@dataclass
class FixedModePolicy(ModePolicyBase):
    mode: str = "self_spec"
    client_override: str = "allow"  # allow | deny | clamp
    allowed_modes: tuple[str, ...] = field(default=MODES)  # used by "clamp"
    spec_algorithm: str | None = None  # self_spec decisions: "linear" | "quadratic"; None: the replica's default

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: unknown decoding mode {self.mode!r}")
        if self.client_override not in ("allow", "deny", "clamp"):
            raise ValueError(f"client_override: must be allow, deny or clamp, got {self.client_override!r}")
        if self.spec_algorithm is not None and self.spec_algorithm not in SPEC_ALGORITHMS:
            raise ValueError(f"spec_algorithm: must be linear or quadratic, got {self.spec_algorithm!r}")

    def decide(self, request: ModeRequest) -> ModeDecision:
        d = self._decide(request)
        return ModeDecision(d.mode, d.reason, self.spec_algorithm) if d.mode == "self_spec" else d

    def _decide(self, request: ModeRequest) -> ModeDecision:
        asked = request.requested_mode
        if asked == "auto":
            return ModeDecision(self.mode, "policy:fixed")
        if self.client_override == "allow":
            return ModeDecision(asked, "client")
        if self.client_override == "clamp" and asked in self.allowed_modes:
            return ModeDecision(asked, "client")
        return ModeDecision(self.mode, f"override:{self.client_override}")

    def snapshot(self) -> dict:
        return {"policy": "fixed", "mode": self.mode, "client_override": self.client_override,
                "signals": {}, "stale": False, "last_switch": None}
