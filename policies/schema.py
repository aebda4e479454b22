"""The policy file: a pydantic schema for the YAML that describes how `auto` requests get a mode.

Contract: `PolicyFile.model_validate(dict)` validates everything (unknown keys, types, ranges,
threshold order, names used by the expression, placeholders in signal URLs) and raises
`ValidationError` with the field path; `load_policy_file(path)` reads YAML and raises
`PolicyFileError` whose message lists each problem as `path.to.field: reason`. Signal URLs may
name the stack's ports as placeholders (`{metrics_host}`, `{metrics_port}`: where the replicas'
Ray metrics listen; `{prometheus_url}`: the Prometheus that scrapes them), and a PromQL `query`
may name `{ray_selector}` (the label matcher of this stack's series, e.g. the Helm release's);
`PolicyFile.resolved(StackPorts)` fills them in (the entry point that started the stack knows
them). Non-goals: running anything (see `build`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Literal, Union
from urllib.parse import quote

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from replicas.wire import Mode as ModeName, SpecAlgorithm  # the one vocabulary (torch-free)

from .expr import compile_expression



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class StackPorts:
    """Where this stack's services listen (and which series are its own), for the placeholders
    of signal URLs and queries. Built by the entry point (`nld-gateway up`: 127.0.0.1 and its
    --metrics-port; `serve`: --replica-metrics-host, --replica-metrics-port, --prometheus-url and
    --ray-selector); the defaults are those of `nld-gateway up` without flags."""

    metrics_host: str = "127.0.0.1"  # {metrics_host}: the replicas' Ray metrics port's host
    metrics_port: int = 8080  # {metrics_port}: the replicas' Ray metrics port
    prometheus_url: str = "http://127.0.0.1:9090"  # {prometheus_url}: the Prometheus scraping the replicas
    # {ray_selector} in PromQL queries: the label matcher of this stack's replica series (the chart:
    # `{namespace="<ns>",app_kubernetes_io_instance="<release>"}`); empty: every series
    ray_selector: str = ""

    @property
    def ray_match(self) -> str:
        """{ray_match}: Prometheus `/federate`'s `match[]` parameter, URL-encoded, selecting every
        replica series (`ray_nld_replica_*`) of this stack (`ray_selector`'s labels)."""
        inner = self.ray_selector.strip().removeprefix("{").removesuffix("}").strip()
        selector = '{__name__=~"ray_nld_replica_.*"' + (f",{inner}" if inner else "") + "}"
        return "match%5B%5D=" + quote(selector, safe="")

    def fill(self, url: str) -> str:
        return _PLACEHOLDER.sub(lambda m: str(getattr(self, m.group(1))), url)

    def fill_query(self, query: str) -> str:
        """A PromQL query with `{ray_selector}` filled in (other braces are PromQL's own)."""
        return query.replace("{ray_selector}", self.ray_selector)


PLACEHOLDERS = (*(f.name for f in fields(StackPorts)), "ray_match")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def check_placeholders(url: str) -> str:
    unknown = [n for n in _PLACEHOLDER.findall(url) if n not in PLACEHOLDERS]
    if unknown:
        known = ", ".join("{" + n + "}" for n in PLACEHOLDERS)
        raise ValueError(f"unknown placeholder {{{unknown[0]}}} in {url!r} (known: {known})")
    return url


class PrometheusSignal(_Strict):
    """A PromQL instant query over the Prometheus HTTP API (the vector's values are summed)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source: Literal["prometheus"]
    url: str = Field(description="Prometheus base URL, e.g. http://prometheus:9090")
    query: str
    interval_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    retries: int = Field(default=1, ge=0, le=5)
    stale_after_s: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        return check_placeholders(v)


class _PageSignal(_Strict):
    """What every signal read from metrics pages shares: the pages, a label filter, the timing."""

    urls: list[str] = Field(min_length=1, description="metrics endpoints, e.g. "
                            "http://{metrics_host}:{metrics_port}/metrics (this stack's Ray metrics port)")
    labels: dict[str, str] = Field(default_factory=dict, description="keep samples with these label values")
    interval_s: float = Field(default=1.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    stale_after_s: float = Field(default=10.0, gt=0)

    @field_validator("urls")
    @classmethod
    def _placeholders(cls, v: list[str]) -> list[str]:
        return [check_placeholders(u) for u in v]


class ScrapeSignal(_PageSignal):
    """Read Prometheus text from the replicas' metrics endpoints directly (no Prometheus server)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source: Literal["scrape"]
    metric: str = Field(description="sample name, e.g. ray_nld_replica_num_requests_running")
    per: str | None = Field(default="replica", description="sum samples per value of this label first")
    aggregate: Literal["mean", "sum", "max", "count"] = Field(
        default="mean", description="across the groups: mean, sum, max, or count (how many groups, e.g. replicas)")


class GoodputSignal(_PageSignal):
    """The replicas' measured cost models (step costs, tokens per self-spec cycle and per diffusion
    pass), read from the same Prometheus text pages as `scrape` (see `policies.cost_view`). Its
    value is the fleet's measured step count; `mode.goodput` reads the model itself."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source: Literal["goodput"]
    prefix: str = Field(default="ray_nld_replica_", description="the replicas' metric name prefix")
    per: str = Field(default="replica", description="one cost model per value of this label")


class LocalSignal(_Strict):
    """A gateway-local counter, read instantly (never stale)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    source: Literal["local"]
    counter: Literal["inflight"] = "inflight"
    repoll_after_s: float | None = Field(default=None, gt=0, description="when this counter moves an octave "
                                         "from where it was, poll the polled signals again this many seconds "
                                         "later (a fleet signal polled every 10 s then follows a load step)")


Signal = Annotated[Union[PrometheusSignal, ScrapeSignal, GoodputSignal, LocalSignal], Field(discriminator="source")]


class Smoothing(_Strict):
    ewma_half_life_s: float = Field(default=0.0, ge=0, description="0: no smoothing")


class Band(_Strict):
    """An optional middle mode between the sparse and the loaded mode (e.g. diffusion)."""

    mode: ModeName = "diffusion"
    enter_above: float
    leave_below: float
    self_spec_algorithm: SpecAlgorithm | None = Field(default=None, description="a self_spec band's algorithm "
                                                      "(None: the replica's default)")


class GoodputRule(_Strict):
    """Choose the level whose mode has the best predicted goodput (tokens/s at the load the
    `signal` expression gives, per replica), subject to a latency SLO, from the replicas'
    measured costs. Until the cost model has enough samples the thresholds decide (cold start)."""

    costs: str = Field(description="the name of a signal with source: goodput")
    min_steps: int = Field(default=200, ge=1, description="measured steps before the cost model decides")
    min_cycles: int = Field(default=20, ge=1, description="self-spec cycles (diffusion blocks) before a "
                            "mode's yield counts as measured")
    margin: float = Field(default=0.05, ge=0, lt=1, description="leave the current mode only for a "
                          "predicted tokens/s gain above this fraction")
    smoothing_s: float = Field(default=2.0, ge=0, description="half-life of the EWMA of each mode's predicted "
                               "tokens/s (0: none)")
    settle_s: float = Field(default=5.0, ge=0, description="after a load step (an octave), the margin holds no mode "
                            "until a cost view first seen this long after the step picks it; while the running "
                            "mode is unmeasured at the load, the policy re-polls the cost model this often")
    latency_slo_s: float | None = Field(default=None, gt=0, description="max predicted latency of a request "
                                        "of request_tokens tokens; modes above it are not chosen")
    request_tokens: int = Field(default=256, ge=1)
    block_length: int = Field(default=32, ge=2, description="the requests' block length (diffusion canvas; "
                              "self-spec draft beyond the draft tiers)")


class ModeRule(_Strict):
    signal: str = Field(description="expression over signal names: numbers, + - * /, max(), min(), `replicas`")
    smoothing: Smoothing = Field(default_factory=Smoothing)
    sparse_mode: ModeName = "self_spec"
    loaded_mode: ModeName = "ar"
    # per level: the self_spec algorithm of requests the level runs in self_spec (None: the replica's default)
    sparse_self_spec_algorithm: SpecAlgorithm | None = None
    loaded_self_spec_algorithm: SpecAlgorithm | None = None
    enter_loaded_above: float
    leave_loaded_below: float
    middle: Band | None = None
    min_dwell_s: float = Field(default=10.0, ge=0)
    on_stale: Literal["hold", "fallback"] = "hold"
    initial_mode: ModeName | None = Field(default=None, description="the mode before the first evaluation on "
                                          "fresh signals (a gateway that just started); default sparse_mode")
    stale_mode: ModeName | None = Field(default=None, description="the mode on_stale=fallback switches to")
    client_override: Literal["allow", "deny", "clamp"] = "allow"
    replicas: float = Field(default=1.0, gt=0, description="value of `replicas` when no signal has that name "
                            "(a signal named `replicas`, e.g. a scrape with aggregate: count, replaces it)")
    goodput: GoodputRule | None = Field(default=None, description="calibrating: choose by predicted goodput; "
                                        "the thresholds decide until the cost model is measured")

    @model_validator(mode="after")
    def _order(self) -> "ModeRule":
        if not self.leave_loaded_below < self.enter_loaded_above:
            raise ValueError("leave_loaded_below must be below enter_loaded_above (hysteresis)")
        if self.middle is not None:
            m = self.middle
            if not m.leave_below < m.enter_above:
                raise ValueError("middle.leave_below must be below middle.enter_above (hysteresis)")
            if not m.enter_above < self.enter_loaded_above or not m.leave_below < self.leave_loaded_below:
                raise ValueError("the middle band's thresholds must sit below the loaded thresholds")
        for name, mode, algorithm in (("sparse_self_spec_algorithm", self.sparse_mode, self.sparse_self_spec_algorithm),
                                      ("loaded_self_spec_algorithm", self.loaded_mode, self.loaded_self_spec_algorithm),
                                      ("middle.self_spec_algorithm", self.middle and self.middle.mode,
                                       self.middle and self.middle.self_spec_algorithm)):
            if algorithm is not None and mode != "self_spec":
                raise ValueError(f"{name} is set but that level's mode is {mode!r}, not self_spec")
        if self.on_stale == "fallback" and self.stale_mode is None:
            raise ValueError("on_stale: fallback needs stale_mode")
        levels = [self.sparse_mode, self.loaded_mode] + ([self.middle.mode] if self.middle else [])
        if self.stale_mode is not None and self.stale_mode not in levels:
            raise ValueError(f"stale_mode must be one of the policy's modes ({', '.join(levels)})")
        if self.initial_mode is not None and self.initial_mode not in levels:
            raise ValueError(f"initial_mode must be one of the policy's modes ({', '.join(levels)})")
        compile_expression(self.signal)  # syntax
        return self


class DraftTier(_Strict):
    max_running: int = Field(ge=1)
    block_length: int = Field(ge=2)


class EngineRule(_Strict):
    draft_tiers: list[DraftTier] = Field(default_factory=list)
    downgrade_running: bool = Field(default=False, description="running self_spec requests move to ar while loaded")


class Autoscaling(_Strict):
    """Ray Serve `autoscaling_config` keys (rendered into the Serve config and the Helm values)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: float = Field(default=16, gt=0)
    upscale_delay_s: float = Field(default=30, ge=0)
    downscale_delay_s: float = Field(default=600, ge=0)

    @model_validator(mode="after")
    def _range(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class PolicyFile(_Strict):
    signals: list[Signal] = Field(default_factory=list)
    mode: ModeRule
    engine: EngineRule = Field(default_factory=EngineRule)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)

    @model_validator(mode="after")
    def _names(self) -> "PolicyFile":
        names = [s.name for s in self.signals]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"signals: duplicate name {sorted(dup)[0]!r}")
        unknown = compile_expression(self.mode.signal).names - set(names) - {"replicas"}
        if unknown:
            raise ValueError(f"mode.signal uses {sorted(unknown)[0]!r}, which no signal defines")
        if self.mode.goodput is not None:
            costs = next((s for s in self.signals if s.name == self.mode.goodput.costs), None)
            if not isinstance(costs, GoodputSignal):
                raise ValueError(f"mode.goodput.costs: {self.mode.goodput.costs!r} is not a signal with "
                                 "source: goodput")
        return self

    def serve_autoscaling_config(self) -> dict:
        return self.autoscaling.model_dump()

    def resolved(self, ports: StackPorts) -> "PolicyFile":
        """This policy with the placeholders of its signal URLs and queries filled in from `ports`."""
        signals = []
        for s in self.signals:
            if isinstance(s, (ScrapeSignal, GoodputSignal)):
                s = s.model_copy(update={"urls": [ports.fill(u) for u in s.urls]})
            elif isinstance(s, PrometheusSignal):
                s = s.model_copy(update={"url": ports.fill(s.url), "query": ports.fill_query(s.query)})
            signals.append(s)
        return self.model_copy(update={"signals": signals})


class PolicyFileError(ValueError):
    """A policy file is not valid; the message lists `field.path: reason` lines."""


def describe(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "").removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "\n".join(lines)


def parse_policy(text: str, origin: str = "<policy>") -> PolicyFile:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PolicyFileError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise PolicyFileError(f"{origin}: a policy file is a YAML mapping")
    try:
        return PolicyFile.model_validate(data)
    except ValidationError as e:
        raise PolicyFileError(f"{origin}:\n{describe(e)}") from None


def load_policy_file(path: str | Path) -> PolicyFile:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyFileError(f"{path}: {e.strerror}") from None
    return parse_policy(text, str(path))
