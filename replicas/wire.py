"""Wire types between the gateway and the replicas (internal; documented in docs/ARCHITECTURE.md).

Contract: pydantic models only, importable without torch or ray, so the gateway can depend on
them. The replica exposes, behind the Ray Serve HTTP proxy:

- `POST /generate` with a `GenerateRequest` JSON body. On success: HTTP 200 and, with
  `stream: false`, ONE `GenerateChunk` JSON (every token id, the whole text, `finish_reason`,
  `usage`); with `stream: true` (the default), NDJSON lines, one `GenerateChunk` (a text delta)
  each, the last with `finish_reason` and `usage`; with `sse` set as well, the lines between
  the first and the last are the client's ready OpenAI SSE events (`SSERender`). On
  a request error before streaming: an `ErrorBody` JSON with status 400 (bad parameters,
  `param` set; code `context_length_exceeded` for a prompt that is too long), 404 (no such
  route), 429 (engine overloaded) or 503 (engine error). A failure
  after streaming began is one last chunk with `error` set and `finish_reason` "error".
- `GET /health` -> `{"status": "ok"}`; `GET /info` -> `ReplicaInfo`; `GET /stats` -> the engine's
  stats dict and `downgraded`; `POST /engine` with `EngineSettings` -> the applied settings.
- Every `/generate` answer (200 or error) carries the `REPORT_HEADER` header: the replica's id,
  the sequence number of its engine's last stats snapshot, and a compact JSON of that snapshot's
  load (running, waiting, by mode, KV usage) and measured cost model.
- `GET /channel`: a stream channel (`replicas.channel_wire`): one long-lived answer that carries
  the events of every streamed request a gateway binds to it (`GenerateRequest.channel`), one
  write per engine step instead of one per stream. A bound request's own answer carries its first
  chunk and the `CHANNEL_HEADER`, then ends when the request does; its other lines, the same bytes
  as on an unbound answer, arrive on the channel. Only over a direct route (the channel and the
  request must reach the same replica).
- Every answer of a replica served by Ray Serve's direct ingress (behind HAProxy) carries the
  `REPLICA_HEADER` header: `<replica id> <host>:<port> <cluster>`, the replica's own HTTP address as
  the connection reached it and its Ray cluster (`replica_address`/`parse_replica_address`). The
  gateway learns the replicas from it and may then send to that address directly
  (`gateway.direct`).

The gateway POSTs `/engine` when the policy's settings change. Engine settings also ride on
every `GenerateRequest.engine`: Ray Serve's proxy reaches one replica per call, so the policy
cannot broadcast; each replica applies the settings carried by the requests it receives
whenever they differ from its own (idempotent) and are not older (`since`) than the ones it
applied last.

Closing the HTTP response aborts the request in the engine (its KV slot is freed).

It is also the project's one vocabulary: `MODES` (the decoding modes, `Mode`), `REQUESTED_MODES`
(what a client may ask for: `auto` or a mode), `SPEC_ALGORITHMS`, `FinishReason` /
`FINISH_REASONS`, `RUNNING_KINDS` (prefill and the modes, as the engine's stats count running
requests) and `tokens_per_forward()`. The engine, the replicas, the policies and the
gateway all take them from here; this module imports nothing of the project (a leaf: any layer
may import it, torch-free and ray-free).
"""

from __future__ import annotations

import json
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["ar", "diffusion", "self_spec"]
MODES: tuple[str, ...] = get_args(Mode)  # every decoding mode, in this order
REQUESTED_MODES: tuple[str, ...] = ("auto",) + MODES  # what a client may ask for
SpecAlgorithm = Literal["linear", "quadratic"]  # self_spec: two forwards per cycle, or one
SPEC_ALGORITHMS: tuple[str, ...] = get_args(SpecAlgorithm)
FinishReason = Literal["stop", "length", "abort", "error"]
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
# what the engine counts in `running_by_mode`: requests still in prefill, then each mode
RUNNING_KINDS: tuple[str, ...] = ("prefill",) + MODES
# every answer's `<replica id> <host>:<port> [<cluster>]`: the replica's own HTTP address (direct
# ingress) and the Ray cluster it runs in (Ray's session name: a new cluster, a new name)
REPLICA_HEADER = "x-nld-replica"


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets (as in a URL)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def replica_address(replica_id: str, host: str, port: int, cluster: str | None = None) -> str:
    """The `REPLICA_HEADER` value."""
    addr = host_port(host, port)
    return f"{replica_id} {addr} {cluster}" if cluster else f"{replica_id} {addr}"


def parse_replica_address(value: str | None) -> tuple[str, str, int, str | None] | None:
    """(replica id, host, port, cluster or None) of a `REPLICA_HEADER` value; None for a missing
    or malformed one."""
    parts = (value or "").split()
    if len(parts) not in (2, 3):
        return None
    rid, addr = parts[0], parts[1]
    host, colon, port = addr.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        return None
    return rid, host, int(port), (parts[2] if len(parts) == 3 else None)


# every /generate answer's report of the replica's load and cost model: `<replica id>;<seq>;<JSON>`
# (made by `replicas.report`, collected by the gateway into `policies.reports.ReplicaReports`)
REPORT_HEADER = "x-nld-replica-report"


def tokens_per_forward(tokens: int, forward_passes: int) -> float:
    """Generated tokens per forward pass a request took part in (0 passes counts as 1)."""
    return tokens / max(forward_passes, 1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list | None = None


class DraftTierModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_running: int = Field(ge=1)
    block_length: int = Field(ge=2)


class EngineSettings(BaseModel):
    """Run-time engine settings a policy may push to every replica without a restart."""

    model_config = ConfigDict(extra="forbid")
    draft_tiers: list[DraftTierModel] | None = None  # replace the load-aware draft tiers
    # True: running self_spec requests continue in ar (at their next cycle boundary);
    # False: requests downgraded earlier go back to self_spec; None: no change
    downgrade_self_spec: bool | None = None
    # when the policy adopted these settings (unix seconds): a replica ignores settings older than
    # the ones it applied last, since a request decided before a switch can arrive after the
    # switch's push; None: apply regardless (manual calls)
    since: float | None = None


class SSERender(BaseModel):
    """How a replica renders a streamed request's middle chunks as the client's OpenAI SSE events.

    With `GenerateRequest.sse` set (and `stream: true`), every chunk between the first and the
    last is sent as a ready `data: {...}` event followed by an empty line, which the gateway
    forwards as it is; chunks whose text delta is empty are not sent. The first and the last
    chunk stay `GenerateChunk` lines: the gateway needs the first to answer errors with a status
    and to learn the mode, and the last for `finish_reason`, usage and errors."""

    model_config = ConfigDict(extra="forbid")
    id: str  # the client's completion id (cmpl-... / chatcmpl-...)
    created: int
    model: str
    index: int = Field(ge=0)  # the choice index
    chat: bool  # chat.completion.chunk with a `delta`, else text_completion with `text`
    include_usage: bool = False  # `"usage": null` on every chunk (stream_options.include_usage)

    def event_parts(self) -> tuple[bytes, bytes]:
        """(head, tail): an event is head + the JSON string of the text delta + tail, the same
        JSON (keys in the same order) as the gateway's own rendering of a middle chunk."""
        head = json.dumps({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                           "created": self.created, "model": self.model}, separators=(",", ":"))[:-1]
        opening = '"delta":{"content":' if self.chat else '"text":'
        closing = ("}" if self.chat else "") + ',"finish_reason":null,"logprobs":null}]'
        closing += ',"usage":null}' if self.include_usage else "}"
        return (f'data: {head},"choices":[{{"index":{self.index},{opening}').encode(), (closing + "\n\n").encode()


class ChannelRoute(BaseModel):
    """Where a streamed request's lines after its first go: stream `stream` of channel `id`."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)
    stream: int = Field(ge=1)


class GenerateRequest(BaseModel):
    """One completion. Exactly one of `prompt`, `prompt_ids`, `messages` is set."""

    model_config = ConfigDict(extra="forbid")
    request_id: str | None = None
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None  # rendered with the checkpoint's chat template
    add_generation_prompt: bool = True
    mode: Mode = "ar"
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)  # stop strings: excluded from the text
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    block_length: int | None = Field(default=None, ge=2)
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)  # diffusion confidence threshold
    draft_lora: bool | None = None
    denoise_lora: bool | None = None  # diffusion denoise passes with the model's diffusion_lora/ (None: when loaded)
    self_spec_algorithm: SpecAlgorithm | None = None  # None: the replica's engine default
    engine: EngineSettings | None = None  # the policy's current engine settings; applied when they differ
    stream: bool = True  # False: the answer is ONE GenerateChunk JSON with every token, the text and usage
    sse: SSERender | None = None  # stream: send the middle chunks as the client's SSE events (see SSERender)
    channel: ChannelRoute | None = None  # stream: the lines after the first on this channel (replicas.channel_wire)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    forward_passes: int
    tokens_per_forward: float


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorInfo


class GenerateChunk(BaseModel):
    request_id: str
    mode: Mode
    token_ids: list[int] = Field(default_factory=list)
    forward_passes: int = 0  # forward passes the request has taken part in so far
    text: str = ""  # text delta (stop strings already cut)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None  # on the last chunk
    accepted_lengths: list[int] | None = None  # on the last chunk, self_spec
    self_spec_algorithm: SpecAlgorithm | None = None  # on the last chunk: the algorithm that ran (self_spec)
    error: ErrorInfo | None = None


class ReplicaInfo(BaseModel):
    model: str
    vocab_size: int
    max_seq_len: int
    max_prompt_tokens: int
    block_size: int
    max_block_length: int
    has_draft_lora: bool
    has_denoise_lora: bool = False
    eos_token_ids: list[int]
    device: str
    dtype: str


