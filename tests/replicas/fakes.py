"""Fakes for running `NLDReplica` in-process, without Ray or weights.

`FakeAsyncEngine` has the engine API a replica uses (`outputs.StreamingFrontend` plus settings,
stats and health): each request produces `tokens_per_step` ids per "step", one step per event
loop turn, taken in order from `script` (the tokens of a Python snippet, repeated); knobs make submissions fail (`reject`), the
engine die mid-request (`die_after_steps`), or report itself unhealthy (`problem`). It records
what it was asked. `RecordingMetrics` records every metric call. `asgi(replica)` serves the
replica's `__call__` as an ASGI app for httpx.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import Request

from replicas.engine.config import load_model_config
from replicas.engine.engine_config import EngineConfig
from replicas.engine.errors import EngineError
from replicas.engine.outputs import StreamChunk, StreamingFrontend
from replicas.text import TextCodec

SNIPPET = "def main():\n    for name in sorted(os.listdir(path)):\n        print(name, len(name))\n    return 0\n"


class FakeAsyncEngine(StreamingFrontend):
    def __init__(self, model_dir, tokens_per_step: int = 1, step_s: float = 0.0) -> None:
        super().__init__()
        self.step_s = step_s  # each request's step sleeps this long (0: yield once)
        self.model_config = load_model_config(model_dir)
        self.config = EngineConfig()
        self.max_block_length = self.model_config.block_size
        self.has_lora = True
        self.has_denoise_lora = False
        self.tokens_per_step = tokens_per_step
        self.script = TextCodec.from_dir(model_dir).encode(SNIPPET) * 8
        self.reject: Exception | None = None
        self.die_after_steps: int | None = None
        self.problem: str | None = None
        self.submitted: list[tuple[str, list[int], object]] = []
        self.aborted: list[str] = []
        self.downgrades: list[bool] = []
        self.running: set[str] = set()

    def _submit(self, request_id, prompt_ids, params) -> None:
        if self.reject is not None:
            raise self.reject
        self.submitted.append((request_id, prompt_ids, params))
        self.running.add(request_id)
        asyncio.get_running_loop().create_task(self._run(request_id, params))

    async def _run(self, rid: str, params) -> None:
        made, steps = 0, 0
        while rid in self.running:
            await asyncio.sleep(self.step_s)
            if self.die_after_steps is not None and steps >= self.die_after_steps:
                self._router.fail_all(EngineError("the engine process exited with code -9"))
                return
            n = min(self.tokens_per_step, params.max_new_tokens - made)
            ids = self.script[made:made + n]
            made, steps = made + n, steps + 1
            done = made >= params.max_new_tokens
            algorithm = (params.spec_algorithm or self.config.spec_algorithm) if params.mode == "self_spec" else None
            stats = {"mode": params.mode, "prompt_tokens": 1, "forward_passes": steps, "accepted_lengths": [],
                     "denoise_passes": [], "spec_algorithm": algorithm} if done else None
            self._deliver([StreamChunk(rid, ids, finish_reason="length" if done else None, stats=stats,
                                       forward_passes=steps, mode=params.mode)])
            if done:
                self.running.discard(rid)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.running.discard(request_id)

    def update_draft_tiers(self, tiers) -> None:
        self.config = EngineConfig(draft_tiers=tuple(tiers))

    async def downgrade_self_spec(self, on: bool) -> list[str]:
        self.downgrades.append(on)
        return sorted(self.running)

    def stats(self) -> dict:
        return {"running": len(self.running)}

    async def fresh_stats(self) -> dict:
        return self.stats()

    def health(self) -> str | None:
        return self.problem


@dataclass
class RecordingMetrics:
    calls: list[tuple] = field(default_factory=list)

    def observe_request(self, *args) -> None:
        self.calls.append(("request", *args))

    def observe_first_token(self, *args) -> None:
        self.calls.append(("first_token", *args))

    def observe_inter_token(self, *args) -> None:
        self.calls.append(("inter_token", *args))

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


def asgi(replica):
    async def app(scope, receive, send) -> None:
        response = await replica(Request(scope, receive))
        await response(scope, receive, send)
    return app
