"""`python -m replicas`: Ray's metrics port follows a loopback --host (the environment Ray needs
for it; the listening socket itself is checked on the real stack in tests/gateway/test_up.py)."""

from __future__ import annotations

import pytest

from replicas.__main__ import RAY_LOCAL_NODE_ENV, is_loopback, ray_environment, replica_cpus_options


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


def test_a_local_replica_reserves_the_whole_node_by_default():
    """Ray gives a replica's engine floor(num_cpus) torch threads; Serve's default is 1 CPU."""
    out, notes = replica_cpus_options({}, node_cpus=8, replica_cpus=None)
    assert out["ray_actor_options"]["num_cpus"] == 8 and notes == []


def test_the_flag_beats_the_config_and_the_config_beats_the_default():
    conf = {"ray_actor_options": {"num_cpus": 2, "num_gpus": 0}, "num_replicas": 2}
    out, notes = replica_cpus_options(conf, node_cpus=8, replica_cpus=None)
    assert out["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0} and out["num_replicas"] == 2 and notes == []
    out, _ = replica_cpus_options(conf, node_cpus=8, replica_cpus=4)
    assert out["ray_actor_options"]["num_cpus"] == 4
    assert conf["ray_actor_options"]["num_cpus"] == 2  # the caller's options are not modified


def test_replica_counts_the_node_cannot_hold_are_capped():
    auto = {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 16}
    out, notes = replica_cpus_options({"autoscaling_config": auto}, node_cpus=2, replica_cpus=None)
    assert out["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 16}
    assert len(notes) == 2 and "max_replicas 8 -> 1" in notes[1]
    out, notes = replica_cpus_options({"autoscaling_config": auto}, node_cpus=8, replica_cpus=2)
    assert out["autoscaling_config"]["max_replicas"] == 4 and out["autoscaling_config"]["min_replicas"] == 2
    out, notes = replica_cpus_options({"num_replicas": 3}, node_cpus=4, replica_cpus=2)
    assert out["num_replicas"] == 2 and notes == ["num_replicas 3 -> 2 (each replica takes 2 of this node's 4 CPUs)"]
    zero = {"ray_actor_options": {"num_cpus": 0}, "num_replicas": 5}  # a config's CPU-free replicas: no cap
    assert replica_cpus_options(zero, node_cpus=2, replica_cpus=None) == (zero, [])


@pytest.mark.parametrize("bad", [0, -1])
def test_a_non_positive_replica_cpu_count_is_refused(bad):
    with pytest.raises(ValueError, match="--replica-cpus must be positive"):
        replica_cpus_options({}, node_cpus=2, replica_cpus=bad)


def test_the_node_stats_interval_is_the_one_rays_agent_reads():
    """Ray's agent reads its statistics period at import from the environment it inherits."""
    import os
    import subprocess
    import sys

    from replicas.__main__ import NODE_STATS_INTERVAL_MS, agent_environment

    env = agent_environment(NODE_STATS_INTERVAL_MS)
    out = subprocess.run([sys.executable, "-c", "from ray.dashboard.modules.reporter import reporter_consts as c; "
                          "print(c.REPORTER_UPDATE_INTERVAL_MS)"], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) == NODE_STATS_INTERVAL_MS == 30_000
    with pytest.raises(ValueError, match="node-stats-interval-ms"):
        agent_environment(0)


def test_engine_cpus_reach_the_replica_config_and_set_its_threads():
    import argparse

    from replicas.__main__ import cpu_list, replica_config_from

    args = argparse.Namespace(config=None, model="m", model_name=None, torch_threads=None, engine_cpus=cpu_list("0,2"))
    config, _ = replica_config_from(args)
    assert config.engine_cpus == [0, 2] and config.engine_threads() == 2  # one torch thread per bound CPU
    args.torch_threads = 1
    assert replica_config_from(args)[0].engine_threads() == 1  # an explicit thread count wins
    assert replica_config_from(args)[0].advertise_address is True  # behind HAProxy: own port named
    args.ingress = "proxy"  # no own port behind Serve's Python proxy: nothing to name
    assert replica_config_from(args)[0].advertise_address is False
    for bad in ("x", "0,,1", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            cpu_list(bad)


def test_parallel_min_tokens_reaches_the_engine_config(tmp_path):
    """--parallel-min-tokens overrides the config file's engine block, keeping its other limits."""
    import argparse

    from replicas.__main__ import replica_config_from

    conf = tmp_path / "serve.yaml"
    conf.write_text("applications:\n- args: {model_path: m, engine: {max_batch_size: 4, parallel_min_tokens: 2}}\n")
    args = argparse.Namespace(config=str(conf), model=None, model_name=None, parallel_min_tokens=None)
    assert replica_config_from(args)[0].engine_config().parallel_min_tokens == 2
    args.parallel_min_tokens = 0
    config = replica_config_from(args)[0]
    assert config.engine.max_batch_size == 4 and config.engine_config().parallel_min_tokens == 0


def test_serving_cpus_bind_this_process_or_say_why_not():
    import os

    from replicas.__main__ import bind_serving

    before = os.sched_getaffinity(0)
    try:
        assert bind_serving(None) is None and os.sched_getaffinity(0) == before
        one = min(before)
        assert bind_serving([one]) is None and os.sched_getaffinity(0) == {one}
        error = bind_serving([4095])
        assert error.startswith("--serving-cpus 4095: ") and os.sched_getaffinity(0) == {one}
    finally:
        os.sched_setaffinity(0, before)


def test_max_num_batched_tokens_reaches_the_engine_config(tmp_path):
    """--max-num-batched-tokens overrides the config file's engine block; unset, the device decides."""
    import argparse

    from replicas.__main__ import replica_config_from

    conf = tmp_path / "serve.yaml"
    conf.write_text("applications:\n- args: {model_path: m, engine: {max_batch_size: 4}}\n")
    args = argparse.Namespace(config=str(conf), model=None, model_name=None, max_num_batched_tokens=None)
    assert replica_config_from(args)[0].engine_config().max_num_batched_tokens == 512  # a CPU's default
    args.max_num_batched_tokens = 2048
    config = replica_config_from(args)[0]
    assert config.engine.max_batch_size == 4 and config.engine_config().max_num_batched_tokens == 2048
    args.max_num_batched_tokens = 0
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        replica_config_from(args)
