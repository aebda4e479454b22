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


def test_the_controller_loop_period_is_the_one_serve_reads():
    """Serve's controller reads its loop period at import from the environment it inherits."""
    import subprocess
    import sys

    from replicas.__main__ import CONTROL_LOOP_INTERVAL_S, controller_environment

    env = controller_environment(CONTROL_LOOP_INTERVAL_S)
    out = subprocess.run([sys.executable, "-c", "from ray.serve._private import constants as c; "
                          "print(c.CONTROL_LOOP_INTERVAL_S)"], env={**__import__("os").environ, **env},
                         capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) == CONTROL_LOOP_INTERVAL_S == 0.5


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_non_positive_controller_loop_period_is_refused(bad):
    from replicas.__main__ import controller_environment

    with pytest.raises(ValueError, match="control-loop-interval-s"):
        controller_environment(bad)
