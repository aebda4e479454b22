"""The Ray Serve deployment: one `NLDReplica` loads the weights once and serves every mode.

Contract: `build_app(args)` (Serve's application builder: `import_path: replicas.app:build_app`,
`args` = a `ReplicaConfig` dict) and `bind_app(config, options)` (the same with deployment
options, for in-process launchers) are the only places that call `serve.deployment`. The replica
speaks the wire protocol of `replicas.wire` over Ray Serve HTTP (`/generate`, `/health`,
`/info`, `/stats`, `/engine`, and `/channel`: stream channels, `replicas.channels`):
`replicas.generation` turns text or chat messages into token ids, runs them on the engine,
and answers a non-streaming request with ONE `GenerateChunk` JSON and a streaming one with
NDJSON `GenerateChunk`s (after the first, on the gateway's stream channel when it names one).
Errors before the answer are `ErrorBody` JSON with 400 / 404 / 429 / 503 status; after a
stream began, a last chunk with `error`. Every `/generate` answer carries the replica's report
header (`replicas.report`: its load and cost model, which the gateway's policy reads instead
of Ray's metrics page). A client that goes away cancels the handler, which aborts the engine
request and frees its KV.

The engine runs in its own process (`EngineProcess`, the default; `engine_process: false` runs
it on a thread of the replica process). `check_health` (Ray Serve's health check) and `/health`
fail when the engine died or stalls with requests in flight, so Serve replaces the replica.
`NLDReplica(config, engine_factory=...)` takes any engine with the `StreamingFrontend` API
(tests inject a fake). Non-goals: the OpenAI API (the gateway), choosing modes (the policy).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .channel_wire import CHANNEL_HEADER, CHANNEL_MEDIA_TYPE
from .channels import ChannelRegistry, bind
from .config import ReplicaConfig
from .generation import Generations, Rejected
from .report import Reporter
from .text import TextCodec
from .wire import (REPLICA_HEADER, REPORT_HEADER, EngineSettings, ErrorBody, ErrorInfo, GenerateRequest, ReplicaInfo,
                   replica_address)

log = logging.getLogger("nld.replica")


def error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return error_response(status, ErrorInfo(message=message, type=type_, param=param, code=code))


def error_response(status: int, info: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorBody(error=info).model_dump(), status_code=status)


def build_engine(cfg: ReplicaConfig):
    """The engine a replica serves with: its own process by default (see `ReplicaConfig`)."""
    from .engine import AsyncEngine, EngineProcess, EngineSpec

    lora = False if not cfg.use_lora else (cfg.lora_path or None)
    denoise_lora = None if cfg.use_lora else False
    if cfg.engine_process:
        spec = EngineSpec(cfg.model_path, cfg.engine_config(), lora=lora, denoise_lora=denoise_lora,
                          torch_threads=cfg.engine_threads(),
                          cpus=tuple(cfg.engine_cpus) if cfg.engine_cpus else None)
        return EngineProcess(spec, stall_timeout_s=cfg.stall_timeout_s)
    if cfg.torch_threads:
        import torch  # noqa: PLC0415 - only this variant runs torch in the replica process

        torch.set_num_threads(cfg.torch_threads)
    engine = AsyncEngine.from_pretrained(cfg.model_path, cfg.engine_config(), lora=lora, denoise_lora=denoise_lora)
    engine.stall_timeout_s = cfg.stall_timeout_s
    return engine


def serve_identity() -> tuple[str | None, str | None]:
    """(application, replica id) of this Serve replica; (None, None) outside Ray Serve."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return context.app_name, context.replica_id.unique_id
    except Exception:  # noqa: BLE001 - not running as a Serve replica
        return None, None


def ray_cluster() -> str | None:
    """The Ray cluster this process runs in (its session name, unique per cluster instance);
    None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_session_name() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - not in a Ray worker
        return None


class NLDReplica:
    def __init__(self, config: dict, engine_factory: Callable | None = None, metrics=None, board=None) -> None:
        self.config = ReplicaConfig.model_validate(config)
        cfg = self.config
        self.engine = (engine_factory or build_engine)(cfg)
        self.codec = TextCodec.from_dir(cfg.model_path)
        self.max_block = self.engine.max_block_length
        self.max_prompt = cfg.max_prompt_tokens or cfg.engine.max_seq_len - self.max_block - 1
        self.downgraded = False  # running self_spec requests continue in ar (policy: loaded)
        self.settings_since: float | None = None  # `since` of the engine settings applied last
        if metrics is None:
            from .metrics import ReplicaMetrics  # noqa: PLC0415 - Ray's metrics API needs a Ray worker

            metrics = ReplicaMetrics(cfg.model_name)
            metrics.start(self.engine.stats)
        self.metrics = metrics
        self.generations = Generations(self.engine, self.codec, metrics, self.max_prompt,
                                       cfg.stream_interval_ms / 1000, cfg.stream_flush_tokens)
        self._board_version = 0
        self._watcher: asyncio.Task | None = None
        self.board = board  # engine settings shared by the application's replicas (settings_board)
        app, self.replica_id = serve_identity()
        self.cluster = ray_cluster() if app is not None else None  # in REPLICA_HEADER
        # the engine process's stats() is its last pushed snapshot (free to read on every answer); the
        # in-thread engine's builds one per call, so that variant reads it at most every 0.25 s
        self.reporter = Reporter(self.replica_id, cfg.model_name, self.engine.stats, application=app,
                                 min_interval_s=0.0 if cfg.engine_process else 0.25)
        if self.board is None and app is not None:
            from .settings_board import board_for

            self.board = board_for(app)
        try:  # Serve builds replicas on their event loop
            self._watcher = asyncio.get_running_loop().create_task(self._watch_settings(app))
        except RuntimeError:
            pass
        self._addresses: dict[tuple, str] = {}  # the socket's local address -> REPLICA_HEADER value
        self.channels = ChannelRegistry()  # stream channels opened by gateways (replicas.channels)
        self.routes = {
            ("GET", "/channel"): self.open_channel,
            ("GET", "/health"): self.health,
            ("GET", "/info"): self.info,
            ("GET", "/stats"): self.stats,
            ("POST", "/generate"): self.generate,
            ("POST", "/engine"): self.update_engine,
        }

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):  # an application under a route prefix
            path = path[len(root):]
        path = "/" + path.strip("/")
        handler = self.routes.get((request.method, path))
        if handler is None:
            response = error(404, f"no route {request.method} {path}", "not_found_error")
        else:
            response = await handler(request)
        if self.config.advertise_address:
            self._advertise(request, response)
        return response

    def _advertise(self, request: Request, response: Response) -> None:
        """`REPLICA_HEADER`: this replica's id, its own address as the connection reached it (the
        socket's local address: what HAProxy dialed, reachable from HAProxy's node) and its Ray
        cluster."""
        server = request.scope.get("server")
        if not server or server[1] is None:
            return
        value = self._addresses.get(server)
        if value is None:
            value = self._addresses[server] = replica_address(self.reporter.replica_id, server[0], int(server[1]),
                                                              self.cluster)
        response.headers[REPLICA_HEADER] = value

    def check_health(self) -> None:
        """Ray Serve's health check: raising makes Serve replace this replica."""
        problem = self.engine.health()
        if problem is not None:
            raise RuntimeError(problem)

    async def health(self, request: Request) -> Response:
        problem = self.engine.health()
        if problem is not None:
            return error(503, problem, "service_unavailable_error", code="engine_dead")
        return JSONResponse({"status": "ok"})

    async def info(self, request: Request) -> Response:
        m = self.engine.model_config
        return JSONResponse(ReplicaInfo(
            model=self.config.model_name, vocab_size=m.vocab_size, max_seq_len=self.config.engine.max_seq_len,
            max_prompt_tokens=self.max_prompt, block_size=m.block_size, max_block_length=self.max_block,
            has_draft_lora=self.engine.has_lora, has_denoise_lora=self.engine.has_denoise_lora, eos_token_ids=list(m.eos_token_ids),
            device=self.config.device, dtype=self.config.dtype,
        ).model_dump())

    async def stats(self, request: Request) -> Response:
        try:
            stats = await self.engine.fresh_stats()
        except Exception as e:  # noqa: BLE001 - a dead engine: say so
            return error(503, str(e), "service_unavailable_error", code="engine_dead")
        return JSONResponse({**stats, "downgraded": self.downgraded, "replica_id": self.replica_id,
                             "replica_pid": os.getpid(), "stream_channels": len(self.channels)})

    async def open_channel(self, request: Request) -> Response:
        """A stream channel (`replicas.channel_wire`): open until the gateway closes it."""
        channel = self.channels.open()
        return StreamingResponse(channel.frames(), media_type=CHANNEL_MEDIA_TYPE)

    async def update_engine(self, request: Request) -> Response:
        try:
            settings = EngineSettings.model_validate_json(await request.body())
        except ValidationError as e:
            return invalid_body(e)
        moved = await self.apply_settings(settings)
        tiers = [vars(t) for t in self.engine.config.draft_tiers]
        return JSONResponse({"draft_tiers": tiers, "moved": moved, "downgraded": self.downgraded,
                             "since": self.settings_since})

    async def _watch_settings(self, app: str | None) -> None:
        """Apply whatever another replica published (long poll; see `settings_board`)."""
        while self.board is not None:
            try:
                version, settings = await self.board.wait_newer.remote(self._board_version, 30.0)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the board's actor died: get a new one
                log.warning("engine settings board unavailable (%s); retrying", type(e).__name__)
                await asyncio.sleep(1.0)
                if app is not None:
                    from .settings_board import board_for

                    self.board = board_for(app)
                continue
            if version > self._board_version:
                self._board_version = version
                if settings:
                    await self.apply_settings(EngineSettings.model_validate(settings), publish=False)

    async def apply_settings(self, settings: EngineSettings, publish: bool = True) -> list[str]:
        """Apply what differs from the current settings, unless they are older than the settings
        applied last (`since`); returns the requests moved between modes. Settings that are
        newer than what this replica had are published to the application's other replicas."""
        from .engine import DraftTier

        newer = settings.since is None or self.settings_since is None or settings.since > self.settings_since
        if settings.since is not None:
            if self.settings_since is not None and settings.since < self.settings_since:
                return []  # decided before a newer switch (e.g. a request overtaken by a push)
            self.settings_since = settings.since
        if publish and newer and self.board is not None:
            self.board.publish.remote(settings.model_dump(exclude_none=True))  # fire and forget
        if settings.draft_tiers is not None:
            tiers = tuple(DraftTier(t.max_running, t.block_length) for t in settings.draft_tiers)
            if tiers != self.engine.config.draft_tiers:
                self.engine.update_draft_tiers(tiers)
        moved: list[str] = []
        if settings.downgrade_self_spec is not None and settings.downgrade_self_spec != self.downgraded:
            self.downgraded = settings.downgrade_self_spec
            moved = await self.engine.downgrade_self_spec(self.downgraded)
        return moved

    async def generate(self, request: Request) -> Response:
        """Every answer carries the replica's report (`REPORT_HEADER`; `replicas.report`)."""
        response = await self._generate(request)
        response.headers[REPORT_HEADER] = self.reporter.header()
        return response

    async def _generate(self, request: Request) -> Response:
        try:
            req = GenerateRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return invalid_body(e)
        if req.engine is not None:
            await self.apply_settings(req.engine)
        try:
            started = await self.generations.start(req)
            if req.stream:
                channel = None if req.channel is None else self.channels.get(req.channel.id)
                if channel is not None:  # the lines after the first go to the gateway's channel
                    stream = req.channel.stream
                    lines = self.generations.ndjson(started, emit=lambda line: channel.put(stream, line))
                    return StreamingResponse(bind(lines, channel, stream),
                                             media_type="application/x-ndjson", headers={CHANNEL_HEADER: "bound"})
                return StreamingResponse(self.generations.ndjson(started), media_type="application/x-ndjson")
            result = await self.generations.result(started)
        except Rejected as e:
            return error_response(e.status, e.info)
        return Response(result.model_dump_json(exclude_none=True), media_type="application/json")


def invalid_body(e: ValidationError) -> JSONResponse:
    """400 for a request body that does not validate (its first error; `param` is its location)."""
    first = e.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or None
    return error(400, f"{loc}: {first.get('msg')}" if loc else str(first.get("msg")), "invalid_request_error", loc)


def build_app(args: dict | ReplicaConfig):
    """Serve application builder (`import_path: replicas.app:build_app`; Serve passes `args`).

    A Serve config file's `deployments:` entry for NLDReplica sets autoscaling_config and
    ray_actor_options on top of what `bind_app` chooses."""
    return bind_app(args)


def bind_app(args: dict | ReplicaConfig, options: dict | None = None):
    """Validate the config and bind one `NLDReplica` deployment with `serve.deployment` options."""
    from ray import serve

    config = args if isinstance(args, ReplicaConfig) else ReplicaConfig.model_validate(args or {})
    # The engine batches and queues; Serve must pass it more than it can hold (Serve's default is
    # 5) so that the engine, not Serve's router, decides overload and answers 429.
    capacity = config.engine.max_batch_size + config.engine.max_waiting
    opts = {"max_ongoing_requests": 2 * capacity + 8, **(options or {})}
    deployment = serve.deployment(name="NLDReplica", **opts)(NLDReplica)
    return deployment.bind(config.model_dump())
