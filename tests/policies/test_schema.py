"""Policy file validation: precise `field.path: reason` errors, presets, `policy validate`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from policies import PRESETS, PolicyFileError, StackPorts, load_policy_file, parse_policy

BASE = {"signals": [{"name": "x", "source": "local"}],
        "mode": {"signal": "x", "enter_loaded_above": 8, "leave_loaded_below": 4}}


def with_(path: str, value):
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    node = doc
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[keys[-1]] = value
    return yaml.safe_dump(doc)


@pytest.mark.parametrize("path, value, message", [
    ("mode.leave_loaded_below", 9, "mode: leave_loaded_below must be below enter_loaded_above"),
    ("mode.sparse_mode", "beam", "mode.sparse_mode: Input should be 'ar', 'diffusion' or 'self_spec'"),
    ("mode.signal", "x + y", "uses 'y', which no signal defines"),
    ("mode.signal", "x ** 2", "invalid expression"),
    ("mode.min_dwell_s", -1, "mode.min_dwell_s: Input should be greater than or equal to 0"),
    ("mode.on_stale", "fallback", "on_stale: fallback needs stale_mode"),
    ("mode.typo", 1, "mode.typo: Extra inputs are not permitted"),
    ("signals.0.source", "kafka", "signals.0: Input tag 'kafka' found using 'source' does not match"),
    ("autoscaling", {"min_replicas": 5, "max_replicas": 2}, "min_replicas must not exceed max_replicas"),
    ("engine", {"draft_tiers": [{"max_running": 0, "block_length": 8}]}, "engine.draft_tiers.0.max_running"),
])
def test_errors_name_the_field(path, value, message):
    with pytest.raises(PolicyFileError) as e:
        parse_policy(with_(path, value))
    assert message in str(e.value)


def test_duplicate_signal_names_and_non_mapping():
    doc = dict(BASE, signals=[{"name": "x", "source": "local"}, {"name": "x", "source": "local"}])
    with pytest.raises(PolicyFileError, match="duplicate name 'x'"):
        parse_policy(yaml.safe_dump(doc))
    with pytest.raises(PolicyFileError, match="YAML mapping"):
        parse_policy("- 1\n- 2\n")


@pytest.mark.parametrize("name", ["adaptive", "adaptive_cpu", "static", "latency", "throughput"])
def test_presets_validate(name):
    spec = load_policy_file(PRESETS / f"{name}.yaml")
    assert spec.mode.enter_loaded_above > spec.mode.leave_loaded_below


def test_policy_validate_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gateway", "policy", "validate", str(PRESETS / "adaptive.yaml")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(with_("mode.leave_loaded_below", 9))
    out = subprocess.run([sys.executable, "-m", "gateway", "policy", "validate", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "mode: leave_loaded_below must be below enter_loaded_above" in out.stderr


def test_stale_mode_must_be_one_of_the_policy_modes():
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    doc["mode"].update(on_stale="fallback", stale_mode="diffusion")  # no middle band: not a level
    with pytest.raises(PolicyFileError, match="stale_mode must be one of the policy's modes"):
        parse_policy(yaml.safe_dump(doc))


def test_signal_urls_take_the_stack_ports_as_placeholders():
    doc = dict(BASE, signals=[
        {"name": "x", "source": "scrape", "urls": ["http://{metrics_host}:{metrics_port}/metrics"], "metric": "m"},
        {"name": "p", "source": "prometheus", "url": "http://{metrics_host}:9090", "query": "q"}])
    spec = parse_policy(yaml.safe_dump(doc))
    resolved = spec.resolved(StackPorts(metrics_host="10.0.0.7", metrics_port=18080))
    assert resolved.signals[0].urls == ["http://10.0.0.7:18080/metrics"]
    assert resolved.signals[1].url == "http://10.0.0.7:9090"
    assert spec.signals[0].urls == ["http://{metrics_host}:{metrics_port}/metrics"]  # the file's spec is unchanged
    assert StackPorts().fill("http://{metrics_host}:{metrics_port}/m") == "http://127.0.0.1:8080/m"
    bad = dict(BASE, signals=[{"name": "x", "source": "scrape", "urls": ["http://{metric_port}/m"], "metric": "m"}])
    with pytest.raises(PolicyFileError, match=r"signals.0.scrape.urls: .*unknown placeholder \{metric_port\}"):
        parse_policy(yaml.safe_dump(bad))


@pytest.mark.parametrize("name", ["adaptive", "adaptive_cpu", "static", "latency", "throughput"])
def test_presets_read_the_replicas_reports_and_count_the_replicas(name):
    """No preset hard-codes a metrics address or fetches a page (they read the replicas' reports,
    `reports:`), and none divides by a constant replica count."""
    text = (PRESETS / f"{name}.yaml").read_text()
    assert "8080" not in text and "127.0.0.1" not in text
    spec = load_policy_file(PRESETS / f"{name}.yaml")
    assert "replicas" not in spec.mode.model_fields_set  # no constant: a signal named `replicas`
    by_name = {s.name: s for s in spec.signals}
    assert by_name["replicas"].source == "scrape" and by_name["replicas"].aggregate == "count"
    assert by_name["replicas"].per == "replica"
    resolved = spec.resolved(StackPorts(metrics_port=18123))
    assert all(u == "reports:" for s in resolved.signals if s.source in ("scrape", "goodput") for u in s.urls)


def test_self_spec_algorithm_per_level():
    base = ("signals: [{name: x, source: local}]\nmode: {signal: x, enter_loaded_above: 8, leave_loaded_below: 4, "
            "%s}\n")
    spec = parse_policy(base % "sparse_self_spec_algorithm: quadratic")
    assert spec.mode.sparse_self_spec_algorithm == "quadratic" and spec.mode.loaded_self_spec_algorithm is None
    with pytest.raises(PolicyFileError, match="loaded_self_spec_algorithm is set but that level's mode is 'ar'"):
        parse_policy(base % "loaded_self_spec_algorithm: linear")
    with pytest.raises(PolicyFileError, match="mode.sparse_self_spec_algorithm"):
        parse_policy(base % "sparse_self_spec_algorithm: cubic")
    with pytest.raises(PolicyFileError, match="middle.self_spec_algorithm is set"):
        parse_policy(base % "middle: {enter_above: 5, leave_below: 3, self_spec_algorithm: quadratic}")


def test_the_cluster_preset_reads_the_stacks_prometheus_and_series():
    """The chart's default policy file: Prometheus signals whose URL and series selector come from
    the stack (`serve --prometheus-url --ray-selector`), never hard-coded; other braces in a
    query are PromQL's own and stay."""
    spec = load_policy_file(PRESETS / "cluster.yaml")
    raw = [s for s in spec.signals if s.source == "prometheus"]
    assert all(s.url == "{prometheus_url}" and "{ray_selector}" in s.query and "namespace" not in s.query for s in raw)
    assert spec.mode.enter_loaded_above > spec.mode.leave_loaded_below
    ports = StackPorts(prometheus_url="http://prom.monitoring:9090", ray_selector='{namespace="serving"}')
    prom = [s for s in spec.resolved(ports).signals if s.source == "prometheus"]
    assert {s.name for s in prom} == {"fleet_concurrency", "replicas"}
    assert all(s.url == "http://prom.monitoring:9090" for s in prom)
    assert all('ray_nld_replica_num_requests_running{namespace="serving"}' in s.query for s in prom)
    unscoped = {s.name: s.query for s in spec.resolved(StackPorts()).signals if s.source == "prometheus"}
    assert unscoped["replicas"] == "max(count by (ray_io_cluster) (ray_nld_replica_num_requests_running))"
    own = parse_policy("signals: [{name: q, source: prometheus, url: 'http://p:9090', "
                       "query: 'sum(up{job=\"ray\"}) + sum(x{ray_selector})'}]\n"
                       "mode: {signal: q, enter_loaded_above: 8, leave_loaded_below: 4}\n")
    (q,) = own.resolved(StackPorts(ray_selector='{a="b"}')).signals
    assert q.query == 'sum(up{job="ray"}) + sum(x{a="b"})'


def test_the_cluster_preset_calibrates_from_prometheus_federation():
    """The chart's default is calibrating: its `goodput` signal reads the release's replica series
    from Prometheus's /federate, the selector URL-encoded from `--ray-selector`."""
    from urllib.parse import parse_qs, urlsplit

    spec = load_policy_file(PRESETS / "cluster.yaml")
    assert spec.mode.goodput is not None and spec.mode.initial_mode == "ar"
    ports = StackPorts(prometheus_url="http://prom.monitoring:9090", ray_selector='{namespace="serving",app="x"}')
    (costs,) = [s for s in spec.resolved(ports).signals if s.source == "goodput"]
    (url,) = costs.urls
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "http://prom.monitoring:9090/federate"
    assert parse_qs(parts.query) == {"match[]": ['{__name__=~"ray_nld_replica_.*",namespace="serving",app="x"}']}
    (bare,) = [s for s in spec.resolved(StackPorts()).signals if s.source == "goodput"]
    assert parse_qs(urlsplit(bare.urls[0]).query) == {"match[]": ['{__name__=~"ray_nld_replica_.*"}']}


def test_the_cpu_preset_is_adaptive_with_8_token_drafts_at_every_load():
    """`adaptive_cpu.yaml` (what `make run` serves) differs from `adaptive.yaml` only in its draft
    tiers: 8 tokens whatever the load (on a CPU a forward costs about its tokens)."""
    cpu, base = (load_policy_file(PRESETS / f"{n}.yaml") for n in ("adaptive_cpu", "adaptive"))
    assert [(t.max_running, t.block_length) for t in cpu.engine.draft_tiers] == [(16, 8)]
    assert cpu.model_dump(exclude={"engine"}) == base.model_dump(exclude={"engine"})
    assert cpu.engine.model_dump(exclude={"draft_tiers"}) == base.engine.model_dump(exclude={"draft_tiers"})
