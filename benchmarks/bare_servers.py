"""Bare `BatchEngine`s in processes of their own, for the benchmarks that set the stack beside them.

Contract: `BareServer(model, args)` starts `python benchmarks/bare_servers.py` (optionally under a
prefix such as `taskset -c 0`): it loads the engine once, then runs one closed-loop window of
`args.seconds` after `args.settle_seconds` of unmeasured load for each level written to its stdin
(`peer_vllm.bare_engine`), and answers one JSON line. `BareSplit` is the stack's engine layout
without its serving path: one bound one-thread `BareServer` per CPU, the clients split between
them and measured at once. `args` carries `seconds`, `max_tokens`, `prompts_file` (JSON token-id
prompts), `settle_seconds` and `torch_threads`. Used by `peer_rotate.py` and `stack_vs_bare.py`.
Non-goals: HTTP, a client process (the engine is driven in-process), anything but `ar`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peer_vllm import PY, bare_engine  # noqa: E402


class BareServer:
    """The bare engine, loaded once: `measure(c)` runs one closed-loop window in the child."""

    def __init__(self, model: str, args, prefix: tuple[str, ...] = (), threads: int | None = None) -> None:
        """`prefix`: a command the child runs under (e.g. `taskset -c 0`); `threads`: its torch
        threads (default --torch-threads)."""
        cmd = [*prefix, PY, str(Path(__file__).resolve()), "--model", model, "--seconds",
               str(args.seconds), "--max-tokens", str(args.max_tokens), "--prompts-file", str(args.prompts_file),
               "--settle-seconds", str(args.settle_seconds)]
        if threads or args.torch_threads:
            cmd += ["--torch-threads", str(threads or args.torch_threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def measure(self, c: int) -> dict:
        self.start(c)
        return self.result()

    def start(self, c: int) -> None:
        """Start a window of `c` clients in the child (its result is `result()`)."""
        self.proc.stdin.write(f"{c}\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        """The started window's result, once it is over."""
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bare engine process exited ({self.proc.wait()})")
        return json.loads(line)

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def split_load(c: int, engines: int) -> list[int]:
    """`c` closed-loop clients over `engines` engines as evenly as the stack's balancer spreads
    them: [4, 4] for 8 over 2, [1, 0] for 1."""
    return [c // engines + (1 if i < c % engines else 0) for i in range(engines)]


class BareSplit:
    """The stack's engine layout without its serving path (system `bare_split`): one bare engine
    per CPU (at most `AUTO_REPLICAS_MAX`, as `up --replicas auto` starts replicas), each bound to
    its CPU with one torch thread, the level's clients split between them and run at once. Its
    step beside the stack's streamed ITL is what the serving path adds; beside `bare`'s (one
    engine on every CPU), what the one-engine-per-CPU layout changes."""

    def __init__(self, model: str, args) -> None:
        from replicas.layout import AUTO_REPLICAS_MAX

        cpus = sorted(os.sched_getaffinity(0))[:AUTO_REPLICAS_MAX]
        self.engines = [BareServer(model, args, ("taskset", "-c", str(cpu)), threads=1) for cpu in cpus]

    def measure(self, c: int) -> dict:
        busy = [(e, n) for e, n in zip(self.engines, split_load(c, len(self.engines))) if n]
        for e, n in busy:  # every engine's window starts before any result is read
            e.start(n)
        parts = [e.result() for e, _ in busy]
        return {"tokens_per_s": sum(r["tokens_per_s"] for r in parts),
                "step_p50_s": statistics.mean(r["step_p50_s"] for r in parts),
                "step_mean_s": statistics.mean(r["step_mean_s"] for r in parts),
                "engines": parts, "requests": None, "errors": {}, "errors_total": {}}

    def stop(self) -> None:
        for e in self.engines:
            e.stop()


def serve(args) -> None:
    """Child side of `BareServer`: one engine (the stack's default batch limit), a window per stdin line."""
    import torch

    from replicas.engine import EngineConfig, load_batch_engine

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    prompts = json.loads(args.prompts_file.read_text())
    engine = load_batch_engine(args.model, EngineConfig(max_batch_size=64, max_seq_len=512, max_waiting=256))
    for line in sys.stdin:
        r = bare_engine(args.model, prompts, int(line), args.seconds, args.max_tokens, None, engine=engine,
                        warm_s=args.settle_seconds)
        print(json.dumps(r), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="the child side of BareServer (reads levels on stdin)")
    p.add_argument("--model", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--prompts-file", type=Path, required=True)
    p.add_argument("--settle-seconds", type=float, required=True)
    p.add_argument("--torch-threads", type=int, default=None)
    serve(p.parse_args(argv))


if __name__ == "__main__":
    main()
