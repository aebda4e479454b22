"""Engine settings that reach every replica: one small Ray actor per application, long-polled.

Contract: `SettingsBoard` (a Ray actor class; `board_for(app_name)` gets or creates the
application's, named `nld-settings:<app>` and detached, so it outlives any one replica) keeps
the newest `EngineSettings` dict it was given, with a version number. `publish(settings)`
stores it when it is not older (`since`) than the one held, and returns (version, settings
held); `wait_newer(version, timeout_s)` returns as soon as the board holds a newer version
(or at the timeout, with what it holds). A replica publishes what a gateway POSTs to its
`/engine` and what requests carry, and a watcher task on every replica long-polls the board
and applies what it finds: the ingress reaches one replica per call, the board reaches all of
them within a round trip, and a replica that starts later (autoscaling, a replacement) applies
the fleet's settings before its first request. Non-goals: deciding settings (the policy),
persistence across Ray clusters.
"""

from __future__ import annotations

import asyncio


class SettingsBoard:
    def __init__(self) -> None:
        self._version = 0
        self._settings: dict | None = None
        self._changed = asyncio.Condition()

    async def publish(self, settings: dict) -> tuple[int, dict | None]:
        held = self._settings
        since, held_since = settings.get("since"), (held or {}).get("since")
        if held is None or since is None or held_since is None or since >= held_since:
            if settings != held:
                self._settings = settings
                self._version += 1
                async with self._changed:
                    self._changed.notify_all()
        return self._version, self._settings

    async def wait_newer(self, version: int, timeout_s: float) -> tuple[int, dict | None]:
        if self._version <= version:
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait_for(lambda: self._version > version), timeout_s)
            except TimeoutError:
                pass
        return self._version, self._settings


def board_for(app_name: str):
    """The application's board (created by the first replica that asks)."""
    import ray

    actor = ray.remote(SettingsBoard).options(name=f"nld-settings:{app_name}", get_if_exists=True,
                                              lifetime="detached", num_cpus=0, max_concurrency=1000)
    return actor.remote()
