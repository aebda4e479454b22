"""Decoding modes, one module each, all behind `DecodeMode`; `MODE_CLASSES` maps names to classes."""

from .ar import ARMode
from .base import DecodeMode, finish_prefill
from .diffusion import DiffusionMode
from .self_spec import SelfSpecMode

MODE_CLASSES: dict[str, type[DecodeMode]] = {m.name: m for m in (ARMode, DiffusionMode, SelfSpecMode)}

__all__ = ["MODE_CLASSES", "DecodeMode", "ARMode", "DiffusionMode", "SelfSpecMode", "finish_prefill"]
