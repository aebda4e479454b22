"""Mode and autoscaling policies: which decoding mode `auto` requests get. No torch, no Ray."""

from .base import ModeDecision, ModePolicy, ModeRequest
from .fixed import FixedModePolicy

__all__ = ["ModePolicy", "ModeRequest", "ModeDecision", "FixedModePolicy"]
