"""The engine's request-level exceptions (torch-free, so a serving process can catch them
without importing the engine).

Contract: `EngineOverloaded` when the waiting queue is full (retry later); `EngineError` when a
request failed inside the engine (its step raised, the engine loop died, or it shut down).
Bad request fields raise the built-in `ValueError`, its message starting with the field name.
"""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; retry later."""


class EngineError(RuntimeError):
    """A request failed inside the engine (its step raised, the loop died, or the engine shut down)."""
