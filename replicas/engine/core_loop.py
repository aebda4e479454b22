"""The engine process's loop: control messages in, one output message per step out.

Contract: `run_core(conn, spec)` builds the `BatchEngine` (a failure is sent as ("fatal", why)),
answers ("ready", info), then loops until ("stop",) or the parent goes away (EOF): it applies
every control message that arrived (a reader thread queues them, so the parent's writes never
wait for a step), runs one `step()` when there is work, and sends that step's chunks as ONE
("out", [...]) message. A request submitted `quiet` (its consumer wakes only on the last chunk:
non-streaming, no stop strings) is held here and sent once, merged, with its last chunk, whose
stats carry `first_token_at` (this process's `time.perf_counter()` at its first token; the
parent's clock on Linux, CLOCK_MONOTONIC): the serving process then wakes per finished request,
not per step. A busy loop pushes its stats snapshot every `spec.stats_interval_s`, which is also
the parent's sign of progress while quiet requests run.
An exception that escapes `step()` is sent as ("fatal", why) and ends the process, so the
parent fails every open stream at once instead of letting them hang. See `process` for the
message shapes. Non-goals: asyncio, HTTP, text.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from .batch_engine import BatchEngine
from .engine import load_batch_engine
from .errors import EngineOverloaded
from .outputs import StreamChunk, pack


def run_core(conn: Connection, spec) -> None:
    try:
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)
        core = load_batch_engine(spec.model_path, spec.config, lora=spec.lora)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"model_config": core.engine.config, "config": core.config,
                         "max_block_length": core.engine.max_block_length, "has_lora": core.engine.has_lora,
                         "stats": core.stats_snapshot()}))
    CoreLoop(conn, core, spec.stats_interval_s).run()


class CoreLoop:
    def __init__(self, conn: Connection, core: BatchEngine, stats_interval_s: float) -> None:
        self.conn = conn
        self.core = core
        self.stats_interval_s = stats_interval_s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.stopping = False
        self.quiet: dict[str, StreamChunk | None] = {}  # quiet request -> what it made so far (held here)
        self.first_token_at: dict[str, float] = {}  # quiet request -> perf_counter() at its first token
        threading.Thread(target=self._read, name="nld-core-reader", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = ("stop",)  # the parent is gone
            self.inbox.put(msg)
            self.wake.set()
            if msg[0] == "stop":
                return

    def run(self) -> None:
        last_stats = time.monotonic()
        while not self.stopping:
            self.wake.clear()
            self._apply_control()
            if self.stopping:
                break
            if not self.core.has_work():
                self.wake.wait(timeout=1.0)
                continue
            try:
                chunks = self.core.step()
            except BaseException as e:  # noqa: BLE001 - the step's own boundary failed: give up loudly
                traceback.print_exc()
                self._send(("fatal", f"{type(e).__name__}: {e}"))
                return
            out = self._release(chunks)
            if out:
                self._send(("out", [pack(c) for c in out]))
            now = time.monotonic()
            if now - last_stats >= self.stats_interval_s or not self.core.has_work():
                self._send(("stats", self.core.stats_snapshot()))
                last_stats = now

    def _release(self, chunks: list[StreamChunk]) -> list[StreamChunk]:
        """The chunks to send now: every chunk of a request that streams; a quiet request's
        chunks are held and merged until its last one."""
        out = []
        for c in chunks:
            rid = c.request_id
            if rid not in self.quiet:
                out.append(c)
                continue
            if c.token_ids and rid not in self.first_token_at:
                self.first_token_at[rid] = time.perf_counter()
            held = self.quiet[rid]
            if held is None:
                merged = StreamChunk(rid, list(c.token_ids), c.finish_reason, c.stats, c.error, c.forward_passes,
                                     c.mode)
            else:  # in place: a long request costs one list, not one copy per step
                held.token_ids.extend(c.token_ids)
                held.finish_reason, held.stats, held.error = c.finish_reason, c.stats, c.error
                held.forward_passes, held.mode = c.forward_passes, c.mode
                merged = held
            if c.finish_reason is None:
                self.quiet[rid] = merged
                continue
            del self.quiet[rid]
            first = self.first_token_at.pop(rid, None)
            if merged.stats is not None and first is not None:
                merged.stats = {**merged.stats, "first_token_at": first}
            out.append(merged)
        return out

    def _forget(self, rid: str) -> None:
        self.quiet.pop(rid, None)
        self.first_token_at.pop(rid, None)

    def _apply_control(self) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return
            kind = msg[0]
            if kind == "submit":
                self._submit(*msg[1:])
            elif kind == "abort":
                self.core.abort(msg[1])
                self._forget(msg[1])  # its consumer is gone: nothing held is wanted
            elif kind == "set_mode":
                try:
                    self.core.set_mode(msg[1], msg[2])
                except KeyError:
                    pass  # finished meanwhile
            elif kind == "tiers":
                self.core.update_draft_tiers(msg[1])
            elif kind == "call":
                self._call(*msg[1:])
            elif kind == "stop":
                self.stopping = True
                return

    def _submit(self, rid: str, ids: list[int], params, quiet: bool = False) -> None:
        try:
            self.core.submit(ids, params, request_id=rid)
            if quiet:
                self.quiet[rid] = None
        except ValueError as e:
            self._send(("reject", rid, "value", str(e)))
        except EngineOverloaded as e:
            self._send(("reject", rid, "overloaded", str(e)))
        except Exception as e:  # noqa: BLE001 - any other failure ends this request only
            self._send(("reject", rid, "error", f"{type(e).__name__}: {e}"))

    def _call(self, call_id: int, name: str, args: tuple) -> None:
        if name not in ("downgrade_self_spec", "stats_snapshot"):
            self._send(("reply", call_id, None, f"no engine call {name!r}"))
            return
        try:
            self._send(("reply", call_id, getattr(self.core, name)(*args), None))
        except Exception as e:  # noqa: BLE001
            self._send(("reply", call_id, None, f"{type(e).__name__}: {e}"))

    def _send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except (OSError, ValueError):
            self.stopping = True  # the parent is gone


def main(fd: int) -> None:
    """`python -m replicas.engine.core_loop FD`: FD is this end of the parent's socketpair."""
    conn = Connection(fd)
    spec = conn.recv()[1]  # ("spec", EngineSpec)
    run_core(conn, spec)


if __name__ == "__main__":
    main(int(sys.argv[1]))
    os._exit(0)  # daemon threads and torch's pools need no orderly teardown
