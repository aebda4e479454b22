"""API-key authentication: Bearer keys compared in constant time, loaded from a file or a Secret.

Contract: `ApiKeyAuth(keys).check(authorization_header) -> bool` compares the presented key
with EVERY configured key through `hmac.compare_digest` on SHA-256 digests, so the time taken
depends neither on where a key differs nor on its length nor on which key matched. Keys are
never logged or put in error messages. `load_api_keys(path)` reads either a file (one key
per line; blank lines and `#` comments skipped) or a directory (a Kubernetes Secret mount:
each regular file holds one key; `..data`-style entries and dot files are skipped); only the
CLI calls it. `replace(keys)` swaps the accepted keys in place (a running app's middleware holds
this object); `gateway.key_reload.KeyFileWatcher` calls it when the mounted key file changes.
Non-goals: scopes, per-key limits.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeyAuth:
    def __init__(self, keys: frozenset[str] | set[str]) -> None:
        self._digests = tuple(_digest(k) for k in sorted(keys))

    def replace(self, keys: frozenset[str] | set[str]) -> bool:
        """Accept exactly `keys` from now on; True when the set changed. Raises ValueError on an
        empty set or a key with surrounding whitespace (the previous keys then stay)."""
        if not keys or any(not k or k != k.strip() for k in keys):
            raise ValueError("api keys must be non-empty and carry no surrounding whitespace")
        digests = tuple(_digest(k) for k in sorted(keys))
        if sorted(digests) == sorted(self._digests):
            return False
        self._digests = digests  # one assignment: a concurrent check sees the old or the new tuple
        return True

    def __repr__(self) -> str:  # never show keys
        return f"ApiKeyAuth({len(self._digests)} keys)"

    def check(self, authorization: str | None) -> bool:
        """True when `authorization` is `Bearer <key>` with a configured key."""
        if not authorization:
            return False
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented_digest = _digest(presented.strip())
        ok = False
        for d in self._digests:  # no early exit
            ok |= hmac.compare_digest(d, presented_digest)
        return ok


def load_api_keys(path: str | Path) -> frozenset[str]:
    """Keys from a file (one per line) or a Secret mount directory (one per file)."""
    p = Path(path)
    if p.is_dir():
        texts = [f.read_text() for f in sorted(p.iterdir()) if not f.name.startswith(".") and f.is_file()]
        keys = {t.strip() for t in texts}
    elif p.is_file():
        keys = {line.strip() for line in p.read_text().splitlines() if not line.strip().startswith("#")}
    else:
        raise ValueError(f"api key path {str(p)!r} is neither a file nor a directory")
    keys.discard("")
    if not keys:
        raise ValueError(f"api key path {str(p)!r} holds no keys")
    return frozenset(keys)
