"""`python -m replicas`: Ray's metrics port follows a loopback --host (the environment Ray needs
for it; the listening socket itself is checked on the real stack in tests/gateway/test_up.py)."""

from __future__ import annotations

import pytest

from replicas.__main__ import RAY_LOCAL_NODE_ENV, is_loopback, ray_environment


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_a_loopback_host_keeps_ray_on_loopback(host):
    assert is_loopback(host) and ray_environment(host) == {RAY_LOCAL_NODE_ENV: "0"}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "replicas.svc"])
def test_other_hosts_leave_ray_alone(host):
    assert not is_loopback(host) and ray_environment(host) == {}


def test_the_variable_is_the_one_ray_reads():
    """If Ray renamed it, the loopback binding would silently stop working."""
    from ray._private import ray_constants

    assert ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR == RAY_LOCAL_NODE_ENV
