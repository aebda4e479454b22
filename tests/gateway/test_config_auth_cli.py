"""GatewayConfig validation, API keys (constant-time check, file and Secret-mount loading, never
shown), and the CLI's `serve` configuration (the only place that reads the environment)."""

from __future__ import annotations

import json
import logging

import pytest
import yaml
from pydantic import ValidationError

from gateway import GatewayConfig
from gateway.auth import ApiKeyAuth, load_api_keys
from gateway.bootstrap import open_policy
from gateway.cli import build_parser, main, policy_spec, serve_config
from gateway.up import replicas_command, up_config, up_policy


def test_config_defaults_and_validation():
    c = GatewayConfig()
    assert (c.model_name, c.auth_enabled, c.max_body_bytes, c.max_tokens_limit, c.max_n, c.connect_retries) == (
        "nld", False, 1 << 20, 4096, 4, 1)
    assert GatewayConfig(replica_url="http://proxy:8000/").replica_url == "http://proxy:8000"
    for bad in ({"replica_url": "proxy:8000"}, {"auth_enabled": True}, {"max_n": 0}, {"nope": 1},
                {"default_max_tokens": 10, "max_tokens_limit": 5}, {"api_keys": {" padded "}}):
        with pytest.raises(ValidationError):
            GatewayConfig(**bad)


def test_keys_never_in_repr():
    c = GatewayConfig(auth_enabled=True, api_keys={"sk-secret-1"})
    assert "sk-secret-1" not in repr(c) and "sk-secret-1" not in str(c)
    assert "sk-secret-1" not in repr(ApiKeyAuth(c.api_keys))


def test_api_key_check():
    auth = ApiKeyAuth({"sk-a", "sk-b"})
    assert auth.check("Bearer sk-a") and auth.check("bearer sk-b") and auth.check("Bearer  sk-a ")
    for header in (None, "", "Bearer", "Bearer ", "Bearer sk-c", "sk-a", "Basic sk-a", "Bearer sk-a2", "Bearer sk-"):
        assert not auth.check(header)


def test_load_keys_from_file_and_secret_mount(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text("# comment\nsk-one\n\n  sk-two  \n")
    assert load_api_keys(f) == {"sk-one", "sk-two"}
    # a Kubernetes Secret mount: one file per key, plus ..data / timestamped dirs and symlinks
    mount = tmp_path / "secret"
    real = mount / "..2026_01_01"
    real.mkdir(parents=True)
    (real / "key-a").write_text("sk-a\n")
    (real / "key-b").write_text("sk-b")
    (mount / "..data").symlink_to(real.name)
    (mount / "key-a").symlink_to("..data/key-a")
    (mount / "key-b").symlink_to("..data/key-b")
    assert load_api_keys(mount) == {"sk-a", "sk-b"}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for bad in (empty, tmp_path / "missing"):
        with pytest.raises(ValueError):
            load_api_keys(bad)


def args(*argv):
    return build_parser().parse_args(["serve", "--replica-url", "http://127.0.0.1:8001", *argv])


def test_serve_config_from_flags_and_env(tmp_path):
    keys = tmp_path / "k"
    keys.write_text("sk-env\n")
    assert serve_config(args(), {}).auth_enabled is False  # local default: auth off
    c = serve_config(args(), {"NLD_API_KEY_FILE": str(keys)})
    assert c.auth_enabled and c.api_keys == {"sk-env"}
    flag = tmp_path / "k2"
    flag.write_text("sk-flag\n")
    assert serve_config(args("--api-key-file", str(flag)), {"NLD_API_KEY_FILE": str(keys)}).api_keys == {"sk-flag"}
    assert serve_config(args("--no-auth"), {"NLD_API_KEY_FILE": str(keys)}).auth_enabled is False
    c = serve_config(args("--model-name", "m", "--max-tokens-limit", "100", "--max-inflight", "8",
                          "--request-timeout", "30"), {})
    assert (c.model_name, c.max_tokens_limit, c.default_max_tokens, c.max_inflight_requests, c.request_timeout_s) == (
        "m", 100, 100, 8, 30.0)
    assert serve_config(args(), {}).replica_routing == "direct"  # the replicas' own ports, once learned
    assert serve_config(args("--replica-routing", "ingress"), {}).replica_routing == "ingress"


def test_serve_bad_config_exits_2_without_echoing_keys(tmp_path, capsys, caplog):
    keys = tmp_path / "k"
    keys.write_text("sk-very-secret\n")
    with caplog.at_level(logging.DEBUG):
        code = main(["serve", "--replica-url", "nope://x", "--api-key-file", str(keys)])
    err = capsys.readouterr().err
    assert code == 2 and "replica_url" in err
    assert "sk-very-secret" not in err and "sk-very-secret" not in caplog.text
    assert main(["serve", "--replica-url", "http://x", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--replica-url", "http://x"], environ={"NLD_API_KEY_FILE": str(tmp_path / "missing")}) == 2


@pytest.mark.slow
def test_serve_runs_the_gateway_process(tmp_path):
    """`python -m gateway serve` on a loopback port: live, not ready (no replica), auth from the env."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from tests.serving import free_port

    port = free_port()  # the gateway binds it later: not a just-released ephemeral port
    keys = tmp_path / "keys"
    keys.write_text("sk-proc\n")
    env = {**os.environ, "NLD_API_KEY_FILE": str(keys)}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--replica-url", "http://127.0.0.1:9",
                             "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                assert httpx.get(f"{base}/health").json() == {"status": "ok"}
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "gateway did not start"
                time.sleep(0.2)
        assert httpx.get(f"{base}/ready").status_code == 503
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"authorization": "Bearer sk-proc"}).status_code == 200
        r = httpx.post(f"{base}/v1/completions", json={"model": "nld", "prompt": "x"},
                       headers={"authorization": "Bearer sk-proc"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0].decode()
    assert "sk-proc" not in out


MODEL = "models/nld-tiny-pystdlib"  # `up` checks the checkpoint first; nothing starts on a bad config


def up_args(*argv):
    return build_parser().parse_args(["up", "--model", MODEL, *argv])


def test_up_takes_its_keys_like_serve(tmp_path):
    keys = tmp_path / "k"
    keys.write_text("sk-env\n")
    flag = tmp_path / "k2"
    flag.write_text("sk-flag\n")
    assert up_config(up_args(), "m", {}).auth_enabled is False  # local default: auth off
    c = up_config(up_args(), "m", {"NLD_API_KEY_FILE": str(keys)})
    assert c.auth_enabled and c.api_keys == {"sk-env"} and c.model_name == "m"
    assert up_config(up_args("--api-key-file", str(flag)), "m", {"NLD_API_KEY_FILE": str(keys)}).api_keys == {
        "sk-flag"}
    assert up_config(up_args("--no-auth"), "m", {"NLD_API_KEY_FILE": str(keys)}).auth_enabled is False


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("content", [None, "", "# only a comment\n\n"])
def test_up_bad_key_file_is_one_line_and_exit_2(tmp_path, capsys, how, content):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    argv = ["up", "--model", MODEL] + (["--api-key-file", str(path)] if how == "flag" else [])
    code = main(argv, environ={"NLD_API_KEY_FILE": str(path)} if how == "env" else {})
    out = capsys.readouterr()
    assert code == 2 and out.out == ""  # before anything starts ("starting the replicas" is never printed)
    (line,) = out.err.splitlines()
    assert line.startswith("nld-gateway up: invalid configuration: api key path") and str(path) in line


def test_up_refuses_several_replicas_on_one_bound_engine_cpu_set(capsys):
    code = main(["up", "--model", MODEL, "--engine-cpus", "0", "--replicas", "2"], environ={})
    out = capsys.readouterr()
    assert code == 2 and "starting the replicas" not in out.out
    (line,) = out.err.splitlines()
    assert "--engine-cpus binds every replica's engine to the same CPUs" in line and "--replicas 2" in line


def test_up_bad_key_file_in_a_real_process(tmp_path):
    """`python -m gateway up` itself: status 2, one line on stderr, no traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NLD_API_KEY_FILE": str(tmp_path / "missing")}
    r = subprocess.run([sys.executable, "-m", "gateway", "up", "--model", MODEL], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "neither a file nor a directory" in r.stderr


def test_serve_and_up_fill_the_policy_ports(tmp_path):
    """A policy's {metrics_host}/{metrics_port}: `serve`'s flags, `up`'s own metrics port (the
    presets read the replicas' reports instead; a policy reading Ray's metrics page names them)."""
    from gateway.metrics import GatewayMetrics, InflightCounter
    from policies import PRESETS

    preset = yaml.safe_load((PRESETS / "adaptive.yaml").read_text())
    for s in preset["signals"]:
        if s["source"] in ("scrape", "goodput"):
            s["urls"] = ["http://{metrics_host}:{metrics_port}/metrics"]
    ray_page = tmp_path / "ray_page.yaml"
    ray_page.write_text(yaml.safe_dump(preset))
    metrics = GatewayMetrics(InflightCounter())
    policy = open_policy(policy_spec(args("--policy", str(ray_page), "--replica-metrics-host",
                                          "10.0.0.9", "--replica-metrics-port", "9100")), metrics)
    urls = {u for s in policy.current.spec.signals if s.source == "scrape" for u in s.urls}
    assert urls == {"http://10.0.0.9:9100/metrics"}
    a = up_args("--policy", str(ray_page), "--metrics-port", "18080")
    spec, autoscaling = up_policy(a)
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 8)  # the preset's Serve autoscaling
    policy = open_policy(spec, GatewayMetrics(InflightCounter()))
    assert {u for s in policy.current.spec.signals if s.source == "scrape" for u in s.urls} == {
        "http://127.0.0.1:18080/metrics"}


def test_up_passes_the_replica_resources_through():
    """`up`'s --replica-cpus and --torch-threads reach `python -m replicas`; absent, they are left to it."""
    cmd = replicas_command(up_args(), "m", None)
    assert "--replica-cpus" not in cmd and "--torch-threads" not in cmd and "--metrics-report-interval-ms" not in cmd
    cmd = replicas_command(up_args("--replica-cpus", "1.5", "--torch-threads", "3", "--metrics-report-interval-ms",
                                   "10000", "--replicas", "policy"), "m", {"max_replicas": 2})
    assert cmd[cmd.index("--replica-cpus") + 1] == "1.5" and cmd[cmd.index("--torch-threads") + 1] == "3"
    assert cmd[cmd.index("--metrics-report-interval-ms") + 1] == "10000"
    assert json.loads(cmd[cmd.index("--autoscaling-json") + 1]) == {"max_replicas": 2}


def test_up_fixes_the_replica_count_unless_the_policy_autoscales():
    """By default `up` asks for `--replicas auto` (one replica per CPU, resolved by `python -m
    replicas`) and the policy's autoscaling block stays out; `--replicas policy` passes the block."""
    cmd = replicas_command(up_args(), "m", {"max_replicas": 8})
    assert cmd[cmd.index("--replicas") + 1] == "auto" and "--autoscaling-json" not in cmd
    cmd = replicas_command(up_args("--replicas", "3"), "m", {"max_replicas": 8})
    assert cmd[cmd.index("--replicas") + 1] == "3" and "--autoscaling-json" not in cmd
    cmd = replicas_command(up_args("--replicas", "policy"), "m", {"max_replicas": 8})
    assert "--replicas" not in cmd and json.loads(cmd[cmd.index("--autoscaling-json") + 1]) == {"max_replicas": 8}
    for bad in ("0", "-2", "many"):
        with pytest.raises(SystemExit):
            up_args("--replicas", bad)


def test_up_passes_the_cpu_layout_through():
    """`up`'s --engine-cpus and --serving-cpus reach `python -m replicas`; absent, nothing is bound."""
    cmd = replicas_command(up_args(), "m", None)
    assert "--engine-cpus" not in cmd and "--serving-cpus" not in cmd
    cmd = replicas_command(up_args("--engine-cpus", "0", "--serving-cpus", "1"), "m", None)
    assert cmd[cmd.index("--engine-cpus") + 1] == "0" and cmd[cmd.index("--serving-cpus") + 1] == "1"


def test_up_passes_parallel_min_tokens_through():
    assert "--parallel-min-tokens" not in replicas_command(up_args(), "m", None)  # the replicas' default
    cmd = replicas_command(up_args("--parallel-min-tokens", "0"), "m", None)
    assert cmd[cmd.index("--parallel-min-tokens") + 1] == "0"


def test_up_passes_max_num_batched_tokens_through():
    assert "--max-num-batched-tokens" not in replicas_command(up_args(), "m", None)  # the device's default
    cmd = replicas_command(up_args("--max-num-batched-tokens", "2048"), "m", None)
    assert cmd[cmd.index("--max-num-batched-tokens") + 1] == "2048"
