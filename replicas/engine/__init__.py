"""The NLD decoding engine: one copy of the weights, AR, diffusion and self-speculation per request.

Imports torch, safetensors (and tokenizers in `testing`); never ray or fastapi.
"""

from .config import ConfigError, ModelConfig, load_model_config
from .engine import Engine
from .loader import CheckpointError
from .params import MODES, DecodeParams, GenerationOutput

__all__ = [
    "Engine",
    "DecodeParams",
    "GenerationOutput",
    "ModelConfig",
    "ConfigError",
    "CheckpointError",
    "MODES",
    "load_model_config",
]
