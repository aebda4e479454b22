"""`BatchEngine`: many requests, each in its own mode, advanced by ONE batched forward per step.

Contract: `submit` validates a request (ValueError) and queues it (EngineOverloaded when the
queue is full); `abort` and `set_mode` may be called from any thread and take effect at the
start of the next step; `step()` applies them, admits waiting requests into free KV slots,
asks the scheduler which sequences run, builds their passes (prefill chunks, or each row's
mode pass: AR token, diffusion canvas or commit, self-spec draft or verify), runs ONE forward
through the runner, advances every sequence and returns a `StreamChunk` per request that made
tokens final or finished. A failing forward ends the requests of that step with
finish_reason "error" and frees their slots; the engine keeps serving.
Non-goals: threads and asyncio (see `async_engine`), tokenisation.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace
from pathlib import Path

from .engine import Engine
from .engine_config import EngineConfig
from .kv_cache import KVCache
from .outputs import StreamChunk
from .params import MODES, DecodeParams
from .scheduler import Running, Scheduler
from .stats import EngineStats


class BatchEngine:
    def __init__(self, engine: Engine, config: EngineConfig) -> None:
        self.engine = engine
        self.config = config
        cfg = engine.config
        self.cache = KVCache(
            num_layers=cfg.num_hidden_layers, num_slots=config.max_batch_size, num_kv_heads=cfg.num_key_value_heads,
            max_len=config.max_seq_len, head_dim=cfg.head_dim, device=engine.device, dtype=engine.dtype,
        )
        self.runner = engine.runner_cls(engine.model, self.cache)
        self.scheduler = Scheduler(config)
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._aborts: set[str] = set()
        self._abort_notices: list[str] = []  # waiting requests already removed; report next step
        self._switches: dict[str, str] = {}
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig | None = None, **load_kw) -> "BatchEngine":
        config = config or EngineConfig()
        load_kw.setdefault("cuda_graphs", config.cuda_graphs)
        engine = Engine.from_pretrained(path, device=config.device, dtype=config.dtype,
                                        max_block_length=config.max_block_length, **load_kw)
        return cls(engine, config)

    # ---- thread-safe control -------------------------------------------------------------
    def submit(self, prompt_ids, params: DecodeParams | None = None, request_id: str | None = None) -> str:
        params = self.engine.check_request(list(prompt_ids), params or DecodeParams())
        need = Engine.positions_needed(len(prompt_ids), params.max_new_tokens, params.block_length)
        if need > self.config.max_seq_len:
            raise ValueError(
                f"max_new_tokens: prompt ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) + one "
                f"block ({params.block_length}) exceeds the engine's max_seq_len ({self.config.max_seq_len})"
            )
        rid = request_id or f"req-{next(self._ids)}"
        seq = self.engine.new_sequence(prompt_ids, params, slot=-1, request_id=rid)
        with self._lock:
            if rid in self.scheduler.running or any(s.request_id == rid for s in self.scheduler.waiting):
                raise ValueError(f"request_id: {rid!r} is already in flight")
            try:
                self.scheduler.add(seq)
            except Exception:
                self.stats.rejected_requests += 1
                raise
        return rid

    def abort(self, request_id: str) -> None:
        """A waiting request leaves the queue at once; a running one frees its slot next step."""
        with self._lock:
            if any(s.request_id == request_id for s in self.scheduler.waiting):
                self.scheduler.remove(request_id)
                self.stats.aborted_requests += 1
                self._abort_notices.append(request_id)
            else:
                self._aborts.add(request_id)

    def set_mode(self, request_id: str, mode: str) -> None:
        """Move a request to `mode` at its next cycle boundary, keeping its KV cache."""
        if mode not in MODES:
            raise ValueError(f"mode: unknown decoding mode {mode!r} (choose one of {', '.join(MODES)})")
        with self._lock:
            known = request_id in self.scheduler.running or any(
                s.request_id == request_id for s in self.scheduler.waiting)
            if not known:
                raise KeyError(f"no request {request_id!r} in flight")
            self._switches[request_id] = mode

    def update_draft_tiers(self, tiers) -> None:
        """Replace the load-aware draft tiers (applied at each request's next cycle)."""
        with self._lock:
            self.config = replace(self.config, draft_tiers=tuple(tiers))
            self.scheduler.config = self.config

    def downgrade_self_spec(self, on: bool) -> list[str]:
        """on: admitted self_spec requests (running, or waiting for a slot) continue in ar; off:
        those requests return to self_spec. Waiting ones count: a burst that arrived just before
        the policy's switch queues for prefill, and would otherwise run as self_spec to the end."""
        with self._lock:
            moved = []
            seqs = [run.seq for run in self.scheduler.running.values()] + list(self.scheduler.waiting)
            for seq in seqs:
                current = self._switches.get(seq.request_id, seq.params.mode)
                if on and current == "self_spec":
                    self._switches[seq.request_id] = "ar"
                    seq.downgraded = True
                    moved.append(seq.request_id)
                elif not on and seq.downgraded:
                    self._switches[seq.request_id] = "self_spec"
                    seq.downgraded = False
                    moved.append(seq.request_id)
            return moved

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.scheduler.waiting or self.scheduler.running or self._aborts or self._abort_notices
                        or self._switches)

    def stats_snapshot(self) -> dict:
        """Counters as of the last completed step (computed on demand, under the engine lock)."""
        with self._lock:
            return self._snapshot()

    # ---- the loop body -------------------------------------------------------------------
    def step(self) -> list[StreamChunk]:
        t0 = time.perf_counter()
        out: list[StreamChunk] = []
        sched = self.scheduler
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            notices, self._abort_notices = self._abort_notices, []
            out.extend(StreamChunk(rid, [], finish_reason="abort") for rid in notices)
            switches, self._switches = self._switches, {}
            for rid in aborts:
                if sched.remove(rid) is not None:
                    self.stats.aborted_requests += 1
                    out.append(StreamChunk(rid, [], finish_reason="abort"))
            for seq in sched.waiting:
                if seq.request_id in switches:
                    seq.params = seq.params.with_(mode=switches.pop(seq.request_id))
            sched.admit()
        for rid, mode in switches.items():
            if rid in sched.running:
                sched.running[rid].switch_to = mode
        batch = sched.schedule()
        if batch:
            out.extend(self._run(batch))
        self.stats.last_step_seconds = time.perf_counter() - t0
        if batch:
            self.stats.step_seconds.observe(self.stats.last_step_seconds)
        return out

    def _run(self, batch: list[Running]) -> list[StreamChunk]:
        running = len(self.scheduler.running)
        for r in batch:
            r.prepare(self.config, running)
        try:
            logits = self.runner.run([(r.seq.kv.slot, r.next_pass()) for r in batch])
        except Exception as e:  # keep serving: end this step's requests cleanly
            with self._lock:
                for r in batch:
                    self.scheduler.remove(r.seq.request_id)
            return [StreamChunk(r.seq.request_id, [], finish_reason="error", error=f"{type(e).__name__}: {e}")
                    for r in batch]
        self.stats.forward_passes += 1
        out = []
        for r, lg in zip(batch, logits):
            seq = r.seq
            new = r.advance(lg)
            self.stats.generated_tokens += len(new)
            for c in seq.accepted_lengths[r.seen_accepts:]:
                self.stats.accepted_length.observe(c)
            r.seen_accepts = len(seq.accepted_lengths)
            if seq.finished:
                with self._lock:
                    self.scheduler.remove(seq.request_id)
                self.stats.finished_requests += 1
                tpf = len(seq.output) / max(seq.forward_passes, 1)
                self.stats.tokens_per_forward.observe(tpf)
                out.append(StreamChunk(seq.request_id, new, finish_reason=seq.finish_reason,
                                       stats=request_stats(seq), forward_passes=seq.forward_passes,
                                       mode=seq.params.mode))
            elif new:
                out.append(StreamChunk(seq.request_id, new, forward_passes=seq.forward_passes, mode=seq.params.mode))
        return out

    def _snapshot(self) -> dict:
        running = list(self.scheduler.running.values())
        by_mode = {m: 0 for m in ("prefill", *MODES)}
        for r in running:
            by_mode["prefill" if r.prefilling else r.mode.name] += 1
        s = self.stats
        snap = {
            "running": len(running),
            "running_by_mode": by_mode,
            "kv_slots_used": len(running),
            "kv_slots_total": self.config.max_batch_size,
            "kv_tokens_used": sum(r.seq.kv.length for r in running),
            "kv_tokens_total": self.config.max_batch_size * self.config.max_seq_len,
            "forward_passes": s.forward_passes,
            "generated_tokens": s.generated_tokens,
            "finished_requests": s.finished_requests,
            "aborted_requests": s.aborted_requests,
            "rejected_requests": s.rejected_requests,
            "tokens_per_forward": s.tokens_per_forward.snapshot(),
            "accepted_length": s.accepted_length.snapshot(),
            "step_seconds": s.step_seconds.snapshot(),
            "last_step_seconds": s.last_step_seconds,
            "waiting": len(self.scheduler.waiting),
        }
        return snap


def request_stats(seq) -> dict:
    return {
        "mode": seq.params.mode,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": len(seq.output),
        "forward_passes": seq.forward_passes,
        "tokens_per_forward": len(seq.output) / max(seq.forward_passes, 1),
        "accepted_lengths": list(seq.accepted_lengths),
        "draft_blocks": list(seq.draft_blocks),
        "denoise_passes": list(seq.denoise_passes),
    }
