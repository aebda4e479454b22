"""Push the policy's engine settings to the replicas as soon as they change.

Contract: `EngineSettingsPusher(read, client, interval_s=..., on_push=...)`. `start()` runs one
asyncio task that calls `read()` (the policy's current `EngineSettings`, or None) every
`interval_s` and, when the value differs from the last one a replica accepted, POSTs it with
`ReplicaClient.update_engine`. A failed push is logged once per distinct error and retried
after `retry_s`. `on_push(result)` ("ok" or "error") feeds the gateway's metrics. `stop()`
cancels the task and waits for it.

Why: every completion request also carries the settings, so replicas follow the policy with the
next request anyway. But when the policy moves to its loaded level while every client waits
on a self_spec response (a closed loop, a burst that arrived before the switch), no next
request comes until one of those finishes; the push moves them to AR at once. The ingress routes
one push to one replica, which publishes it on the application's settings board
(`replicas/settings_board.py`): every replica applies it within a round trip. A policy has no
settings to push until it has evaluated fresh signals once (`read()` is None until then).
Non-goals: choosing the settings (the policy), reaching each replica individually.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from replicas.wire import EngineSettings

from .replica_client import ReplicaClient, ReplicaError

log = logging.getLogger("gateway.engine_push")


class EngineSettingsPusher:
    def __init__(self, read: Callable[[], EngineSettings | None], client: ReplicaClient, *,
                 interval_s: float = 0.1, retry_s: float = 1.0,
                 on_push: Callable[[str], None] | None = None) -> None:
        if interval_s <= 0 or retry_s <= 0:
            raise ValueError("interval_s and retry_s must be > 0")
        self.read, self.client = read, client
        self.interval_s, self.retry_s = interval_s, retry_s
        self.on_push = on_push
        self.pushed: EngineSettings | None = None  # what a replica last accepted
        self._last_error: str | None = None
        self._task: asyncio.Task | None = None

    async def push_if_changed(self) -> bool:
        """One check: push when the settings changed. False when a push failed."""
        settings = self.read()
        if settings is None or settings == self.pushed:
            return True
        try:
            await self.client.update_engine(settings)
        except ReplicaError as e:
            message = f"{e.status} {e.info.message}"
            if message != self._last_error:
                log.warning("pushing engine settings to the replicas failed (retrying): %s", message)
                self._last_error = message
            self._report("error")
            return False
        self.pushed, self._last_error = settings, None
        self._report("ok")
        return True

    def _report(self, result: str) -> None:
        if self.on_push is not None:
            self.on_push(result)

    async def _loop(self) -> None:
        while True:
            ok = await self.push_if_changed()
            await asyncio.sleep(self.interval_s if ok else self.retry_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="engine-settings-push")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
