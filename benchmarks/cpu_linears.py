"""The engine's float32 CPU linear layers (`replicas/engine/cpu_linear.py`), measured two ways.

    python benchmarks/cpu_linears.py [--model models/nld-tiny-pystdlib] [--rows 1,8,32] [--threads 1,2]
                                     [--levels 1,4,8,16,32] [--rounds 3]

1. A forward's matmuls: every linear layer of the model (its shapes from config.json, random
   weights), one after another, as `nn.Linear` stores them (row-major), column-major (what
   `CpuLinear` multiplies one row with) and oneDNN-packed (what it multiplies several rows with),
   at each row count and thread count; median of 100 passes, best of 3 interleaved repetitions.
   `--fused` times the shapes of a fused forward instead (q/k/v and gate/up stacked: 17 matmuls).
2. The bare `BatchEngine` (closed loop, held-out prompts, 64 tokens, `ar`) with one load setting
   on and off (`--ab`: `onednn_linears`, or `fuse_projections`, `Engine.from_pretrained`'s
   stacking of q/k/v and gate/up), the two engines loaded once and alternated per (round, level);
   the ratio is taken per round. Both engines use the column-major layout for one-row passes.
Prints tables, saves JSON. In `make bench`; not in CI (a minute or two).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_modes import heldout_prompts  # noqa: E402
from benchmarks.peer_vllm import bare_engine  # noqa: E402
from replicas.engine import EngineConfig, load_batch_engine, load_model_config  # noqa: E402
from replicas.engine.cpu_linear import PACK_ROWS, onednn_available, packed_matmul  # noqa: E402


def linear_shapes(model: Path, fused: bool = False) -> list[tuple[int, int]]:
    """(out, in) of every linear layer of one forward, in order, the head last; `fused`: as
    `NLDModel.fuse_projections` leaves them (q/k/v one matrix, gate/up one)."""
    cfg = load_model_config(model)
    h, q, kv, m = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    layer = [(q + 2 * kv, h), (h, q), (2 * m, h), (h, m)] if fused else \
        [(q, h), (kv, h), (kv, h), (h, q), (m, h), (m, h), (h, m)]
    return layer * cfg.num_hidden_layers + [(cfg.vocab_size, h)]


def time_matmuls(shapes: list[tuple[int, int]], rows: int, reps: int = 3, passes: int = 100) -> dict[str, float]:
    """Milliseconds per forward's matmuls for each layout (median of `passes`, best of `reps`)."""
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.05 for o, i in shapes]
    layouts = {"row-major (nn.Linear)": weights, "column-major": [w.t().contiguous().t() for w in weights]}
    inputs = {i: torch.randn(rows, i) for i in {i for _, i in shapes}}
    calls = {name: (lambda ws: lambda: [F.linear(inputs[w.shape[1]], w) for w in ws])(ws)
             for name, ws in layouts.items()}
    if onednn_available():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS) for w in weights]
        calls["oneDNN packed"] = lambda: [packed_matmul(inputs[i], p) for (_, i), p in zip(shapes, packed)]
    best: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(reps):
            for name, call in calls.items():
                for _ in range(10):
                    call()
                times = []
                for _ in range(passes):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                best[name] = min(best.get(name, float("inf")), 1e3 * statistics.median(times))
    return best


AB_SETTINGS = ("onednn_linears", "fuse_projections")  # `load_batch_engine` keywords


def engine_ab(model: Path, levels: list[int], rounds: int, seconds: float, setting: str = "onednn_linears") -> list[dict]:
    """The bare engine with `setting` on and off, alternated per (round, level)."""
    if setting not in AB_SETTINGS:
        raise ValueError(f"setting: one of {AB_SETTINGS}, not {setting!r}")
    prompts = heldout_prompts(model / "split.json", model, 8, 64)
    top = max(levels)  # one engine per setting serves every level (a closed loop of c requests)
    config = EngineConfig(max_batch_size=top, max_seq_len=512, max_waiting=4 * top)
    engines = {on: load_batch_engine(model, config, **{setting: on}) for on in (True, False)}
    rows = []
    for rnd in range(rounds):
        for c in levels:
            for on in ((True, False) if rnd % 2 == 0 else (False, True)):
                r = bare_engine(str(model), prompts, c, seconds, 64, None, engine=engines[on])
                rows.append({"round": rnd, "concurrency": c, setting: on, "tokens_per_s": r["tokens_per_s"],
                             "step_p50_s": r["step_p50_s"]})
                print(f"round {rnd} c={c} {setting}={on}: {r['tokens_per_s']:.0f} tok/s", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "nld-tiny-pystdlib")
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--levels", default="1,4,8,16,32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--fused", action="store_true", help="time a fused forward's matmul shapes")
    p.add_argument("--ab", choices=AB_SETTINGS, default="onednn_linears", help="the engine setting to A/B")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_linears.json")
    args = p.parse_args(argv)
    shapes = linear_shapes(args.model, fused=args.fused)
    threads_before = torch.get_num_threads()
    matmuls = []
    print(f"a forward's {len(shapes)} matmuls, ms (median of 100, best of 3)")
    for threads in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows in (int(x) for x in args.rows.split(",")):
            t = time_matmuls(shapes, rows)
            matmuls.append({"threads": threads, "rows": rows, "ms": t})
            print(f"threads {threads} rows {rows:>3}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()), flush=True)
    torch.set_num_threads(threads_before)
    levels = [int(x) for x in args.levels.split(",")]
    rows = engine_ab(args.model, levels, args.rounds, args.seconds, args.ab)
    ratios = {}
    print(f"\nbare engine, {args.ab} on / off, per-round tokens/s ratio: median (min-max)")
    for c in levels:
        by = {(r["round"], r[args.ab]): r["tokens_per_s"] for r in rows if r["concurrency"] == c}
        vals = [by[k, True] / by[k, False] for k in range(args.rounds)]
        ratios[c] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
        print(f"  c={c:>3}: {ratios[c]['median']:.2f} ({ratios[c]['min']:.2f}-{ratios[c]['max']:.2f})")
    args.out.write_text(json.dumps({"model": str(args.model), "fused_shapes": args.fused, "ab": args.ab,
                                    "matmuls": matmuls, "engine_rows": rows,
                                    "engine_ratios": ratios}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
