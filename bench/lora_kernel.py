"""Micro-benchmark: the fused multi-task LoRA kernel against the per-task Python loop.

    python -m bench.lora_kernel                      # the full grid, table on stdout
    python -m bench.lora_kernel --tasks 8 --hidden 4096 --tokens 16384 --json out.json

Times one adapted Linear's additive LoRA path, forward and forward+backward (x.grad and every
task's lora_A/lora_B grads), for N tasks with mixed ranks and a long-tailed split of the tokens,
tokens interleaved as packed chunks leave them (a non-identity permutation):
- loop:  `mux_linear.segmented_additive` (gather, per-task matmuls, cat, scatter);
- fused: `lora_kernel.fused_additive` (Triton: 2 launches forward, 4 backward, any N);
- base:  the frozen base op itself, `F.linear(x, W)` forward+backward (dX only), which the
         per-task delta path should not exceed (issue 3's target).
CUDA events, warm-up excluded, median over --iters. Needs a CUDA GPU; before timing, each
configuration checks that fused and loop agree (`max_rel_err`, relative to the largest value).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.lora_kernel", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=_ints, default=[1, 2, 4, 8], help="task counts N (default 1,2,4,8)")
    p.add_argument("--hidden", type=_ints, default=[2048, 4096], help="in = out features (default 2048,4096)")
    p.add_argument("--tokens", type=_ints, default=[4096, 16384], help="tokens per batch (default 4096,16384)")
    p.add_argument("--ranks", type=_ints, default=[8, 16, 64, 4, 32, 8, 16, 128],
                   help="ranks, cycled over the tasks (default 8,16,64,4,32,8,16,128)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--padding", type=float, default=0.05, help="fraction of tokens that are padding (no task)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    return p.parse_args(argv)


def _slots(n_tasks: int, tokens: int, padding: float, rng: random.Random):
    """Per-token task slot (-1 padding): a long-tailed share per task, in runs like packed sequences."""
    import torch

    weights = [1.0 / (i + 1) ** 0.8 for i in range(n_tasks)]
    rng.shuffle(weights)
    real = tokens - int(tokens * padding)
    counts = [max(1, int(real * w / sum(weights))) for w in weights]
    counts[0] += real - sum(counts)
    runs = []
    for slot, c in enumerate(counts):
        while c > 0:  # sequences of 16..512 tokens
            n = min(c, rng.randint(16, 512))
            runs.append((slot, n))
            c -= n
    runs += [(-1, 1)] * (tokens - real)
    rng.shuffle(runs)
    out = [s for s, n in runs for _ in range(n)]
    return torch.tensor(out, dtype=torch.long)


def _median_ms(fn, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_one(n_tasks: int, hidden: int, tokens: int, args, device: str = "cuda") -> dict:
    import torch
    import torch.nn.functional as F

    from muxtune.api.finetunetask import PeftSpec
    from muxtune.engine.peft.lora_kernel import fused_additive
    from muxtune.engine.packing import TokenLayout
    from muxtune.engine.peft.lora import LoraDelta
    from muxtune.engine.peft.mux_linear import segmented_additive

    dev = torch.device(device)
    dtype = getattr(torch, args.dtype)
    rng = random.Random(args.seed * 1000 + n_tasks * 7 + hidden + tokens)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    base = torch.nn.Linear(hidden, hidden, bias=False, device=dev, dtype=dtype).requires_grad_(False)
    ranks = [args.ranks[i % len(args.ranks)] for i in range(n_tasks)]
    deltas = []
    cpu_base = torch.nn.Linear(hidden, hidden, bias=False, device="meta")  # shapes only
    cpu_base.weight = torch.nn.Parameter(torch.empty(0))  # a CPU device for LoraDelta's init
    init_gen = torch.Generator().manual_seed(args.seed)
    for r in ranks:
        d = LoraDelta(cpu_base, PeftSpec(r=r, alpha=2 * r), init_gen).to(dev)
        with torch.no_grad():
            d.lora_B.normal_(std=0.02, generator=gen)
        deltas.append(d)
    layout = TokenLayout.from_slots(_slots(n_tasks, tokens, args.padding, rng).to(dev))
    work = [(s, e, deltas[slot]) for slot, s, e in layout.segments]
    x = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=gen).requires_grad_(True)
    gy = torch.randn(tokens, hidden, device=dev, dtype=dtype, generator=gen)
    params = [p for d in deltas for p in d.parameters()]

    def fwd(fn):
        with torch.no_grad():
            fn(x, layout, work, hidden)

    def fwd_bwd(fn):
        x.grad = None
        for p in params:
            p.grad = None
        fn(x, layout, work, hidden).backward(gy)

    def base_fwd_bwd():
        x.grad = None
        F.linear(x, base.weight).backward(gy)

    # agreement first (also compiles the kernels)
    results = []
    for fn in (segmented_additive, fused_additive):
        fwd_bwd(fn)
        with torch.no_grad():
            out = fn(x, layout, work, hidden)
        results.append([out.float(), x.grad.float()] + [p.grad.float() for p in params])
    err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(results[1], results[0]))

    row = {"n_tasks": n_tasks, "hidden": hidden, "tokens": tokens, "ranks": ranks, "dtype": args.dtype,
           "segments": len(work), "max_rel_err": err}
    row["loop_fwd_ms"] = _median_ms(lambda: fwd(segmented_additive), args.warmup, args.iters)
    row["fused_fwd_ms"] = _median_ms(lambda: fwd(fused_additive), args.warmup, args.iters)
    row["loop_ms"] = _median_ms(lambda: fwd_bwd(segmented_additive), args.warmup, args.iters)
    row["fused_ms"] = _median_ms(lambda: fwd_bwd(fused_additive), args.warmup, args.iters)
    row["base_ms"] = _median_ms(base_fwd_bwd, args.warmup, args.iters)
    row["speedup"] = row["loop_ms"] / row["fused_ms"]
    row["fused_over_base"] = row["fused_ms"] / row["base_ms"]
    row["loop_over_base"] = row["loop_ms"] / row["base_ms"]
    row["device"] = torch.cuda.get_device_name(dev)
    return row


def print_table(rows: list[dict]) -> None:
    head = (f"{'N':>2} {'hidden':>6} {'tokens':>6} {'ranks':<26} {'loop fwd':>9} {'fused fwd':>9} "
            f"{'loop f+b':>9} {'fused f+b':>9} {'speedup':>7} {'base f+b':>9} {'fused/base':>10} {'max err':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ranks = ",".join(map(str, r["ranks"]))
        print(f"{r['n_tasks']:>2} {r['hidden']:>6} {r['tokens']:>6} {ranks:<26} {r['loop_fwd_ms']:>9.3f} "
              f"{r['fused_fwd_ms']:>9.3f} {r['loop_ms']:>9.3f} {r['fused_ms']:>9.3f} {r['speedup']:>6.2f}x "
              f"{r['base_ms']:>9.3f} {r['fused_over_base']:>10.2f} {r['max_rel_err']:>8.1e}")
    print("times in ms (median of CUDA-event timings); f+b = forward + backward; base = the frozen "
          "F.linear forward + dX; fused/base <= 1 is the target")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/lora_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False): it times Triton "
              "kernels with CUDA events. On CPU the fused path falls back to the loop; its correctness is "
              "tested with Triton's interpreter by tests/engine/kernels/test_lora_kernel.py.", file=sys.stderr)
        return 2
    from muxtune.engine.peft.lora_kernel import kernel_available

    if not kernel_available(torch.device("cuda")):
        print("bench/lora_kernel.py: Triton is not usable here (not installed, or TRITON_INTERPRET=1 is set)",
              file=sys.stderr)
        return 2
    rows = []
    for hidden in args.hidden:
        for tokens in args.tokens:
            for n in args.tasks:
                rows.append(bench_one(n, hidden, tokens, args))
                print(f"done N={n} hidden={hidden} tokens={tokens}", file=sys.stderr, flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
