"""The NLD decoding engine: one copy of the weights, AR, diffusion and self-speculation per request.

`Engine` decodes one request at a time; `BatchEngine` advances many requests, each in its own
mode, with one batched forward per step; `AsyncEngine` runs that loop on a thread and streams.
Imports torch, safetensors (and tokenizers in `testing`); never ray or fastapi.
"""

from .async_engine import AsyncEngine, EngineError
from .batch_engine import BatchEngine, StreamChunk
from .config import ConfigError, ModelConfig, load_model_config
from .engine import Engine
from .engine_config import DraftTier, EngineConfig
from .loader import CheckpointError
from .params import MODES, DecodeParams, GenerationOutput
from .scheduler import EngineOverloaded

__all__ = [
    "Engine",
    "BatchEngine",
    "AsyncEngine",
    "EngineConfig",
    "DraftTier",
    "DecodeParams",
    "GenerationOutput",
    "StreamChunk",
    "EngineOverloaded",
    "EngineError",
    "ModelConfig",
    "ConfigError",
    "CheckpointError",
    "MODES",
    "load_model_config",
]
