"""A closed-loop load client for any OpenAI-compatible server, run as its own process.

    python benchmarks/loadgen.py --url http://127.0.0.1:8000 --model nld --prompts prompts.json \\
        --concurrency 8 --seconds 10 [--settle-seconds 3] [--stream] [--extra-body '{"decoding_mode": "ar"}']

C clients each keep one `/v1/completions` request in flight (greedy, `ignore_eos`, fixed
`max_tokens`), cycling through the prompts from their own offset, for --settle-seconds
unmeasured, --seconds measured and --tail-seconds more, over kept-alive HTTP/1.1 connections
(one per client). Every request is recorded: start, first content byte (TTFT), the gaps
between content chunks (ITL, streaming), end, completion tokens (from `usage`), HTTP status,
the decoding mode our gateway reports (`x-nld-decoding-mode`), and the error if any: nothing is dropped. Tokens/s credits each request with the share of its
lifetime inside the measured window. Prints one JSON object (see `summarise`); --out also
saves the raw records. The same client measures every system of a comparison, so its own
cost, which shares the machine, is the same for all.
Non-goals: open-loop arrival processes, tokenisation (prompts are sent as the server gets them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.upstream import UpstreamConnectionError, UpstreamPool, UpstreamTimeout  # noqa: E402

HEADERS = {"Content-Type": "application/json"}


async def one_request(pool: UpstreamPool, body: bytes, stream: bool, timeout: float) -> dict:
    """Send one completion; the record of what happened (never raises)."""
    rec: dict = {"start": time.monotonic(), "first": None, "gaps": [], "tokens": 0, "status": None, "error": None}
    try:
        response = await pool.request("POST", "/v1/completions", body, HEADERS, timeout)
        rec["status"] = response.status
        rec["mode"] = response.headers.get("x-nld-decoding-mode")  # the mode our gateway ran it in
        if response.status != 200:
            raw = await response.read()
            await response.aclose()
            rec["error"] = raw[:300].decode("utf-8", "replace")
        elif not stream:
            raw = await response.read()
            await response.aclose()
            rec["first"] = time.monotonic()
            out = json.loads(raw)
            rec["tokens"] = out["usage"]["completion_tokens"]
        else:
            last = None
            async for line in response.lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    rec["error"] = json.dumps(event["error"])[:300]
                    continue
                now = time.monotonic()
                if any(c.get("text") for c in event.get("choices", [])):
                    if last is None:
                        rec["first"] = now
                    else:
                        rec["gaps"].append(now - last)
                    last = now
                if event.get("usage"):
                    rec["tokens"] = event["usage"]["completion_tokens"]
            await response.aclose()
    except (UpstreamConnectionError, UpstreamTimeout, OSError, ValueError, KeyError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["end"] = time.monotonic()
    return rec


async def closed_loop(url: str, bodies: list[bytes], clients: int, duration: float, stream: bool,
                      timeout: float) -> tuple[list[dict], float]:
    """`clients` loops, each with its own connection, until `duration` has passed."""
    records: list[dict] = []
    t0 = time.monotonic()
    deadline = t0 + duration

    async def client(k: int) -> None:
        pool = UpstreamPool(url, max_idle=1, idle_expiry_s=60)
        try:
            while time.monotonic() < deadline:
                prompt = k % len(bodies)
                k += 1
                rec = await one_request(pool, bodies[prompt], stream, timeout)
                rec["prompt"] = prompt
                records.append(rec)
                if rec["error"] is not None:
                    await asyncio.sleep(0.05)  # a failing server is not hammered; the error is counted
        finally:
            await pool.aclose()

    await asyncio.gather(*(client(k) for k in range(clients)))
    return records, t0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarise(records: list[dict], t0: float, window: tuple[float, float]) -> dict:
    """Tokens/s (overlap-weighted), latency, TTFT and ITL percentiles over the requests that ended
    inside the window; `errors`: the failures that ended inside it, `errors_total`: every failure
    of the run (settle and tail included, none dropped), both by status; `sent`: every request;
    `window_monotonic_s`: the measured window on CLOCK_MONOTONIC (shared by every process here)."""
    w0, w1 = t0 + window[0], t0 + window[1]
    tokens = 0.0
    lat, ttft, gaps, tpot = [], [], [], []
    errors: dict[str, int] = {}
    errors_total: dict[str, int] = {}
    modes: dict[str, int] = {}
    ok = 0
    for r in records:
        if r["error"] is not None:
            key = str(r["status"] or "transport")
            errors_total[key] = errors_total.get(key, 0) + 1
            if w0 <= r["end"] <= w1:
                errors[key] = errors.get(key, 0) + 1
            continue
        overlap = min(r["end"], w1) - max(r["start"], w0)
        if overlap > 0:
            tokens += r["tokens"] * overlap / max(r["end"] - r["start"], 1e-9)
        if w0 <= r["end"] <= w1:
            ok += 1
            if r.get("mode"):
                modes[r["mode"]] = modes.get(r["mode"], 0) + 1
            lat.append(r["end"] - r["start"])
            if r["first"] is not None:
                ttft.append(r["first"] - r["start"])
                if r["tokens"] > 1:
                    tpot.append((r["end"] - r["first"]) / (r["tokens"] - 1))
            gaps.extend(r["gaps"])
    return {
        "tokens_per_s": tokens / (w1 - w0), "window_monotonic_s": [w0, w1], "requests": ok, "errors": errors,
        "errors_total": errors_total, "sent": len(records),
        "latency_p50_s": percentile(lat, 0.5), "latency_p99_s": percentile(lat, 0.99),
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
        "itl_p50_s": percentile(gaps, 0.5), "itl_p99_s": percentile(gaps, 0.99),
        "tpot_p50_s": percentile(tpot, 0.5),
        "modes": modes,  # measured requests per `x-nld-decoding-mode` (empty for servers without it)
        "latency_by_prompt": by_prompt(records, w0, w1),
    }


def by_prompt(records: list[dict], w0: float, w1: float) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for r in records:
        if r["error"] is None and w0 <= r["end"] <= w1:
            out.setdefault(r["prompt"], []).append(r["end"] - r["start"])
    return out


def balanced_p50(by: dict) -> float | None:
    """The median over prompts of each prompt's median latency (see benchmarks/adaptive.py)."""
    medians = [statistics.median(v) for v in by.values() if v]
    return statistics.median(medians) if medians else None


def request_bodies(prompts: list, model: str, max_tokens: int, stream: bool, extra: dict) -> list[bytes]:
    bodies = []
    for p in prompts:
        body = {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": stream, **extra}
        if stream:
            body["stream_options"] = {"include_usage": True}
        bodies.append(json.dumps(body).encode())
    return bodies


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", type=Path, required=True, help="JSON list of prompts (strings or token-id lists)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--settle-seconds", type=float, default=3.0)
    p.add_argument("--tail-seconds", type=float, default=2.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=None, help="also save the raw records here")
    args = p.parse_args(argv)
    prompts = json.loads(args.prompts.read_text())
    bodies = request_bodies(prompts, args.model, args.max_tokens, args.stream, json.loads(args.extra_body))
    total = args.settle_seconds + args.seconds + args.tail_seconds
    records, t0 = asyncio.run(closed_loop(args.url, bodies, args.concurrency, total, args.stream, args.timeout))
    summary = summarise(records, t0, (args.settle_seconds, args.settle_seconds + args.seconds))
    if args.out:
        args.out.write_text(json.dumps({"t0": t0, "records": records}))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
