"""How a local node's CPUs are shared among the replicas `python -m replicas` starts.

Contract: pure functions over the deployment options dict (Serve's `num_replicas`,
`autoscaling_config`, `ray_actor_options`) and the node's CPU count: a fixed replica count
(`--replicas`, `auto` resolved here), each replica's reserved CPUs (its engine's torch
threads), the counts a node cannot hold capped with a note, and the CPU-list flags of the
pinned layout. Nothing here starts Ray or reads the environment. Non-goals: clusters (Ray and
the Helm chart place replicas there).
"""

from __future__ import annotations

import argparse
import os

from .config import ReplicaConfig


def cpu_list(text: str) -> list[int]:
    """`0,2,3` -> [0, 2, 3] (an argparse type)."""
    try:
        cpus = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want CPU ids separated by commas, e.g. 0 or 0,1; got {text!r}") from None
    if min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"CPU ids are >= 0, got {text!r}")
    return cpus


def bind_serving(cpus: list[int] | None) -> str | None:
    """Bind this process (Ray and the replicas it starts inherit it) to `cpus`; an error line or None."""
    if not cpus:
        return None
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, AttributeError) as e:
        return f"--serving-cpus {','.join(map(str, cpus))}: {getattr(e, 'strerror', None) or e}"
    return None


def replica_cpus_options(options: dict, node_cpus: int, replica_cpus: float | None) -> tuple[dict, list[str]]:
    """Deployment options with each replica's CPUs set and the replica count kept within the node.

    Ray starts a replica with OMP_NUM_THREADS = floor(its `num_cpus`) (1 when unset), and the
    engine process inherits it, so the CPUs a replica reserves are its engine's torch threads.
    Serve's default is one CPU: on a laptop the engine would run one thread on a multi-core
    machine. Locally the default is therefore the whole node (`node_cpus`), unless the flag or
    the config's `ray_actor_options.num_cpus` says otherwise; `num_replicas` and autoscaling's
    `min_replicas` / `max_replicas` are capped at the replicas the node holds (a replica Ray
    cannot place would stay pending). Returns (options, notes on what was capped)."""
    if replica_cpus is not None and replica_cpus <= 0:
        raise ValueError(f"--replica-cpus must be positive, got {replica_cpus:g}")
    out = {**options, "ray_actor_options": dict(options.get("ray_actor_options") or {})}
    cpus = replica_cpus if replica_cpus is not None else out["ray_actor_options"].get("num_cpus", node_cpus)
    out["ray_actor_options"]["num_cpus"] = cpus
    notes: list[str] = []
    if cpus <= 0:  # a config's num_cpus: 0 (replicas that reserve no CPU): nothing to cap
        return out, notes
    fits = max(int(node_cpus // cpus), 1)
    if isinstance(out.get("num_replicas"), int) and out["num_replicas"] > fits:
        notes.append(f"num_replicas {out['num_replicas']} -> {fits}")
        out["num_replicas"] = fits
    auto = dict(out.get("autoscaling_config") or {})
    for key in ("min_replicas", "max_replicas"):
        if auto.get(key, 0) > fits:
            notes.append(f"autoscaling {key} {auto[key]} -> {fits}")
            auto[key] = fits
    if auto:
        out["autoscaling_config"] = auto
    return out, [f"{n} (each replica takes {cpus:g} of this node's {node_cpus} CPUs)" for n in notes]


# `--replicas auto` on a CPU: one replica per CPU, at most this many, each with its share of the
# CPUs as its engine's torch threads. On the 2-core VM two one-thread replicas made 1.0-1.2x the
# tokens/s of one two-thread replica at 8-32 requests and the same at one (docs/PERFORMANCE.md,
# "One replica per CPU"): an engine thread preempted by serving work stalls no partner at an
# OpenMP barrier. The cap bounds memory (a replica is a Ray actor plus an engine process, each
# with its own copy of the weights); it was not measured on larger machines.
AUTO_REPLICAS_MAX = 4


def replicas_arg(text: str) -> str | int:
    """`auto` or a positive replica count (an argparse type)."""
    if text == "auto":
        return text
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"want a positive replica count or auto, got {text!r}")
    return count


def replica_count(spec: str | int, node_cpus: int, config: ReplicaConfig, replica_cpus: float | None = None) -> int:
    """The fixed local replica count `--replicas` asks for: `auto` is one per CPU (per
    `replica_cpus` when given) up to `AUTO_REPLICAS_MAX` on a CPU device, else one (a GPU, or an
    engine bound by --engine-cpus)."""
    if spec != "auto":
        if spec > 1 and config.engine_cpus:
            raise ValueError(f"--engine-cpus binds every replica's engine to the same CPUs: use it with one "
                             f"replica, not --replicas {spec}")
        return spec
    if config.device != "cpu" or config.engine_cpus:
        return 1
    per = replica_cpus if replica_cpus and replica_cpus > 0 else 1
    return max(1, min(int(node_cpus // per), AUTO_REPLICAS_MAX))


def fixed_replicas_options(options: dict, count: int, node_cpus: int,
                           replica_cpus: float | None) -> tuple[dict, float, list[str]]:
    """Deployment options for exactly `count` replicas (Serve's `num_replicas`; a config's or a
    policy's `autoscaling_config` is set aside, with a note) and each replica's CPUs: the flag's,
    else an equal share of the node. Returns (options, replica CPUs, notes)."""
    out = {k: v for k, v in options.items() if k != "autoscaling_config"}
    out["num_replicas"] = count
    notes = [f"--replicas fixes {count} replica(s): the autoscaling_config is not used"] \
        if options.get("autoscaling_config") else []
    return out, replica_cpus if replica_cpus is not None else max(node_cpus // count, 1), notes
