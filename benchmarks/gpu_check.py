"""GPU check: a random-weight NLD model with the 8B shapes, bfloat16, on one GPU.

For the eager runner and for the CUDA-graph runner it measures: AR decode at batch 1 through
`Engine.generate` (tokens/s against the memory-bandwidth bound: weight bytes read per token), the
bare forward of one AR step (queued back to back, and synchronised each step as a decode loop
is), one 32-token self-speculation cycle (a bidirectional draft pass, with and without an r=128
draft LoRA, plus a 32-token causal verify pass) against one AR step, and one AR step at batch 32.
Quadratic self-speculation (issue 15): one fused cycle (B drafts + B groups of B masks, the LoRA
on the mask rows, logits of every row) at B = 4, 8, 16, 32 against one AR step, both timed with
a device synchronisation after every pass; target: <= 1.3 AR steps at the best B.
It also compares the two runners' logits and greedy tokens, profiles an eager step (GPU
kernel time, host operators), and, on a 4-layer float32 model with the 8B widths, checks that
the graph runner's tokens equal the eager runner's and that greedy self-spec equals AR. The paged
KV cache (engine v2): `BatchEngine` under CUDA graphs equals eager with mixed modes, shared
prefixes (prefix cache), and a pool small enough to preempt; AR throughput of 64 concurrent
sequences through `BatchEngine` on the 8B shapes; the KV blocks `gpu_memory_utilization`
measures. Weights are generated on the device (no checkpoint on disk); each section is
recorded even when a later one fails.

    python benchmarks/gpu_check.py [--out FILE]          # on a CUDA machine
    python benchmarks/gpu_check.py --small --device cpu  # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from replicas.engine import DecodeParams, Engine
from replicas.engine.config import ModelConfig
from replicas.engine.graph_runner import CudaGraphRunner
from replicas.engine.kv_cache import KVCache
from replicas.engine.model import NLDModel
from replicas.engine.rope import compute_inv_freq
from replicas.engine.runner import ModelRunner
from replicas.engine.sequence import ForwardPass
from replicas.engine.testing import random_config

PEAK_BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35}  # HBM spec sheets (SXM)
SHAPES = {
    "8b": dict(layers=34, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=131072),
    "small": dict(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=1024),
}


def build_model(cfg: ModelConfig, device: str, dtype: torch.dtype, lora_rank: int) -> NLDModel:
    with torch.device("meta"):
        model = NLDModel(cfg).to(dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.inv_freq = compute_inv_freq(cfg.rope, cfg.head_dim).to(device)
    if lora_rank:
        inner = cfg.num_attention_heads * cfg.head_dim
        model.set_lora([(0.01 * torch.randn(lora_rank, inner, device=device, dtype=dtype),
                         0.01 * torch.randn(cfg.hidden_size, lora_rank, device=device, dtype=dtype))
                        for _ in range(cfg.num_hidden_layers)])
    model.fuse_projections()  # as `Engine.from_pretrained` loads a model
    return model.eval().requires_grad_(False)


def graph_runner_cls(dev: str):
    """The CUDA-graph runner; off CUDA its static-buffer path without capture (a smoke run)."""
    return CudaGraphRunner if dev == "cuda" else (lambda m, c: CudaGraphRunner(m, c, capture=False))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, iters: int, *, sync_each: bool = False) -> float:
    """Mean seconds per call after warm-up; `sync_each` waits for the device after every call."""
    for _ in range(3):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
        if sync_each:
            sync(device)
    sync(device)
    return (time.perf_counter() - t0) / iters


def measure_runner(name: str, runner_cls, model: NLDModel, prompt: list[int], args, dev: str) -> dict:
    """Bare passes through one runner: AR step, self-spec cycle, batch-32 AR step."""
    cfg = model.config
    n, mask_id, iters = len(prompt), cfg.mask_token_id, (20 if dev == "cuda" else 3)
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=args.batch, num_kv_heads=cfg.num_key_value_heads,
                    max_len=n + 64, head_dim=cfg.head_dim, device=dev, dtype=model.encoder.norm.weight.dtype)
    runner = runner_cls(model, cache)
    t0 = time.perf_counter()
    runner.run([(s, ForwardPass(prompt, 0, True, all_logits=False)) for s in range(args.batch)])
    sync(dev)
    prefill_s = time.perf_counter() - t0
    step = [(0, ForwardPass([5], n, True, all_logits=False))]
    draft = [(0, ForwardPass([5] + [mask_id] * 31, n, False, lora=False))]
    draft_lora = [(0, ForwardPass([5] + [mask_id] * 31, n, False, lora=True))]
    verify = [(0, ForwardPass(list(range(300, 332)), n, True))]
    batch_step = [(s, ForwardPass([5 + s], n, True, all_logits=False)) for s in range(args.batch)]
    r = {
        "runner": name,
        "prefill_batch_ms": prefill_s * 1e3,
        "ar_step_ms": timed(lambda: runner.run(step), dev, iters) * 1e3,
        "ar_step_synced_ms": timed(lambda: runner.run(step), dev, iters, sync_each=True) * 1e3,
        "draft_pass_ms": timed(lambda: runner.run(draft), dev, iters) * 1e3,
        "draft_pass_lora_ms": timed(lambda: runner.run(draft_lora), dev, iters) * 1e3,
        "verify_pass_ms": timed(lambda: runner.run(verify), dev, iters) * 1e3,
        f"ar_step_batch{args.batch}_ms": timed(lambda: runner.run(batch_step), dev, iters) * 1e3,
    }
    r["self_spec_cycle_ms"] = r["draft_pass_ms"] + r["verify_pass_ms"]
    r["self_spec_cycle_lora_ms"] = r["draft_pass_lora_ms"] + r["verify_pass_ms"]
    r["self_spec_cycle_over_ar_step"] = r["self_spec_cycle_ms"] / r["ar_step_synced_ms"]
    r["self_spec_cycle_lora_over_ar_step"] = r["self_spec_cycle_lora_ms"] / r["ar_step_synced_ms"]
    r[f"ar_batch{args.batch}_tokens_per_s"] = args.batch / r[f"ar_step_batch{args.batch}_ms"] * 1e3
    r["logits_step"] = runner.run(step)[0]  # compared across runners, dropped before saving
    return r


def measure_engine(engine: Engine, prompt: list[int], new_tokens: int) -> dict:
    ar = DecodeParams(mode="ar", max_new_tokens=new_tokens + 1, ignore_eos=True, draft_lora=False)
    engine.generate(prompt, ar)  # warm-up: sizes generate's engine once, captures its graphs
    # both runs below find the prompt in the prefix cache, so their difference is the decode
    prefill_only = engine.generate(prompt, ar.with_(max_new_tokens=1)).seconds
    full = engine.generate(prompt, ar)
    decode_s = (full.seconds - prefill_only) / full.forward_passes
    return {"ar_decode_tokens_per_s": 1.0 / decode_s, "ar_step_ms_engine": decode_s * 1e3,
            "tokens": full.token_ids}


def profile_eager(model: NLDModel, prompt: list[int], dev: str) -> dict:
    """Where an eager step's time goes: GPU kernel time per AR step (top kernels) and the host's
    top operators over a short eager `Engine.generate`."""
    from torch.profiler import ProfilerActivity, profile

    def self_time(e, kind: str) -> float:
        return getattr(e, f"self_{kind}_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)

    cfg = model.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=len(prompt) + 64, head_dim=cfg.head_dim, device=dev, dtype=model.encoder.norm.weight.dtype)
    runner = ModelRunner(model, cache)
    runner.run([(0, ForwardPass(prompt, 0, True, all_logits=False))])
    step = [(0, ForwardPass([5], len(prompt), True, all_logits=False))]
    runner.run(step)
    sync(dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(5):
            runner.run(step)
        sync(dev)
    ev = prof.key_averages()
    kernels = sorted(ev, key=lambda e: self_time(e, "device"), reverse=True)
    out = {"gpu_kernel_ms_per_ar_step": sum(self_time(e, "device") for e in ev) / 5 / 1e3,
           "kernel_launches_per_ar_step": sum(e.count for e in ev if self_time(e, "device") > 0) / 5,
           "top_kernels_ms_per_step": {e.key[:80]: self_time(e, "device") / 5 / 1e3 for e in kernels[:8]}}
    engine = Engine(model, runner_cls=ModelRunner)
    params = DecodeParams(mode="ar", max_new_tokens=9, ignore_eos=True)
    engine.generate(prompt, params)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        engine.generate(prompt, params)
        out["engine_generate_8_steps_ms"] = (time.perf_counter() - t0) * 1e3
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    out["engine_top_host_ops_ms"] = {e.key[:80]: e.self_cpu_time_total / 1e3 for e in host[:10]}
    return out


def quadratic_cycles(model: NLDModel, runner_cls, prompt: list[int], dev: str, blocks=(4, 8, 16, 32)) -> dict:
    """One quadratic self-spec cycle per block B (a B (B + 1)-token pass: drafts causal, mask
    groups with the draft LoRA, every row's logits) and one AR step, over the same cached
    prompt, each synchronised after every pass; ratio = cycle / AR step."""
    from replicas.engine.modes.quadratic import group_mask, group_positions

    cfg = model.config
    n, mask_id, iters = len(prompt), cfg.mask_token_id, (20 if dev == "cuda" else 2)
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=n + max(blocks) * (max(blocks) + 1) + 1, head_dim=cfg.head_dim, device=dev,
                    dtype=model.encoder.norm.weight.dtype)
    runner = runner_cls(model, cache)
    runner.run([(0, ForwardPass(prompt, 0, True, all_logits=False))])
    step = [(0, ForwardPass([5], n, True, all_logits=False))]
    out = {"ar_step_synced_ms": timed(lambda: runner.run(step), dev, iters, sync_each=True) * 1e3, "blocks": {}}
    for b in blocks:
        tokens = list(range(300, 300 + b)) + [mask_id] * (b * b)
        cycle = [(0, ForwardPass(tokens, n, False, mask=group_mask(b, b), positions=group_positions(n, b, b),
                                 lora_tokens=[False] * b + [True] * (b * b)))]
        ms = timed(lambda: runner.run(cycle), dev, iters, sync_each=True) * 1e3
        out["blocks"][b] = {"tokens": len(tokens), "cycle_ms": ms, "cycle_over_ar_step": ms / out["ar_step_synced_ms"]}
    out["ar_step_synced_after_ms"] = timed(lambda: runner.run(step), dev, iters, sync_each=True) * 1e3
    within = [b for b, r in out["blocks"].items() if r["cycle_over_ar_step"] <= 1.3]
    out["largest_block_within_1.3_ar_steps"] = max(within) if within else None
    return out


def check_identity_fp32(dev: str, small: bool) -> dict:
    """8B widths, 4 layers, float32: graph vs eager tokens, and greedy self-spec == AR under
    graphs (bfloat16 near-ties of random weights make those comparisons uninformative)."""
    shape = dict(SHAPES["small" if small else "8b"], layers=2 if small else 4)
    cfg = ModelConfig.from_dict(random_config(**shape, block_size=32, dtype="float32",
                                              max_position_embeddings=262144, rope_factor=16.0))
    model = build_model(cfg, dev, torch.float32, lora_rank=8 if small else 128)
    prompt = torch.randint(200, cfg.vocab_size, (256,), generator=torch.Generator().manual_seed(2)).tolist()
    eager, graphs = Engine(model, runner_cls=ModelRunner), Engine(model, runner_cls=graph_runner_cls(dev))
    out = {}
    for mode in ("ar", "self_spec", "diffusion"):
        params = DecodeParams(mode=mode, max_new_tokens=96, ignore_eos=True)
        a, b = eager.generate(prompt, params), graphs.generate(prompt, params)
        out[f"{mode}_graph_equals_eager"] = a.token_ids == b.token_ids
        out.setdefault("tokens", {})[mode] = b.token_ids
    out["self_spec_equals_ar_under_graphs"] = out["tokens"]["self_spec"] == out["tokens"]["ar"]
    out["batch_engine"] = check_batch_engine(model, graph_runner_cls(dev))
    out["self_spec_equals_ar_eager"] = eager.generate(prompt, DecodeParams(
        mode="self_spec", max_new_tokens=96, ignore_eos=True)).token_ids == out["tokens"]["ar"]
    for b in (4, 8, 16):
        q = DecodeParams(mode="self_spec", spec_algorithm="quadratic", block_length=b, max_new_tokens=96, ignore_eos=True)
        out[f"quadratic_b{b}_equals_ar_eager"] = eager.generate(prompt, q).token_ids == out["tokens"]["ar"]
        out[f"quadratic_b{b}_equals_ar_under_graphs"] = graphs.generate(prompt, q).token_ids == out["tokens"]["ar"]
    del out["tokens"]
    return out


def check_batch_engine(model: NLDModel, graph_cls) -> dict:
    """The production path: `BatchEngine` (paged KV, blocks of 16), 8 slots, 24 staggered requests
    of mixed modes and prompt lengths (prefills chunked by 64, so chunks replay from graphs too),
    half of them behind a shared 64-token system prompt (prefix-cache hits). Every prompt runs
    once in AR and once in self_spec or diffusion. Graph runner vs eager: identical outputs, also
    with a pool of 40 blocks (preemptions) and with prefix caching off; greedy self-spec equals AR
    inside the mixed batches."""
    import random

    from replicas.engine import BatchEngine, EngineConfig

    rng = random.Random(0)
    vocab, jobs = model.config.vocab_size, []
    system = [rng.randrange(200, vocab) for _ in range(64)]
    for i in range(12):
        prompt = [rng.randrange(200, vocab) for _ in range(rng.randint(5, 150))]
        prompt = (system + prompt)[:150] if i % 2 else prompt
        n, block = rng.randint(8, 48), rng.choice([8, 16, 32])
        other = DecodeParams(mode="self_spec" if i % 3 else "diffusion", max_new_tokens=n, block_length=block,
                             threshold=0.9, ignore_eos=True)
        jobs += [(prompt, DecodeParams(mode="ar", max_new_tokens=n, ignore_eos=True)), (prompt, other)]
    rng.shuffle(jobs)

    def drive(runner_cls, **config) -> tuple[list[list[int]], int, dict]:
        be = BatchEngine(Engine(model, runner_cls=runner_cls),
                         EngineConfig(max_batch_size=8, max_seq_len=256, prefill_chunk=64, max_waiting=64, **config))
        ids, outs, pending, steps = [], {}, list(jobs), 0
        while pending or be.has_work():
            for prompt, params in pending[:3]:  # three arrivals per step
                ids.append(be.submit(prompt, params))
                outs[ids[-1]] = []
            pending = pending[3:]
            for chunk in be.step():
                assert chunk.finish_reason != "error", chunk.error
                outs[chunk.request_id].extend(chunk.token_ids)
            steps += 1
        return [outs[i] for i in ids], steps, be.stats_snapshot()

    eager, steps, _ = drive(ModelRunner)
    graphs, _, stats = drive(graph_cls)
    tight, _, tight_stats = drive(graph_cls, num_kv_blocks=40, max_num_batched_tokens=96)
    uncached, _, _ = drive(graph_cls, enable_prefix_caching=False)
    ar = {tuple(p): o for (p, prm), o in zip(jobs, graphs) if prm.mode == "ar"}
    spec = [(tuple(p), o) for (p, prm), o in zip(jobs, graphs) if prm.mode == "self_spec"]
    return {"requests": len(jobs), "steps": steps, "graph_equals_eager": eager == graphs,
            "self_spec_equals_ar": all(ar[p] == o for p, o in spec), "self_spec_requests": len(spec),
            "prefix_cache_hits": stats["prefix_cache_hits"], "tight_pool_equals_eager": tight == eager,
            "tight_pool_preemptions": tight_stats["preemptions"], "no_prefix_cache_equals_eager": uncached == eager}


def batch_decode(model: NLDModel, runner_cls, dev: str, *, batch: int, context: int, new_tokens: int) -> dict:
    """AR decode of `batch` concurrent sequences through `BatchEngine` (paged KV): tokens/s once
    every sequence decodes (prefills excluded), after a warm-up run of the same shapes (graph
    capture)."""
    from replicas.engine import BatchEngine, EngineConfig

    engine = Engine(model, runner_cls=runner_cls)
    max_len = context + new_tokens + 64
    config = EngineConfig(max_batch_size=batch, max_seq_len=max_len, max_waiting=batch, prefill_chunk=2048,
                          max_num_batched_tokens=8192, num_kv_blocks=batch * -(-max_len // 16))
    be = BatchEngine(engine, config)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(200, model.config.vocab_size, (context,), generator=g).tolist() for _ in range(batch)]

    def run(n: int) -> dict:
        for p in prompts:
            be.submit(p, DecodeParams(mode="ar", max_new_tokens=n, ignore_eos=True))
        while be.scheduler.waiting or any(r.prefilling for r in be.scheduler.running.values()):
            be.step()
        sync(dev)
        t0, tokens, steps = time.perf_counter(), 0, 0
        while be.has_work():
            tokens += sum(len(c.token_ids) for c in be.step())
            steps += 1
        sync(dev)
        seconds = time.perf_counter() - t0
        return {"tokens": tokens, "steps": steps, "seconds": seconds}

    run(8)  # warm-up: captures the decode bucket of these shapes
    r = run(new_tokens)
    snap = be.stats_snapshot()
    return {"batch": batch, "context": context, "new_tokens": new_tokens, "tokens_per_s": r["tokens"] / r["seconds"],
            "ms_per_step": r["seconds"] / r["steps"] * 1e3, "kv_blocks": snap["kv_blocks_total"],
            "prefix_cache_hits": snap["prefix_cache_hits"]}


def kv_capacity(model: NLDModel, dev: str, utilization: float) -> dict:
    """The KV pool `gpu_memory_utilization` gives (off CUDA: the contiguous-equivalent default)."""
    from replicas.engine import BatchEngine, EngineConfig

    config = EngineConfig(max_batch_size=64, max_seq_len=4096, gpu_memory_utilization=utilization)
    be = BatchEngine(Engine(model, runner_cls=ModelRunner), config)
    out = {"gpu_memory_utilization": utilization, "kv_blocks": be.cache.num_blocks,
           "kv_cache_gib": be.cache.nbytes / 2**30, "sequences_of_4096": be.cache.num_blocks // config.blocks_per_seq}
    del be
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes, to smoke-test the script")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="rows of the batched AR step")
    p.add_argument("--engine-batch", type=int, default=64, help="concurrent sequences of the BatchEngine AR run")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = ModelConfig.from_dict(random_config(**SHAPES["small" if args.small else "8b"], block_size=32,
                                              dtype="bfloat16", max_position_embeddings=262144, rope_factor=16.0))
    lora_rank = 8 if args.small else 128
    model = build_model(cfg, dev, dtype, lora_rank=lora_rank)
    n_params = sum(t.numel() for t in model.parameters())  # the adapter's deltas are buffers, not parameters
    lora_params = lora_rank * (cfg.num_attention_heads * cfg.head_dim + cfg.hidden_size) * cfg.num_hidden_layers
    bytes_per_token = (n_params - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size) * torch.finfo(dtype).bits // 8
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    peak = next((bw for key, bw in PEAK_BANDWIDTH_TBS.items() if key in name), None)
    result = {
        "device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), "params": n_params, "lora_params": lora_params,
        "weight_bytes_per_token": bytes_per_token, "context": args.context, "peak_bandwidth_tb_s": peak,
        "bandwidth_bound_tokens_per_s": peak * 1e12 / bytes_per_token if peak else None,
        "runners": {}, "errors": [],
    }

    def save() -> None:
        print(json.dumps(result, indent=2), flush=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    def section(key: str, fn, into: dict = result) -> None:
        """Record fn()'s result under `key` of `into`, or why it failed; later sections still run."""
        try:
            into[key] = fn()
        except Exception:
            result["errors"].append({key: traceback.format_exc()})
        save()

    prompt = torch.randint(200, cfg.vocab_size, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
    graph_cls = graph_runner_cls(dev)
    logits, tokens = {}, {}

    def measure(label: str, runner_cls) -> dict:
        r = measure_runner(label, runner_cls, model, prompt, args, dev)
        logits[label] = r.pop("logits_step")
        e = measure_engine(Engine(model, runner_cls=runner_cls), prompt, args.new_tokens)
        tokens[label] = e.pop("tokens")
        r.update(e)
        r["achieved_bandwidth_tb_s"] = bytes_per_token * r["ar_decode_tokens_per_s"] / 1e12
        if peak:
            r["fraction_of_bandwidth_bound"] = r["achieved_bandwidth_tb_s"] / peak
        return r

    section("eager", lambda: measure("eager", ModelRunner), into=result["runners"])
    section("cuda_graphs", lambda: measure("cuda_graphs", graph_cls), into=result["runners"])

    def compare() -> dict:
        a, b = logits["eager"], logits["cuda_graphs"]
        return {"step_logits_max_abs_diff": float((a - b).abs().max()), "step_argmax_equal": bool(a.argmax() == b.argmax()),
                "greedy_tokens_equal_prefix": common_prefix(tokens["eager"], tokens["cuda_graphs"])}

    def modes_under_graphs() -> dict:
        engine = Engine(model, runner_cls=graph_cls)
        spec = engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=64, ignore_eos=True))
        ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=64, ignore_eos=True))
        diff = engine.generate(prompt, DecodeParams(mode="diffusion", max_new_tokens=64, ignore_eos=True))
        return {"self_spec_equals_ar_prefix": common_prefix(spec.token_ids, ar.token_ids),
                "self_spec_forward_passes": spec.forward_passes, "diffusion_forward_passes": diff.forward_passes,
                "diffusion_tokens": len(diff.token_ids), "graph_buckets": sorted(map(list, engine._runner.buckets))}

    # the serving default replays passes of up to 64 tokens from graphs (B = 4: 20 tokens); a
    # graph runner that takes up to 2,048 shows what replaying every B's cycle would cost
    wide_graphs = (lambda m, c: CudaGraphRunner(m, c, max_tokens=2048, capture=dev == "cuda"))
    section("quadratic_cycle_graphs", lambda: quadratic_cycles(model, graph_cls, prompt, dev))
    section("quadratic_cycle_graphs_2048", lambda: quadratic_cycles(model, wide_graphs, prompt, dev))
    section("quadratic_cycle_eager", lambda: quadratic_cycles(model, ModelRunner, prompt, dev))
    section("graph_vs_eager", compare)
    section("modes_under_graphs", modes_under_graphs)
    section("eager_profile", lambda: profile_eager(model, prompt, dev))
    section("paged_batch_ar_graphs", lambda: batch_decode(model, graph_cls, dev, batch=args.engine_batch,
                                                          context=args.context, new_tokens=args.new_tokens))
    section("paged_batch_ar_eager", lambda: batch_decode(model, ModelRunner, dev, batch=args.engine_batch,
                                                         context=args.context, new_tokens=min(args.new_tokens, 32)))
    section("kv_capacity", lambda: kv_capacity(model, dev, 0.5))
    model.to("meta")  # free the bfloat16 8B (its engines are gone) before the float32 model
    if dev == "cuda":
        torch.cuda.empty_cache()
    section("fp32_identity", lambda: check_identity_fp32(dev, args.small))
    if dev == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    save()


if __name__ == "__main__":
    main()
