"""The signal-source registry: a policy file's `source:` name -> the class that reads it.

Contract: `SOURCES[name](spec, pages, local_counters)` builds the source of one validated signal
spec (`prometheus`, `scrape`, `local`, `goodput`); `pages` is the policy's shared `PageFetcher`,
`local_counters` the gateway's counters by name. The one place that knows every source class, so
`signals` and `cost_view` need not import each other. Non-goals: validating specs (`schema`).
"""

from __future__ import annotations

from .cost_view import GoodputSource
from .signals import LocalSource, PrometheusSource, ScrapeSource

SOURCES = {  # (spec, the policy's PageFetcher, local counters) -> source
    "prometheus": lambda spec, pages, local: PrometheusSource(spec, pages.http),
    "scrape": lambda spec, pages, local: ScrapeSource(spec, pages),
    "local": lambda spec, pages, local: LocalSource(spec, local[spec.counter]),
    "goodput": lambda spec, pages, local: GoodputSource(spec, pages),
}
