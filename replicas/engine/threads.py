"""The torch threads one engine step runs on: one for a small step on a CPU, all for a large one.

Why: on a CPU every operator of a forward is split statically over torch's OpenMP threads, and
each operator ends at a barrier. A step of a few tokens (AR with few requests, a short draft)
gains nothing from a second thread: its matmuls are reads of the weights, not arithmetic. But
when any other process (the serving path, the client) takes a core from one thread for a
moment, the others wait for it at the next barrier. Running such a step on one thread leaves
the other cores to those processes and removes the barrier. Steps of at least `min_tokens`
tokens keep every thread the process was given (measured: `docs/PERFORMANCE.md`, "Small steps
on one thread").

Contract: `step_threads(tokens, min_tokens)` is a context manager; inside it the calling
thread's torch intra-op threads are 1 when 0 < tokens < min_tokens, else unchanged, and the
count the thread had is restored on exit (so the process's setting, e.g. `torch_threads`, stays
the one source of the full count). `min_tokens` 0 turns it off. Costs two
`torch.set_num_threads` calls (under a microsecond each) per small step.
Non-goals: choosing the full count (the entry point's `torch_threads` / `engine_cpus`), CUDA
devices (their steps run on the GPU; the caller passes 0 there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def step_threads(tokens: int, min_tokens: int) -> Iterator[int]:
    """Run the block on one torch thread when 0 < `tokens` < `min_tokens`; yields the count used."""
    full = torch.get_num_threads()
    if full == 1 or not 0 < tokens < min_tokens:
        yield full
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(full)
