"""The engine process's loop: control messages in, one output message per step out.

Contract: `run_core(conn, spec)` binds the process to `spec.cpus` when set, builds the
`BatchEngine` (a failure of either is sent as ("fatal", why)),
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
from .outputs import Inbox, StreamChunk, pack


def bind_cpus(cpus: tuple[int, ...]) -> None:
    """Bind every thread of this process, and the threads it starts later (they inherit it), to
    `cpus`. Raises ValueError naming the CPUs when the OS refuses (an id this machine lacks)."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("engine_cpus needs Linux CPU affinity (os.sched_setaffinity)")
    try:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), cpus)
    except OSError as e:
        raise ValueError(f"engine_cpus {list(cpus)}: the CPUs this process may use are "
                         f"{sorted(os.sched_getaffinity(0))} ({e.strerror})") from None


def run_core(conn: Connection, spec) -> None:
    try:
        if spec.cpus:
            bind_cpus(spec.cpus)
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)
        core = load_batch_engine(spec.model_path, spec.config, lora=spec.lora, denoise_lora=spec.denoise_lora)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"model_config": core.engine.config, "config": core.config,
                         "max_block_length": core.engine.max_block_length, "has_lora": core.engine.has_lora,
                         "has_denoise_lora": core.engine.has_denoise_lora,
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
        self.quiet: dict[str, Inbox] = {}  # quiet request -> what it made so far (held here)
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
        chunks are held in its `Inbox` (tokens appended, end state kept, first-token time noted)
        until its last one, then sent as one."""
        out = []
        for c in chunks:
            held = self.quiet.get(c.request_id)
            if held is None:
                out.append(c)
                continue
            held.put(c)
            if c.finish_reason is None:
                continue
            del self.quiet[c.request_id]
            merged = held.take_now()
            if merged.stats is not None and held.first_token_at is not None:
                merged.stats = {**merged.stats, "first_token_at": held.first_token_at}
            out.append(merged)
        return out

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
                self.quiet.pop(msg[1], None)  # its consumer is gone: nothing held is wanted
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
                self.quiet[rid] = Inbox(rid, "final")
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
