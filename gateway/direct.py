"""Direct routes: the gateway sends requests straight to the replicas' own HTTP ports.

Behind HAProxy, each replica serves HTTP itself (Ray Serve's direct ingress) and names its
address on every answer (`replicas.wire.REPLICA_HEADER`). Sending there skips one loopback or
network hop per request and per streamed event (HAProxy's own CPU and the kernel's work for the
extra connection; docs/PERFORMANCE.md, "The gateway routes to the replicas itself").

Contract of `DirectRoutes(ingress, ...)`:
- `learn(header, via_ingress=True)`: a `REPLICA_HEADER` value from any answer adds that replica,
  or moves a known one to a new address, and checks it at once: it gets requests only once its
  health check passed, so a gateway that cannot reach the replicas' ports (a NetworkPolicy, a
  firewall) keeps every request on the ingress and says so once per replica. At most
  `max_replicas` are kept. The header also names the replica's Ray cluster: an answer through
  the ingress from another cluster than the one known (KubeRay's `NewCluster` upgrade switched
  its Service to a new cluster) makes that cluster the current one and forgets every replica of
  the old one at once, which keeps serving what it has until KubeRay deletes it; replicas of
  another cluster are never learned from a direct answer.
- `pick(mode)`: the healthy replica with the fewest requests this gateway has in flight there
  (ties rotate); with `pack_ar` N > 0, a request running `ar` goes instead to the busiest healthy
  replica below N in flight (`gateway.placement`). None when none is known healthy: the caller
  then goes through the ingress.
  `begin(r)` / `end(r)` count a request in flight; `failed(r)` (a connection failure or an
  `engine_dead` answer) marks the replica unhealthy until its health check passes again.
- `start()` (on the running loop; idempotent) runs one task that, every `health_interval_s`,
  GETs each known replica's `/-/healthz` (Ray Serve's data-plane check for external load
  balancers: 200, or 503 `DRAINING` from the moment a replica starts its graceful shutdown, which
  keeps it reachable for the ingress's drain period) and, every `discover_interval_s`, one
  `GET /health` through the ingress, whose answer names the replica the ingress chose (HAProxy
  balances it like any request, so new replicas are found within a few rounds). A replica whose
  check has not passed for `forget_after_s` is forgotten. `aclose()` stops the task and closes
  the replicas' connection pools.
- `snapshot()`: the known replicas (id, address, healthy, in flight) for `/stats`-style views;
  `healthy_count()` for the gateway's gauge.
- `channel(r)`: the replica's stream channel (`gateway.channel`) when it is open, else None,
  opening one for the next streams (with `stream_channels`; after a channel that never opened,
  not again for `channel_idle_s`). Each round closes the channels no stream used for
  `channel_idle_s` and those of replicas failing their check once their streams ended (a
  channel is a request that a draining replica's graceful shutdown would wait for).
  `open_channels()` for the gateway's gauge.

Replicas that name no address (Serve's Python proxy in front, `advertise_address: false`) are
never learned, and every request goes through the ingress: the same behaviour as without this.
Non-goals: Ray Serve's own routing decisions (queue lengths it sees, locality), retries (the
replica client retries a failed direct attempt through the ingress), membership from Ray's API
(the gateway never imports Ray).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from replicas.wire import REPLICA_HEADER, host_port, parse_replica_address

from .channel import ReplicaChannel
from .placement import choose
from .upstream import UpstreamConnectionError, UpstreamPool, UpstreamResponse, UpstreamTimeout

log = logging.getLogger("gateway.direct")

HEALTH_PATH = "/-/healthz"  # Ray Serve's data-plane health check on a direct-ingress replica's port


class DirectReplica:
    """One replica the gateway may call directly: its address, pool and state."""
    __slots__ = ("replica_id", "host", "port", "pool", "inflight", "passed", "failing_since", "channel")

    def __init__(self, replica_id: str, host: str, port: int, pool: UpstreamPool, since: float) -> None:
        self.replica_id, self.host, self.port, self.pool = replica_id, host, port, pool
        self.inflight = 0
        self.channel: ReplicaChannel | None = None  # its stream channel (`gateway.channel`), once opened
        self.passed = False  # a health check has passed once
        self.failing_since: float | None = since  # learned, or first failure since it last passed

    @property
    def healthy(self) -> bool:
        """Its last health check passed and nothing failed since (never, before the first pass)."""
        return self.failing_since is None

    @property
    def address(self) -> str:
        return host_port(self.host, self.port)


class DirectRoutes:
    def __init__(self, ingress: UpstreamPool, *, connect_timeout_s: float = 1.0, health_interval_s: float = 0.5,
                 discover_interval_s: float = 1.0, health_timeout_s: float = 1.0, forget_after_s: float = 30.0,
                 max_replicas: int = 256, max_idle: int = 256, stream_channels: bool = True,
                 channel_idle_s: float = 2.0, pack_ar: int = 0,
                 pool_factory: Callable[[str], UpstreamPool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if min(health_interval_s, discover_interval_s, health_timeout_s, forget_after_s) <= 0 or max_replicas < 1:
            raise ValueError("direct routes: intervals, timeouts and max_replicas must be > 0")
        if pack_ar < 0:
            raise ValueError(f"direct routes: pack_ar must be >= 0 (0: spread), got {pack_ar}")
        self.pack_ar = pack_ar
        self.ingress = ingress
        self.health_interval_s, self.discover_interval_s = health_interval_s, discover_interval_s
        self.health_timeout_s, self.forget_after_s = health_timeout_s, forget_after_s
        self.max_replicas = max_replicas
        self.stream_channels, self.channel_idle_s = stream_channels, channel_idle_s
        self._leaving: list[ReplicaChannel] = []  # channels of retired replicas, closed once their streams end
        self._pool_factory = pool_factory or (lambda url: UpstreamPool(url, connect_timeout_s=connect_timeout_s,
                                                                       max_idle=max_idle))
        self._clock = clock
        self._replicas: dict[str, DirectReplica] = {}
        self._turn = 0
        self._task: asyncio.Task | None = None
        self._retired: list[UpstreamPool] = []  # pools of forgotten or moved replicas, closed by the task
        self.cluster: str | None = None  # the Ray cluster the ingress answers from (last seen)
        self._checks: set[asyncio.Task] = set()  # first checks of replicas just learned
        self._warned: set[str] = set()  # replicas said to be unreachable directly (once each)

    def learn(self, header: str | None, via_ingress: bool = True) -> None:
        parsed = parse_replica_address(header)
        if parsed is None:
            return
        rid, host, port, cluster = parsed
        if cluster != self.cluster:
            if not via_ingress:
                return  # a stale direct answer from a cluster the ingress left
            self._switch_cluster(cluster)
        known = self._replicas.get(rid)
        if known is not None and (known.host, known.port) == (host, port):
            return
        if known is None and len(self._replicas) >= self.max_replicas:
            return
        # the ingress's route prefix too: a replica under a prefix expects it on its own port as well
        pool = self._pool_factory(f"http://{host_port(host, port)}{self.ingress.prefix}")
        replica = DirectReplica(rid, host, port, pool, self._clock())
        if known is not None:
            replica.inflight = known.inflight
            self._retire(known)
        self._replicas[rid] = replica
        try:  # its first check now, not at the next period
            task = asyncio.get_running_loop().create_task(self.check(replica))
        except RuntimeError:
            return  # no loop (a synchronous caller): the periodic check comes
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    def _switch_cluster(self, cluster: str | None) -> None:
        """The ingress answers from another Ray cluster now: forget every replica of the old one."""
        if self._replicas:
            log.info("the ingress answers from Ray cluster %s (was %s): forgetting %d replicas of the old one",
                     cluster, self.cluster, len(self._replicas))
        for r in self._replicas.values():
            self._retire(r)
        self._replicas.clear()
        self.cluster = cluster

    def _retire(self, replica: DirectReplica) -> None:
        """Close the replica's pool (its in-flight answers keep their connections) and its channel
        once the streams it carries ended (a forgotten cluster finishes what it has)."""
        self._retired.append(replica.pool)
        if replica.channel is not None:
            self._leaving.append(replica.channel)
            replica.channel = None

    def channel(self, replica: DirectReplica) -> ReplicaChannel | None:
        """The replica's stream channel when it is ready; else None, and one is opened for the
        next streams (not more often than every `channel_idle_s` after one that never opened)."""
        if not self.stream_channels:
            return None
        ch = replica.channel
        if ch is not None and ch.ready:
            return ch
        if ch is None or (ch.closed and (ch.channel_id is not None or
                                         asyncio.get_running_loop().time() - ch.closed_at >= self.channel_idle_s)):
            replica.channel = ReplicaChannel(replica.pool, open_timeout_s=self.health_timeout_s).start()
        return None

    def open_channels(self) -> int:
        return sum(r.channel is not None and r.channel.ready for r in self._replicas.values())

    async def _close_idle_channels(self) -> None:
        """Close channels no stream used for `channel_idle_s`, or whose replica is not healthy
        (draining: its graceful shutdown waits for open requests, a channel among them)."""
        now = asyncio.get_running_loop().time()
        closing = [ch for ch in self._leaving if len(ch) == 0]
        self._leaving = [ch for ch in self._leaving if len(ch)]
        for r in self._replicas.values():
            ch = r.channel
            if ch is not None and not ch.closed and len(ch) == 0 and (
                    not r.healthy or ch.idle_for(now) >= self.channel_idle_s):
                closing.append(ch)
                r.channel = None
        for ch in closing:
            await ch.aclose()

    def pick(self, mode: str | None = None) -> DirectReplica | None:
        replicas = list(self._replicas.values())
        if not replicas:
            return None
        self._turn = (self._turn + 1) % len(replicas)
        return choose(replicas, self._turn, self.pack_ar if mode == "ar" else 0)

    @staticmethod
    def begin(replica: DirectReplica) -> None:
        replica.inflight += 1

    @staticmethod
    def end(replica: DirectReplica) -> None:
        replica.inflight -= 1

    def failed(self, replica: DirectReplica) -> None:
        if replica.healthy:
            log.warning("replica %s at %s failed; routing around it until its health check passes",
                        replica.replica_id, replica.address)
            replica.failing_since = self._clock()

    def healthy_count(self) -> int:
        return sum(r.healthy for r in self._replicas.values())

    def snapshot(self) -> list[dict]:
        return [{"replica_id": r.replica_id, "address": r.address, "healthy": r.healthy, "inflight": r.inflight}
                for r in self._replicas.values()]

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="direct-routes")

    async def _run(self) -> None:
        next_discovery = 0.0
        while True:
            try:
                now = self._clock()
                if now >= next_discovery:
                    next_discovery = now + self.discover_interval_s
                    await self.discover()
                await self.check_all()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the checks must go on: a stale table would keep drained replicas
                log.exception("direct routes: a discovery or health round failed; next round as usual")
            await asyncio.sleep(self.health_interval_s)

    async def _probe(self, pool: UpstreamPool, path: str, absolute: bool = False) -> UpstreamResponse | None:
        """One GET read to its end within `health_timeout_s`; None when it failed or was slow."""
        try:
            async with asyncio.timeout(self.health_timeout_s):
                response = await pool.request("GET", path, timeout=self.health_timeout_s, absolute=absolute)
                try:
                    await response.read()
                finally:
                    await response.aclose()
        except (TimeoutError, UpstreamConnectionError, UpstreamTimeout):
            return None
        return response

    async def discover(self) -> None:
        """One GET /health through the ingress: learn the replica that answers it."""
        response = await self._probe(self.ingress, "/health")
        if response is not None:
            self.learn(response.headers.get(REPLICA_HEADER))

    async def check_all(self) -> None:
        replicas = list(self._replicas.values())
        if replicas:
            await asyncio.gather(*(self.check(r) for r in replicas))
        now = self._clock()
        for r in replicas:
            if r.failing_since is not None and now - r.failing_since >= self.forget_after_s and r.inflight == 0:
                if self._replicas.get(r.replica_id) is r:
                    del self._replicas[r.replica_id]
                    log.info("forgot replica %s at %s (no passing health check for %.0f s)", r.replica_id,
                             r.address, now - r.failing_since)
                self._retire(r)
        await self._close_idle_channels()
        while self._retired:
            await self._retired.pop().aclose()

    async def check(self, replica: DirectReplica) -> bool:
        """GET `/-/healthz` on the replica's own port: 200 is healthy; anything else (503 DRAINING
        or UNHEALTHY, refused, slow) is not."""
        # Serve answers it at the port's root, whatever the application's route prefix
        response = await self._probe(replica.pool, HEALTH_PATH, absolute=True)
        ok = response is not None and response.status == 200
        if ok:
            if not replica.passed:
                log.info("direct route to replica %s at %s", replica.replica_id, replica.address)
            elif not replica.healthy:
                log.info("replica %s at %s passes its health check again", replica.replica_id, replica.address)
            replica.passed, replica.failing_since = True, None
        elif not replica.passed:
            self._unreachable(replica)
        else:
            self.failed(replica)
        return ok

    def _unreachable(self, replica: DirectReplica) -> None:
        """A replica learned but never passing its check: say so once, and leave it to the ingress."""
        if replica.replica_id not in self._warned and len(self._warned) < self.max_replicas:
            self._warned.add(replica.replica_id)
            log.warning("replica %s at %s does not answer its health check on its own port (a NetworkPolicy, a "
                        "firewall, or it is stopping); its requests go through the ingress", replica.replica_id,
                        replica.address)

    async def aclose(self) -> None:
        for task in list(self._checks):
            task.cancel()
        if self._checks:
            await asyncio.gather(*self._checks, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)  # its end, whatever it was
            self._task = None
        for r in list(self._replicas.values()):
            self._retire(r)
        self._replicas.clear()
        while self._leaving:
            await self._leaving.pop().aclose()
        while self._retired:
            await self._retired.pop().aclose()
