"""`EngineProcess`: the batched engine in its own process, streamed to asyncio consumers.

Contract: `EngineProcess(EngineSpec)` starts `python -m replicas.engine.process` and blocks until
the child has loaded the weights (or raises `EngineError` with the child's reason). The child
runs `BatchEngine.step()` whenever there is work, on its own GIL, and sends ONE message per
step with every request's new tokens; the serving process never runs torch. The public API is
`AsyncEngine`'s (`outputs.StreamingFrontend`: `stream(..., wake=, min_interval_s=)`, `generate`):
submission errors raise at the first `anext` (`ValueError`, `EngineOverloaded`, after one
round trip to the child); closing the stream early aborts the request. `stats()` is the snapshot
the child pushed last (every `stats_interval_s` while busy), `fresh_stats()` asks for one.
If the child dies or its loop fails, every open stream raises `EngineError` at once and
`health()` reports why; `health()` also reports a loop that made no progress for
`stall_timeout_s` while requests were in flight.

Wire (pickled tuples over a socketpair, `multiprocessing.connection` framing):
  parent -> child: ("submit", rid, ids, DecodeParams, quiet), ("abort", rid), ("set_mode", rid, mode),
                   ("tiers", tiers), ("call", id, name, args), ("stop",)
  child -> parent: ("ready", info), ("out", [packed chunk, ...]), ("reject", rid, kind, message),
                   ("reply", id, value, error), ("stats", snapshot), ("fatal", message)
Non-goals: HTTP, text, Ray (the replica around it), several engines per process.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .engine_config import EngineConfig
from .errors import EngineError, EngineOverloaded
from .outputs import StreamingFrontend, unpack
from .params import MODES, DecodeParams

REJECTIONS = {"value": ValueError, "overloaded": EngineOverloaded, "error": EngineError}


@dataclass(frozen=True)
class EngineSpec:
    """What the child needs to build its `BatchEngine` (picklable)."""

    model_path: str
    config: EngineConfig
    lora: str | bool | None = None  # None: <model>/linear_spec_lora when present; False: none
    denoise_lora: str | bool | None = None  # None: <model>/diffusion_lora when present; False: none
    torch_threads: int | None = None
    stats_interval_s: float = 0.5  # how often a busy child pushes its stats snapshot
    cpus: tuple[int, ...] | None = None  # CPU ids the child binds all its threads to; None: inherited


class EngineProcess(StreamingFrontend):
    def __init__(self, spec: EngineSpec, *, stall_timeout_s: float = 120.0) -> None:
        super().__init__()
        self.spec = spec
        self.stall_timeout_s = stall_timeout_s
        self._dead: str | None = None  # why the engine cannot serve, once it cannot
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        parent_sock, child_sock = socket.socketpair()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "replicas.engine.core_loop", str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL)
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._send_lock = threading.Lock()
        self._send(("spec", spec))
        info = self._wait_ready()
        self.model_config = info["model_config"]
        self.config: EngineConfig = info["config"]
        self.max_block_length: int = info["max_block_length"]
        self.has_lora: bool = info["has_lora"]
        self.has_denoise_lora: bool = info["has_denoise_lora"]
        self._stats: dict = info["stats"]
        self._last_progress = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop, name="nld-engine-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self) -> dict:
        while True:
            if self._conn.poll(1.0):
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    msg = ("fatal", "the engine process exited while loading")
                if msg[0] == "ready":
                    return msg[1]
                self._proc.wait(timeout=30)
                raise EngineError(f"engine process failed to start: {msg[1]}")
            if self._proc.poll() is not None:
                raise EngineError(f"engine process exited with code {self._proc.returncode} while loading")

    # ---- public API (the consumers' event loop; `stream` and `generate` come from the base) --
    def _submit(self, request_id: str, prompt_ids: list[int], params: DecodeParams) -> None:
        # a consumer that wakes only at the end gets the request's tokens in one message (core_loop)
        quiet = self._router.wake_of(request_id) == "final"
        self._send(("submit", request_id, prompt_ids, params, quiet))

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineError(self._dead)

    def abort(self, request_id: str) -> None:
        if self._dead is None:
            try:
                self._send(("abort", request_id))
            except EngineError:
                pass  # the engine is gone, and the request with it

    def set_mode(self, request_id: str, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode: unknown decoding mode {mode!r} (choose one of {', '.join(MODES)})")
        self._send(("set_mode", request_id, mode))

    def update_draft_tiers(self, tiers) -> None:
        self.config = EngineConfig(**{**vars(self.config), "draft_tiers": tuple(tiers)})
        self._send(("tiers", tuple(tiers)))

    async def downgrade_self_spec(self, on: bool) -> list[str]:
        return await self._call("downgrade_self_spec", on)

    def stats(self) -> dict:
        """The child's last pushed snapshot (at most `stats_interval_s` old while busy)."""
        return self._stats

    async def fresh_stats(self) -> dict:
        """A snapshot taken now (after the child's current step), with the engine's `engine_pid`."""
        self._stats = {**await self._call("stats_snapshot"), "engine_pid": self._proc.pid}
        return self._stats

    def health(self) -> str | None:
        """None when serving; else why not (dead, or no progress while requests are in flight)."""
        if self._dead is not None:
            return self._dead
        if self._proc.poll() is not None:
            return f"the engine process exited with code {self._proc.returncode}"
        idle = time.monotonic() - self._last_progress
        if len(self._router) and idle > self.stall_timeout_s:
            return f"the engine loop made no progress for {idle:.0f} s with {len(self._router)} requests in flight"
        return None

    def shutdown(self, timeout_s: float = 30.0) -> None:
        try:
            self._send(("stop",))
        except EngineError:
            pass
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._die("the engine shut down")
        self._reader.join(timeout=5)

    # ---- plumbing ------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError) as e:
            raise EngineError(self._dead or f"the engine process is gone ({type(e).__name__})") from e

    async def _call(self, name: str, *args) -> Any:
        self._bind_loop()
        if self._dead is not None:
            raise EngineError(self._dead)
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self._loop.create_future()
        try:
            self._send(("call", call_id, name, args))
            return await future
        finally:
            self._calls.pop(call_id, None)

    def _read_loop(self) -> None:
        """Reader thread: one unpickle per message, one hop onto the event loop per step."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                code = self._proc.wait()
                self._die(self._dead or f"the engine process exited with code {code}")
                return
            self._last_progress = time.monotonic()
            kind = msg[0]
            if kind == "stats":
                self._stats = msg[1]
            elif kind == "fatal":
                self._die(f"the engine loop failed: {msg[1]}")
            else:
                self._on_loop(self._dispatch, msg)

    def _on_loop(self, fn, *args) -> None:
        loop = self._loop
        if loop is None:
            return  # nobody has streamed yet: nothing to deliver to
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "out":
            self._deliver([unpack(t) for t in msg[1]])
        elif kind == "reject":
            _, rid, why, message = msg
            self._router.fail(rid, REJECTIONS.get(why, EngineError)(message))
        elif kind == "reply":
            _, call_id, value, error = msg
            future = self._calls.get(call_id)
            if future is not None and not future.done():
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(EngineError(error))

    def _die(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        self._on_loop(self._fail_everything, self._dead)

    def _fail_everything(self, reason: str) -> None:
        self._router.fail_all(EngineError(reason))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineError(reason))

