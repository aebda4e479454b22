"""The NLD decoding engine: one copy of the weights, AR, diffusion and self-speculation per request.

`Engine` decodes one request at a time; `BatchEngine` advances many requests, each in its own
mode, with one batched forward per step; `AsyncEngine` runs that loop on a thread and streams;
`EngineProcess` runs it in its own process (what a replica serves with).
Imports torch, safetensors (and tokenizers in `testing`); never ray or fastapi. Names are
imported on first use, so a process that only talks to an `EngineProcess` (params, errors,
chunks) never imports torch.
"""

from importlib import import_module

_WHERE = {
    "Engine": "engine",
    "BatchEngine": "batch_engine",
    "load_batch_engine": "engine",
    "AsyncEngine": "async_engine",
    "EngineProcess": "process",
    "EngineSpec": "process",
    "StreamChunk": "outputs",
    "EngineConfig": "engine_config",
    "DraftTier": "engine_config",
    "DecodeParams": "params",
    "GenerationOutput": "params",
    "MODES": "params",
    "EngineOverloaded": "errors",
    "EngineError": "errors",
    "ModelConfig": "config",
    "ConfigError": "config",
    "load_model_config": "config",
    "CheckpointError": "loader",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
