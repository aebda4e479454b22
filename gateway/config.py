"""`GatewayConfig`: everything the gateway process needs, validated at construction.

Contract: built once by the entry point (`gateway.cli`, tests, benchmarks) and passed down to
`create_app` and `HttpReplicaClient`; nothing below the CLI reads the environment or files.
API keys arrive already loaded (`gateway.auth.load_api_keys` reads a key file or a Kubernetes
Secret mount for the CLI). Non-goals: replica or policy settings (see `replicas.config`,
`policies`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    replica_url: str = Field(
        default="http://127.0.0.1:8001",
        description="base URL of the replicas behind the Ray Serve HTTP proxy (route prefix included)",
    )
    model_name: str = Field(default="nld", min_length=1, description="the model id clients send and /v1/models lists")
    auth_enabled: bool = Field(default=False, description="require `Authorization: Bearer <key>` on /v1/*")
    api_keys: frozenset[str] = Field(default_factory=frozenset, repr=False, description="accepted keys (never logged)")

    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="larger request bodies get 413")
    max_tokens_limit: int = Field(default=4096, ge=1, description="largest max_tokens a client may ask (400 above)")
    default_max_tokens: int = Field(default=256, ge=1, description="max_tokens when the client sends none")
    default_temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="OpenAI's default is 1.0")
    max_n: int = Field(default=4, ge=1, le=128, description="largest `n` (choices per prompt)")
    max_prompts: int = Field(default=8, ge=1, description="prompts per /v1/completions request (list prompts)")
    max_stop: int = Field(default=4, ge=1, description="stop strings per request (OpenAI: 4)")
    max_inflight_requests: int | None = Field(
        default=None, ge=1, description="gateway-wide in-flight completions beyond this get 429; None: no limit")

    request_timeout_s: float = Field(default=300.0, gt=0, description="deadline for the first byte (504), "
                                     "the whole request when not streaming, and each upstream read")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="TCP connect to the Ray Serve proxy")
    connect_retries: int = Field(default=1, ge=0, le=5, description="retries of a connection failure before the first byte")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After on 429 and 503")
    info_ttl_s: float = Field(default=10.0, ge=0, description="how long GET /info of the replicas is cached")
    ready_timeout_s: float = Field(default=2.0, gt=0, description="/ready waits this long for a replica")
    max_idle_connections: int = Field(default=256, ge=0, description="kept-alive idle connections to the proxy")
    replica_routing: Literal["direct", "ingress"] = Field(
        default="direct", description="direct: send each request straight to a healthy replica's own HTTP port, "
        "learned from the replicas' answers (`gateway.direct`), the ingress when none is known; ingress: always "
        "through replica_url (HAProxy or Serve's proxy)")
    direct_connect_timeout_s: float = Field(default=1.0, gt=0, description="TCP connect to a replica's own port "
                                            "(direct routing; a failed connect goes through the ingress)")
    direct_health_interval_s: float = Field(default=0.5, gt=0, description="how often each known replica's "
                                            "/-/healthz is checked (direct routing)")
    direct_discover_interval_s: float = Field(default=1.0, gt=0, description="how often one GET /health through "
                                              "the ingress looks for new replicas (direct routing)")
    direct_forget_after_s: float = Field(default=30.0, gt=0, description="a replica whose health check has not "
                                         "passed this long is forgotten (direct routing)")
    stream_channels: bool = Field(default=True, description="direct routing: a streamed request's events ride "
                                  "one stream channel per replica (`gateway.channel`: one read per engine step for "
                                  "all streams) instead of its own answer")
    pack_ar: int = Field(default=0, ge=0, le=4096, description="direct routing: a request running `ar` goes to "
                         "the busiest healthy replica with fewer than this many of this gateway's requests in "
                         "flight, the least loaded when all have this many (`gateway.placement`); 0: every "
                         "request goes to the least loaded")
    channel_idle_s: float = Field(default=2.0, gt=0, description="a stream channel no stream used this long is "
                                  "closed (direct routing)")
    replica_report_keep_s: float = Field(default=120.0, gt=0, description="how long a replica's last report (the "
                                         "header on its answers; the policy's `reports:` page) counts after it "
                                         "answered last")

    @field_validator("replica_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("replica_url must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, v: frozenset[str]) -> frozenset[str]:
        if any(not k or k != k.strip() for k in v):
            raise ValueError("api_keys: keys must be non-empty and carry no surrounding whitespace")
        return v

    @model_validator(mode="after")
    def _check(self) -> "GatewayConfig":
        if self.auth_enabled and not self.api_keys:
            raise ValueError("auth_enabled requires at least one API key (api_keys)")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        return self
