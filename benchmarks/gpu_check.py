"""GPU check: a random-weight NLD model with the 8B shapes, bfloat16, batch 1.

Measures AR decode tokens/s against the memory-bandwidth bound (weight bytes read per token),
the bare forward time of one AR step, and the cost of one self-speculation cycle (a 32-token
bidirectional draft pass + a 32-token causal verify pass, with and without an r=128 draft
LoRA) against one AR step. Weights are generated on the device (no checkpoint on disk).

    python benchmarks/gpu_check.py [--out FILE]          # on a CUDA machine
    python benchmarks/gpu_check.py --small --device cpu  # a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from replicas.engine import DecodeParams, Engine
from replicas.engine.config import ModelConfig
from replicas.engine.kv_cache import KVCache
from replicas.engine.model import NLDModel
from replicas.engine.rope import compute_inv_freq
from replicas.engine.runner import ModelRunner
from replicas.engine.sequence import ForwardPass
from replicas.engine.testing import random_config

PEAK_BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35}  # HBM spec sheets (SXM)


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
    return model.eval().requires_grad_(False)


def timed(fn, device: str, iters: int) -> float:
    """Mean seconds per call after warm-up."""
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes, to smoke-test the script")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shape = dict(layers=34, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=131072)
    if args.small:
        shape = dict(layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, intermediate=256, vocab=1024)
    cfg = ModelConfig.from_dict(random_config(**shape, block_size=32, dtype="bfloat16",
                                              max_position_embeddings=262144, rope_factor=16.0))
    model = build_model(cfg, dev, dtype, lora_rank=128 if not args.small else 8)
    n_params = sum(t.numel() for t in model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    lora_params = sum(a.numel() + b.numel() for a, b in
                      ((l.self_attn.lora_a, l.self_attn.lora_b) for l in model.encoder.layers))
    bytes_per_token = (n_params - embed + cfg.hidden_size) * torch.finfo(dtype).bits // 8  # one embedding row
    engine = Engine(model)
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    peak = next((bw for key, bw in PEAK_BANDWIDTH_TBS.items() if key in name), None)

    prompt = torch.randint(200, cfg.vocab_size, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
    ar = DecodeParams(mode="ar", max_new_tokens=args.new_tokens + 1, ignore_eos=True, draft_lora=False)
    engine.generate(prompt, ar.with_(max_new_tokens=8))  # warm-up
    prefill_only = engine.generate(prompt, ar.with_(max_new_tokens=1)).seconds
    full = engine.generate(prompt, ar)
    decode_s = (full.seconds - prefill_only) / full.forward_passes
    ar_tps = 1.0 / decode_s

    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=args.context + 64, head_dim=cfg.head_dim, device=dev, dtype=dtype)
    runner = ModelRunner(model, cache)
    runner.run([(0, ForwardPass(prompt, 0, True, all_logits=False))])
    n = args.context
    mask_id = cfg.mask_token_id
    step = [(0, ForwardPass([5], n, True, all_logits=False))]
    draft = [(0, ForwardPass([5] + [mask_id] * 31, n, False, lora=False))]
    draft_lora = [(0, ForwardPass([5] + [mask_id] * 31, n, False, lora=True))]
    verify = [(0, ForwardPass(list(range(300, 332)), n, True))]
    iters = 20 if dev == "cuda" else 3
    t_step = timed(lambda: runner.run(step), dev, iters)
    t_draft = timed(lambda: runner.run(draft), dev, iters)
    t_draft_lora = timed(lambda: runner.run(draft_lora), dev, iters)
    t_verify = timed(lambda: runner.run(verify), dev, iters)
    cycle = t_draft + t_verify
    result = {
        "device": name,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "params": n_params,
        "lora_params": lora_params,
        "weight_bytes_per_token": bytes_per_token,
        "context": args.context,
        "ar_decode_tokens_per_s": ar_tps,
        "ar_step_ms_engine": decode_s * 1e3,
        "ar_step_ms_runner": t_step * 1e3,
        "peak_bandwidth_tb_s": peak,
        "bandwidth_bound_tokens_per_s": peak * 1e12 / bytes_per_token if peak else None,
        "achieved_bandwidth_tb_s": bytes_per_token * ar_tps / 1e12,
        "draft_pass_ms": t_draft * 1e3,
        "draft_pass_lora_ms": t_draft_lora * 1e3,
        "verify_pass_ms": t_verify * 1e3,
        "self_spec_cycle_ms": cycle * 1e3,
        "self_spec_cycle_over_ar_step": cycle / t_step,
        "break_even_tokens_per_cycle": cycle / t_step,
    }
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
