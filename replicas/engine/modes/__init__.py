"""Decoding modes, one module each, all behind `DecodeMode`. `MODE_CLASSES` maps mode names to
classes, `SPEC_CLASSES` the self_spec algorithms; `mode_class(params)` picks a request's class."""

from ..params import DecodeParams
from .ar import ARMode
from .base import DecodeMode, finish_prefill
from .diffusion import DiffusionMode
from .quadratic import QuadraticSpecMode
from .self_spec import SelfSpecMode

MODE_CLASSES: dict[str, type[DecodeMode]] = {m.name: m for m in (ARMode, DiffusionMode, SelfSpecMode)}
SPEC_CLASSES: dict[str, type[DecodeMode]] = {"linear": SelfSpecMode, "quadratic": QuadraticSpecMode}


def mode_class(params: DecodeParams) -> type[DecodeMode]:
    """The class running `params.mode` (self_spec: `params.spec_algorithm`, linear when unset)."""
    if params.mode == "self_spec":
        return SPEC_CLASSES[params.spec_algorithm or "linear"]
    return MODE_CLASSES[params.mode]


__all__ = ["MODE_CLASSES", "SPEC_CLASSES", "DecodeMode", "ARMode", "DiffusionMode", "SelfSpecMode",
           "QuadraticSpecMode", "finish_prefill", "mode_class"]
