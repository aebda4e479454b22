"""The ingress settings for Ray Serve and the free ports a local stack gives HAProxy's side listeners."""

from __future__ import annotations

import socket

import pytest

from replicas.ingress import LOWEST_PORT, IngressConfig, ephemeral_range, free_port, local_ingress, serve_env


def test_a_free_port_lies_below_the_kernels_ephemeral_range_and_binds_on_every_interface():
    low, _ = ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert LOWEST_PORT <= port < low
        with socket.socket() as s:
            s.bind(("", port))  # what HAProxy does later: nothing took it


def test_no_bind_to_port_zero_is_handed_a_port_just_chosen():
    """The race this guards against: a port found with bind(0) and released is often the very
    next one the kernel gives to another process's bind(0) (a vLLM starting beside a stack took
    HAProxy's stats port so, and the stack failed to start)."""
    chosen = {free_port() for _ in range(50)}
    held = []
    try:
        for _ in range(500):
            s = socket.socket()
            s.bind(("", 0))
            held.append(s)
        taken = {s.getsockname()[1] for s in held}
    finally:
        for s in held:
            s.close()
    assert not chosen & taken


def test_a_port_in_use_is_never_chosen():
    low, _ = ephemeral_range()
    held = []
    try:
        for port in range(LOWEST_PORT, LOWEST_PORT + 40):  # occupy a small range, then force it
            s = socket.socket()
            try:
                s.bind(("", port))
            except OSError:
                s.close()
                continue
            held.append(s)
        busy = {s.getsockname()[1] for s in held}
        for _ in range(20):
            assert free_port(ephemeral=(LOWEST_PORT + 40, 60999)) not in busy
    finally:
        for s in held:
            s.close()
    assert low > LOWEST_PORT


def test_ports_already_chosen_are_not_chosen_again():
    """Chosen ports are not bound until Ray starts, so a bind check alone could pick one twice."""
    room = (LOWEST_PORT + 3, 60999)  # three candidates
    chosen: list[int] = []
    for _ in range(3):
        chosen.append(free_port(ephemeral=room, exclude=frozenset(chosen)))
    assert len(set(chosen)) == 3
    assert all(LOWEST_PORT <= p < LOWEST_PORT + 3 for p in chosen if p < room[0])


def test_with_no_room_below_the_ephemeral_range_a_free_port_is_an_ephemeral_one():
    port = free_port(ephemeral=(1024, 65535))
    assert 1 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaults(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ephemeral_range(f) == (40000, 50000)
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)
    f.write_text("garbage")
    assert ephemeral_range(f) == (32768, 60999)


def test_a_local_ingress_gives_each_side_listener_its_own_free_port():
    config = local_ingress()
    ports = [config.stats_port, config.metrics_port, config.fallback_port, config.fallback_grpc_port]
    assert len(set(ports)) == 4
    env = serve_env(config)
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == str(config.stats_port)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert serve_env(IngressConfig(kind="proxy"))["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_an_ingress_port_out_of_range_is_refused():
    with pytest.raises(ValueError, match="stats_port"):
        IngressConfig(stats_port=70000)


def test_the_replicas_own_port_range_reaches_serve_and_is_checked():
    from pydantic import ValidationError

    from replicas.ingress import IngressConfig, serve_env

    env = serve_env(IngressConfig(replica_port_min=31000, replica_port_max=31100))
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == \
        ("31000", "31100")
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in serve_env(IngressConfig(kind="proxy"))
    with pytest.raises(ValidationError):
        IngressConfig(replica_port_min=31100, replica_port_max=31000)
