"""How `nld-gateway serve` listens: the API port and, optionally, a separate metrics port.

Contract: `metrics_asgi(metrics)` is a minimal ASGI app answering `GET`/`HEAD /metrics` with
the gateway's Prometheus text and 404 to anything else; it has no lifespan, no auth and no
other route, so a port serving it exposes nothing but metrics. `serve(app, host, port, ...)`
runs uvicorn for `app` and, when `metrics_port` is given, a second uvicorn for
`metrics_asgi` on `metrics_host:metrics_port`, in one event loop, together with `background`
coroutine functions (e.g. `KeyFileWatcher.run`), which are cancelled at shutdown. SIGINT and
SIGTERM stop every server gracefully (the app's lifespan shutdown included); when one server
stops, the others are asked to stop too. Blocks until all have stopped.
`loop_factory(name)` is the event loop the entry points resolve from `--loop` and pass to
`serve` and `run(coro, factory)`, which runs a coroutine to completion on a loop it makes:
`auto` (the default of `serve` and `up`) is uvloop where it is installed, as uvicorn's own
`--loop auto` and Ray's workers choose, else asyncio's; `uvloop` requires it; `asyncio` is the
standard library's. On uvloop the transports' writes run in C: on a streamed run at 32 requests
the gateway's CPU per token was 0.046-0.056 ms against 0.053-0.070 on asyncio's loop
(docs/PERFORMANCE.md, fourteenth session).
Non-goals: TLS, several API ports; `nld-gateway up` keeps its own single listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import uvicorn

from .metrics import GatewayMetrics

LOOPS = ("auto", "asyncio", "uvloop")
T = TypeVar("T")


def loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory for `loop` (one of `LOOPS`). Raises ValueError for another name,
    or for `uvloop` where uvloop is not installed."""
    if loop not in LOOPS:
        raise ValueError(f"loop: one of {', '.join(LOOPS)}, not {loop!r}")
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop == "uvloop":
                raise ValueError("loop: uvloop is not installed (pip install uvloop), or use auto or asyncio") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(coro: Coroutine[Any, Any, T], factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> T:
    """Run `coro` to completion on a new event loop from `factory` (default: `loop_factory()`)."""
    with asyncio.Runner(loop_factory=factory or loop_factory()) as runner:
        return runner.run(coro)


def metrics_asgi(metrics: GatewayMetrics):
    """An ASGI app that serves only `/metrics`."""

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan and websockets: nothing to do
            return
        ok = scope["path"] == "/metrics" and scope["method"] in ("GET", "HEAD")
        body = metrics.render() if ok else b"not found\n"
        ctype = metrics.content_type if ok else "text/plain; charset=utf-8"
        await send({"type": "http.response.start", "status": 200 if ok else 404,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    return app


def serve(app, host: str, port: int, *, metrics: GatewayMetrics | None = None, metrics_host: str | None = None,
          metrics_port: int | None = None, background: Sequence[Callable[[], Awaitable[None]]] = (),
          log_level: str = "info", loop: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
    from .http_protocol import HTTP_PROTOCOL

    configs = [uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, http=HTTP_PROTOCOL)]
    if metrics_port is not None:
        if metrics is None:
            raise ValueError("a metrics port needs the gateway's metrics")
        configs.append(uvicorn.Config(metrics_asgi(metrics), host=metrics_host or host, port=metrics_port,
                                      log_level=log_level, access_log=False, lifespan="off"))
    run(_run([uvicorn.Server(c) for c in configs], background), loop)


async def _run(servers: list[uvicorn.Server], background) -> None:
    def stop() -> None:
        for s in servers:
            s.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
            loop.add_signal_handler(sig, stop)
    for s in servers:
        s.capture_signals = contextlib.nullcontext  # the handlers above replace uvicorn's, for all servers
    extra = [asyncio.create_task(fn()) for fn in background]
    running = [asyncio.create_task(s.serve()) for s in servers]
    try:
        await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        stop()
        await asyncio.gather(*running)
    finally:
        for t in extra:
            t.cancel()
        await asyncio.gather(*extra, return_exceptions=True)
