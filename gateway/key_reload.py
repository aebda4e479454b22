"""API-key rotation without a restart: re-read the key file when it changes.

Contract: `KeyFileWatcher(auth, load, interval_s)` owns no path: `load()` returns the current
key set (the CLI passes `lambda: gateway.auth.load_api_keys(path)`), so nothing here reads the
environment. `check()` loads once and, when the set differs, swaps it into `auth`
(`ApiKeyAuth.replace`) and returns True; a load that fails (file missing while Kubernetes swaps
a Secret mount's `..data` link, an empty file, unreadable) keeps the previous keys, logs one
line without any key and returns False. `run()` calls `check()` every `interval_s` until
cancelled. Reading the whole (small) file each time, rather than watching a modification time,
follows a Kubernetes Secret mount, whose update swaps a symlink and leaves file times alone.
Non-goals: inotify, per-key expiry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .auth import ApiKeyAuth

log = logging.getLogger("gateway.auth")


class KeyFileWatcher:
    def __init__(self, auth: ApiKeyAuth, load: Callable[[], frozenset[str]], interval_s: float = 10.0) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self.auth, self.load, self.interval_s = auth, load, interval_s
        self.reloads = 0  # successful swaps
        self.last_error: str | None = None

    def check(self) -> bool:
        """Load the keys once; True when they changed and were swapped in."""
        try:
            keys = self.load()
            changed = self.auth.replace(keys)
        except (OSError, ValueError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if message != self.last_error:  # once per distinct problem, not every interval
                log.warning("API keys not reloaded, keeping the previous ones: %s", message)
            self.last_error = message
            return False
        self.last_error = None
        if changed:
            self.reloads += 1
            log.info("API keys reloaded: %d keys", len(keys))
        return changed

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check()
