"""`BatchEngine`: many requests, each in its own mode, advanced by ONE batched forward per step.
It is the engine's only decode loop (`Engine.generate` runs a one-sequence `BatchEngine`).

Contract: `submit` validates a request (ValueError naming the field) and queues it
(EngineOverloaded when the queue is full); `abort`, `set_mode`, `update_draft_tiers` and
`downgrade_self_spec` may be called from any thread and take effect at the start of the next
step. `step()` = apply control (aborts, switches), prepare the running rows (switches and draft
tiers at cycle boundaries), schedule (a `StepPlan` under the token budget, with KV blocks reserved),
run the plan through the runner as one forward, advance every row; it returns a `StreamChunk`
per request that made tokens final or finished. One error boundary surrounds the whole step:
a request whose own prepare or advance raises ends alone, a failure anywhere else (scheduling,
the forward) ends the requests of that step; either way with finish_reason "error", their slots
and blocks freed, and the engine keeps serving. `step()` never raises.
Non-goals: threads and asyncio (see `async_engine`), tokenisation.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from .block_manager import BlockManager
from .capacity import num_kv_blocks
from .cost_model import CostModel, LoadPeak
from .engine_config import EngineConfig
from .kv_cache import KVCache
from .outputs import StreamChunk
from .params import MODES, DecodeParams, tokens_per_forward
from .running import Running
from .scheduler import Scheduler, StepPlan
from .stats import EngineStats, engine_snapshot
from .threads import step_threads

if TYPE_CHECKING:  # the engine module builds batch engines (`load_batch_engine`), so no import back
    from .engine import Engine


class BatchEngine:
    def __init__(self, engine: "Engine", config: EngineConfig) -> None:
        self.engine = engine
        self.config = config
        cfg = engine.config
        self.cache = KVCache(
            num_layers=cfg.num_hidden_layers, num_slots=config.max_batch_size, num_kv_heads=cfg.num_key_value_heads,
            max_len=config.max_seq_len, head_dim=cfg.head_dim, block_size=config.kv_block_size,
            num_blocks=num_kv_blocks(engine.model, config), device=engine.device, dtype=engine.dtype,
        )
        self.runner = engine.runner_cls(engine.model, self.cache)
        self._parallel_min_tokens = config.parallel_min_tokens if engine.device.type == "cpu" else 0
        self._new_scheduler()
        self.stats = EngineStats()
        self.costs = CostModel()  # measured step costs and mode yields (exported in the stats)
        self._unmeasured: tuple | None = None  # (shape, start, realized) of a step charged when the next begins
        self._load_peak = LoadPeak()  # the load realized samples are filed under
        self._lock = threading.RLock()
        self._aborts: set[str] = set()
        self._abort_notices: list[str] = []  # waiting requests already removed; report next step
        self._switches: dict[str, str] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()

    def _new_scheduler(self) -> None:
        if self.cache.paged:
            self.cache.tables.fill_(self.cache.scratch_block)
        self.blocks = BlockManager(self.cache, enable_prefix_caching=self.config.enable_prefix_caching,
                                   watermark=self.config.kv_watermark)
        self.scheduler = Scheduler(self.config, self.blocks)

    # ---- thread-safe control -------------------------------------------------------------
    def submit(self, prompt_ids, params: DecodeParams | None = None, request_id: str | None = None) -> str:
        params = self.engine.check_request(list(prompt_ids), params or DecodeParams(), self.config)
        need = self.engine.positions_needed(len(prompt_ids), params.max_new_tokens, params)
        ahead = (f"one quadratic self-spec cycle ({self.engine.lookahead(params)} columns)"
                 if params.spec_algorithm == "quadratic" else f"one block ({params.block_length})")
        if need > self.config.max_seq_len:
            raise ValueError(
                f"max_new_tokens: prompt ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) + "
                f"{ahead} exceeds the engine's max_seq_len ({self.config.max_seq_len})"
            )
        if self.blocks.blocks_for(need) > self.cache.num_blocks:
            raise ValueError(
                f"max_new_tokens: prompt ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) + "
                f"{ahead} need {self.blocks.blocks_for(need)} KV blocks; the pool has {self.cache.num_blocks}")
        rid = request_id or f"req-{next(self._ids)}"
        row = Running(self.engine.new_sequence(prompt_ids, params, slot=-1, request_id=rid))
        with self._lock:
            if self.scheduler.find(rid) is not None:
                raise ValueError(f"request_id: {rid!r} is already in flight")
            row.seq.arrival = next(self._arrivals)
            try:
                self.scheduler.add(row)
            except Exception:
                self.stats.rejected_requests += 1
                raise
        return rid

    def abort(self, request_id: str) -> None:
        """A waiting request leaves the queue at once; a running one frees its slot next step."""
        with self._lock:
            if any(r.request_id == request_id for r in self.scheduler.waiting):
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
            if self.scheduler.find(request_id) is None:
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
            for row in [*self.scheduler.running.values(), *self.scheduler.waiting]:
                rid, seq = row.request_id, row.seq
                current = self._switches.get(rid) or row.switch_to or seq.params.mode
                if on and current == "self_spec":
                    self._switches[rid] = "ar"
                    seq.downgraded = True
                    moved.append(rid)
                elif not on and seq.downgraded:
                    self._switches[rid] = "self_spec"
                    seq.downgraded = False
                    moved.append(rid)
            return moved

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.scheduler.waiting or self.scheduler.running or self._aborts or self._abort_notices
                        or self._switches)

    def stats_snapshot(self) -> dict:
        """Counters as of the last completed step (computed on demand, under the engine lock)."""
        with self._lock:
            return engine_snapshot(self)

    # ---- the loop body -------------------------------------------------------------------
    def step(self) -> list[StreamChunk]:
        t0 = time.perf_counter()
        if self._unmeasured is not None:  # the previous step ran until now
            shape, start, realized = self._unmeasured
            self._unmeasured = None
            self._charge(shape, realized, t0 - start)
        out: list[StreamChunk] = []
        plan: StepPlan | None = None
        ok = False
        try:
            with self._lock:
                self._apply_control(out)
                self._prepare(out)
                plan = self.scheduler.schedule()
                load = self._load_mode(t0)
            if plan.rows:
                slots = [row.seq.kv.slot for row in plan.rows]
                with step_threads(plan.tokens, self._parallel_min_tokens):
                    logits, greedy = self.runner.run_with_greedy(list(zip(slots, plan.passes)))
                made = self._advance(plan, logits, greedy, out)
                ok = True
        except Exception as e:  # the error boundary: end this step's requests, keep serving
            rows = plan.rows if plan is not None else list(self.scheduler.running.values())
            out.extend(self._fail(rows, e))
        s = self.stats
        s.last_step_seconds = time.perf_counter() - t0
        s.last_step_tokens = plan.tokens if plan is not None else 0
        if plan is not None and plan.rows:
            s.step_seconds.observe(s.last_step_seconds)
            s.scheduled_tokens.observe(s.last_step_tokens)
            if ok:  # a failed step's time says nothing about the model's cost
                self._measure(plan, t0, (*load, made) if load is not None else None)
        return out

    def _load_mode(self, now: float) -> tuple[str, int] | None:
        """(mode, load) when every decoding request runs one mode, else None; the load is the
        running count held over request turnover (`LoadPeak`, updated at every step)."""
        running = self.scheduler.running.values()
        load = self._load_peak.update(now, len(running))
        modes = {r.mode_name for r in running if not r.prefilling}
        return (modes.pop(), load) if len(modes) == 1 else None

    def _measure(self, plan: StepPlan, t0: float, realized: tuple | None) -> None:
        """Feed the cost model. A step followed at once by the next one (the loop stays busy) is
        charged the time from its start to the next step's start, so what the loop does between
        steps (sending the step's chunks, stats, control) counts; the last step before the loop
        idles is charged its own time. `realized`: (mode, running, tokens made) of a one-mode step."""
        shape = (len(plan.rows), plan.tokens, sum(len(p.tokens) if p.all_logits else 1 for p in plan.passes))
        if self.has_work():
            self._unmeasured = (shape, t0, realized)
        else:
            self._charge(shape, realized, self.stats.last_step_seconds)

    def _charge(self, shape: tuple, realized: tuple | None, seconds: float) -> None:
        self.costs.steps.observe(*shape, seconds)
        if realized is not None:
            self.costs.realized.observe(*realized, seconds)

    def _apply_control(self, out: list[StreamChunk]) -> None:
        sched = self.scheduler
        aborts, self._aborts = self._aborts, set()
        notices, self._abort_notices = self._abort_notices, []
        out.extend(StreamChunk(rid, [], finish_reason="abort") for rid in notices)
        switches, self._switches = self._switches, {}
        for rid in aborts:
            if sched.remove(rid) is not None:
                self.stats.aborted_requests += 1
                out.append(StreamChunk(rid, [], finish_reason="abort"))
        for rid, mode in switches.items():
            row = sched.find(rid)
            if row is not None:
                row.switch_to = mode

    def _prepare(self, out: list[StreamChunk]) -> None:
        running = len(self.scheduler.running)
        for row in list(self.scheduler.running.values()):
            try:
                row.prepare(self.config, running)
            except Exception as e:
                out.extend(self._fail([row], e))

    def _advance(self, plan: StepPlan, logits, greedy: list[int], out: list[StreamChunk]) -> int:
        """Each row consumes its logits (and the batch's greedy pick for it); returns the tokens the step made."""
        self.stats.forward_passes += 1
        made = 0
        for row, p, lg, top in zip(plan.rows, plan.passes, logits, greedy):
            seq = row.seq
            try:
                was_prefilling = row.prefilling
                new = row.advance(p, lg, top)
                if was_prefilling:
                    row.published = self.blocks.register(seq.kv, row.prefix_keys, row.published)
                if row.at_boundary:
                    self.blocks.trim(seq.kv)
            except Exception as e:
                out.extend(self._fail([row], e))
                continue
            self.stats.generated_tokens += len(new)
            made += len(new)
            for c, block in zip(seq.accepted_lengths[row.seen_accepts:], seq.draft_blocks[row.seen_accepts:]):
                self.stats.accepted_length.observe(c)
                self.costs.yields.observe_cycle(block, c)
            row.seen_accepts = len(seq.accepted_lengths)
            for passes in seq.denoise_passes[row.seen_blocks:]:
                self.costs.yields.observe_block(seq.params.block_length, passes)
            row.seen_blocks = len(seq.denoise_passes)
            if seq.finished:
                with self._lock:
                    self.scheduler.remove(seq.request_id)
                self.stats.finished_requests += 1
                self.stats.tokens_per_forward.observe(tokens_per_forward(len(seq.output), seq.forward_passes))
                out.append(StreamChunk(seq.request_id, new, finish_reason=seq.finish_reason,
                                       stats=request_stats(seq), forward_passes=seq.forward_passes,
                                       mode=seq.params.mode))
            elif new:
                out.append(StreamChunk(seq.request_id, new, forward_passes=seq.forward_passes, mode=seq.params.mode))
        return made

    def _fail(self, rows: list[Running], error: Exception) -> list[StreamChunk]:
        """End `rows` that are still in flight with finish_reason "error"; free their blocks."""
        message = f"{type(error).__name__}: {error}"
        with self._lock:
            try:
                ended = [row for row in rows if self.scheduler.remove(row.request_id) is not None]
            except Exception:  # the engine's own state is broken: end every request, start clean
                ended = [*self.scheduler.running.values(), *self.scheduler.waiting]
                self._new_scheduler()
            self.stats.failed_requests += len(ended)
        return [StreamChunk(row.request_id, [], finish_reason="error", error=message,
                            forward_passes=row.seq.forward_passes, mode=row.seq.params.mode) for row in ended]


def request_stats(seq) -> dict:
    return {
        "mode": seq.params.mode,
        "prompt_tokens": len(seq.prompt_ids),
        "completion_tokens": len(seq.output),
        "forward_passes": seq.forward_passes,
        "tokens_per_forward": tokens_per_forward(len(seq.output), seq.forward_passes),
        # the self-spec algorithm that ran (None when no self-spec cycle ran)
        "spec_algorithm": seq.params.spec_algorithm if seq.params.mode == "self_spec" or seq.draft_blocks else None,
        "accepted_lengths": list(seq.accepted_lengths),
        "draft_blocks": list(seq.draft_blocks),
        "denoise_passes": list(seq.denoise_passes),
    }
