"""`AsyncEngine`: the batched engine on a thread of this process, streamed to asyncio consumers.

Contract: one daemon thread runs `BatchEngine.step()` whenever there is work, so the event
loop never blocks on a forward; each step's chunks reach the loop in ONE hop
(`call_soon_threadsafe` per step, not per chunk). `stream` / `generate` are
`outputs.StreamingFrontend`'s. Submission errors raise at once (`ValueError`,
`EngineOverloaded`); a failed step ends its requests with `EngineError`. If the loop thread
itself dies, every open stream raises `EngineError` at once and `health()` says why.
`shutdown()` stops the thread and fails open streams. For serving, `EngineProcess` runs the
same loop in its own process (off the serving process's GIL); this class is for embedding
the engine in a Python program. Non-goals: HTTP, tokenisation, Ray.
"""

from __future__ import annotations

import threading
import time
import traceback
from pathlib import Path

from .batch_engine import BatchEngine
from .engine import load_batch_engine
from .engine_config import EngineConfig
from .errors import EngineError
from .outputs import StreamingFrontend
from .params import DecodeParams


class AsyncEngine(StreamingFrontend):
    def __init__(self, core: BatchEngine, *, stall_timeout_s: float = 120.0) -> None:
        super().__init__()
        self.core = core
        self.stall_timeout_s = stall_timeout_s
        self._wake = threading.Condition()
        self._stopping = False
        self._dead: str | None = None
        self._last_progress = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="nld-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, **load_kw) -> "AsyncEngine":
        return cls(load_batch_engine(path, config, **load_kw))

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model_config(self):
        return self.core.engine.config

    @property
    def max_block_length(self) -> int:
        return self.core.engine.max_block_length

    @property
    def has_lora(self) -> bool:
        return self.core.engine.has_lora

    @property
    def has_denoise_lora(self) -> bool:
        return self.core.engine.has_denoise_lora

    # ---- public API ----------------------------------------------------------------------
    def _submit(self, request_id: str, prompt_ids: list[int], params: DecodeParams) -> None:
        self.core.submit(prompt_ids, params, request_id=request_id)
        self._notify()

    def _check_alive(self) -> None:
        if self._stopping:
            raise EngineError("the engine is shut down")
        if self._dead is not None:
            raise EngineError(self._dead)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._notify()

    def set_mode(self, request_id: str, mode: str) -> None:
        self.core.set_mode(request_id, mode)
        self._notify()

    def stats(self) -> dict:
        return self.core.stats_snapshot()

    async def fresh_stats(self) -> dict:
        return self.core.stats_snapshot()

    def update_draft_tiers(self, tiers) -> None:
        self.core.update_draft_tiers(tiers)

    async def downgrade_self_spec(self, on: bool) -> list[str]:
        """See `BatchEngine.downgrade_self_spec`; wakes the loop so switches apply promptly."""
        moved = self.core.downgrade_self_spec(on)
        self._notify()
        return moved

    def health(self) -> str | None:
        """None when serving; else why not (the loop died, or made no progress for
        `stall_timeout_s` while requests were in flight)."""
        if self._dead is not None:
            return self._dead
        idle = time.monotonic() - self._last_progress
        if len(self._router) and self.core.has_work() and idle > self.stall_timeout_s:
            return f"the engine loop made no progress for {idle:.0f} s with {len(self._router)} requests in flight"
        return None

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout=30)
        self._fail_all("the engine shut down")

    # ---- loop thread ---------------------------------------------------------------------
    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as e:  # noqa: BLE001 - the step's own boundary failed: fail everyone now
            traceback.print_exc()
            self._dead = f"the engine loop failed: {type(e).__name__}: {e}"
            self._fail_all(self._dead)

    def _loop_forever(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.core.has_work():
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
            chunks = self.core.step()
            self._last_progress = time.monotonic()
            if chunks:
                self._hand_over(self._deliver, chunks)

    def _hand_over(self, fn, *args) -> None:
        """Run `fn(*args)` on the consumers' loop (one hop per step)."""
        loop = self._loop
        if loop is None:
            return  # nobody has streamed yet: nobody to deliver to
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the consumers' loop is closed: nobody will read these streams
            for rid in self._router.request_ids():
                self.core.abort(rid)

    def _fail_all(self, reason: str) -> None:
        self._hand_over(self._router.fail_all, EngineError(reason))
