"""`replicas/layout.py`: a fixed local replica count (`--replicas`, `auto` resolved) and each
replica's share of the node's CPUs (the real stack with two replicas: tests/gateway/test_up.py)."""

from __future__ import annotations

import argparse

import pytest

from replicas.config import ReplicaConfig
from replicas.layout import (AUTO_REPLICAS_MAX, fixed_replicas_options, replica_count, replica_cpus_options,
                             replicas_arg)

CPU = ReplicaConfig(model_path="m")


@pytest.mark.parametrize("text,want", [("auto", "auto"), ("1", 1), ("3", 3)])
def test_the_flag_takes_auto_or_a_positive_count(text, want):
    assert replicas_arg(text) == want


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", ""])
def test_anything_else_is_refused_by_name(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="positive replica count or auto"):
        replicas_arg(bad)


@pytest.mark.parametrize("node_cpus,want", [(1, 1), (2, 2), (3, 3), (AUTO_REPLICAS_MAX + 4, AUTO_REPLICAS_MAX)])
def test_auto_on_a_cpu_is_one_replica_per_cpu_up_to_the_cap(node_cpus, want):
    assert replica_count("auto", node_cpus, CPU) == want


def test_auto_counts_replicas_of_the_cpus_each_is_given():
    assert replica_count("auto", 8, CPU, replica_cpus=2) == 4
    assert replica_count("auto", 4, CPU, replica_cpus=2) == 2
    assert replica_count("auto", 2, CPU, replica_cpus=4) == 1  # more than the node: one (capped later)


def test_auto_is_one_replica_on_a_gpu_or_with_a_bound_engine():
    assert replica_count("auto", 16, ReplicaConfig(model_path="m", device="cuda")) == 1
    assert replica_count("auto", 16, ReplicaConfig(model_path="m", engine_cpus=[0])) == 1


def test_a_count_is_kept_and_several_bound_engines_are_refused():
    assert replica_count(3, 2, CPU) == 3  # a count the node cannot hold is capped by replica_cpus_options
    assert replica_count(1, 2, ReplicaConfig(model_path="m", engine_cpus=[0])) == 1
    with pytest.raises(ValueError, match="--engine-cpus binds every replica's engine to the same CPUs"):
        replica_count(2, 2, ReplicaConfig(model_path="m", engine_cpus=[0]))


def test_a_fixed_count_replaces_autoscaling_and_shares_the_cpus():
    auto = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 8}, "max_ongoing_requests": 256}
    out, cpus, notes = fixed_replicas_options(auto, 2, node_cpus=2, replica_cpus=None)
    assert out == {"num_replicas": 2, "max_ongoing_requests": 256} and cpus == 1
    assert notes == ["--replicas fixes 2 replica(s): the autoscaling_config is not used"]
    assert "autoscaling_config" in auto  # the caller's options are not modified
    out, cpus, notes = fixed_replicas_options({"num_replicas": 5}, 3, node_cpus=8, replica_cpus=None)
    assert out == {"num_replicas": 3} and cpus == 2 and notes == []  # floor(8 / 3): whole torch threads
    assert fixed_replicas_options({}, 4, node_cpus=2, replica_cpus=None)[1] == 1  # never below one CPU
    assert fixed_replicas_options({}, 2, node_cpus=8, replica_cpus=1.5)[1] == 1.5  # the flag wins


def test_the_shared_cpus_keep_every_replica_on_the_node():
    """The chain main() runs: auto on a 2-CPU node gives two replicas of one CPU each, nothing capped;
    four asked of the same node are capped at two."""
    out, cpus, _ = fixed_replicas_options({}, replica_count("auto", 2, CPU), node_cpus=2, replica_cpus=None)
    out, capped = replica_cpus_options(out, 2, cpus)
    assert out["num_replicas"] == 2 and out["ray_actor_options"]["num_cpus"] == 1 and capped == []
    out, cpus, _ = fixed_replicas_options({}, 4, node_cpus=2, replica_cpus=None)
    out, capped = replica_cpus_options(out, 2, cpus)
    assert out["num_replicas"] == 2 and capped == ["num_replicas 4 -> 2 (each replica takes 1 of this node's 2 CPUs)"]


@pytest.mark.parametrize("argv,message", [
    (["--replicas", "2", "--engine-cpus", "0"], "--engine-cpus binds every replica's engine to the same CPUs"),
    (["--replica-cpus", "0"], "--replica-cpus must be positive"),
])
def test_python_m_replicas_refuses_a_bad_layout_in_one_line_before_ray_starts(argv, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "replicas", "--model", "models/nld-tiny-pystdlib", *argv],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "starting Ray" not in r.stdout
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr
