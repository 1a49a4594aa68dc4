"""Where the CPU time goes: muxtune against the packed baseline, per real token, on the bench's workload.

    python -m bench.profile --quick                 # N=8, tiny-llama, one thread, both systems
    python -m bench.profile --quick --long --json prof.json
    python -m bench.profile --systems muxtune --top 40

Each system trains the same tasks as bench.multitask (same data, ranks, steps) in this one process
with one torch thread, after an untimed warm-up, under cProfile with a process-CPU-time clock.
CPU time, unlike wall time, is barely moved by other processes on a shared machine, so two systems
profiled one after the other compare fairly (the figures still carry the machine's contention; the
ratios are what to read). For the packed baseline each task trains in turn (its setup untimed, as
in the benchmark); muxtune runs the N tasks in one engine. Reported per real token: the total, the
big buckets (backward pass, forward Linear kernels, forward attention, LoRA deltas, optimizer
steps, final adapter/checkpoint saves, packing, Python-level self time), and the top functions.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

SYSTEMS = ("separate-packed", "muxtune", "separate")
# bucket name -> (function name fragments, cumulative?): cumulative buckets overlap what they call
BUCKETS = {
    "backward (autograd engine, all backward kernels)": (("run_backward",), False),
    "forward Linear kernels": (("torch._C._nn.linear",), False),
    "forward attention kernels (SDPA)": (("scaled_dot_product_attention",), False),
    "LoRA deltas, forward (cumulative)": (("lora.py:additive",), True),
    "optimizer steps (cumulative)": (("adam.py:step",), True),
    "adapter and checkpoint saves (cumulative)": (("peft_model.py:save_pretrained", "export.py:save_adapter",
                                                   "checkpoint.py:save"), True),
    "packing (cumulative)": (("packing.py:pack",), True),
}


def parse_args(argv=None):
    from bench import multitask

    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick mode's workload (tiny-llama)")
    p.add_argument("--long", action="store_true", help="long sequences: median 512, cap 2048")
    p.add_argument("--n", type=int, default=8, help="tasks (default 8)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS[:2]))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time comparable)")
    p.add_argument("--top", type=int, default=15, help="functions listed by self time")
    p.add_argument("--token-budget", type=int, help="muxtune: real tokens per fused round (default: the mode's)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full-cpu"
    for key, value in dict(multitask.PROFILES[mode], **(multitask.LONG[mode] if args.long else {})).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _buckets(stats: pstats.Stats, tokens: int, total: float) -> dict:
    out = {}
    for name, (fragments, cumulative) in BUCKETS.items():
        t = sum((ct if cumulative else tt) for (f, line, fn), (cc, nc, tt, ct, callers) in stats.stats.items()
                if any(x == (f"{os.path.basename(f)}:{fn}" if f != "~" else fn) or (f == "~" and x in fn) for x in fragments))
        out[name] = t
    out["Python-level self time (incl. tensor ops written as operators)"] = sum(
        tt for (f, _l, _fn), (_cc, _nc, tt, _ct, _c) in stats.stats.items() if f != "~")
    return {k: {"us_per_token": v / tokens * 1e6, "share": v / total} for k, v in out.items()}


def _top(stats: pstats.Stats, tokens: int, total: float, n: int) -> list[dict]:
    rows = sorted(((tt, nc, f"{os.path.basename(f)}:{fn}" if f != "~" else fn)
                   for (f, _l, fn), (_cc, nc, tt, _ct, _c) in stats.stats.items()), reverse=True)[:n]
    return [{"function": name, "calls": nc, "us_per_token": tt / tokens * 1e6, "share": tt / total} for tt, nc, name in rows]


def profile_system(system: str, jobs, model_path: Path, args, work: Path) -> dict:
    import torch

    prof = cProfile.Profile(time.process_time)
    device = torch.device("cpu")
    if system == "muxtune":
        from bench.workers import _task, data_root
        from muxtune.engine.model.backbone import MultiplexedBackbone
        from muxtune.engine.model.loading import load_backbone
        from muxtune.engine.trainer import MuxTrainer

        backbone = MultiplexedBackbone(load_backbone(model_path, device, torch.float32))

        def trainer(name, steps):
            tr = MuxTrainer(backbone, work / name, token_budget=args.token_budget, resume=False, base_dir=data_root(jobs))
            for job in jobs:
                tr.add_task(_task(job, steps, str(model_path)))
            return tr

        trainer("warmup", args.warmup_steps).run()
        tr = trainer("timed", args.steps)
        prof.enable()
        tr.run()
        prof.disable()
        tokens = sum(rt.tokens_total for rt in tr.tasks.values())
    else:
        from bench.workers import HFJob, _hf_base

        packed = system.endswith("-packed")
        base, tokenizer = _hf_base({"model": str(model_path)}, device, torch.float32, packed)
        runners = [HFJob(job, tokenizer, device, packed) for job in jobs]
        runners[0].setup(base)
        runners[0].train(args.warmup_steps, None)
        base = runners[0].teardown()
        tokens = 0
        for i, runner in enumerate(runners):
            runner.setup(base)  # untimed, as in the benchmark
            prof.enable()
            tokens += runner.train(runner.job.steps, work / system / str(i))["real_tokens"]
            prof.disable()
            base = runner.teardown()
    stats = pstats.Stats(prof)
    total = sum(tt for (_f, _l, _fn), (_cc, _nc, tt, _ct, _c) in stats.stats.items())
    return {"system": system, "tokens": tokens, "cpu_s": total, "us_per_token": total / tokens * 1e6,
            "buckets": _buckets(stats, tokens, total), "top": _top(stats, tokens, total, args.top)}


def render(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"{r['system']}: {r['tokens']} tokens, {r['cpu_s']:.2f} CPU s, {r['us_per_token']:.0f} us per token")
        for name, b in r["buckets"].items():
            lines.append(f"  {b['us_per_token']:8.1f} us/token {100 * b['share']:5.1f}%  {name}")
        lines.append("  top functions by self time:")
        for t in r["top"]:
            lines.append(f"  {t['us_per_token']:8.1f} us/token {100 * t['share']:5.1f}% {t['calls']:7d}x  {t['function'][:80]}")
    if len(results) > 1:
        ref = results[0]
        for r in results[1:]:
            lines.append(f"{r['system']} / {ref['system']} CPU time per token: {r['us_per_token'] / ref['us_per_token']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from bench.workload import make_jobs, resolve_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="muxtune-profile-"))
    jobs = make_jobs(work / "data", args.n, ranks=[4, 8, 16, 32], batch_size=args.batch_size, steps=args.steps,
                     warmup_steps=args.warmup_steps, max_seq_len=args.max_seq_len, median_len=args.median_len,
                     sigma=args.sigma, lr=1e-3)
    model_path = resolve_model(args.model)
    try:
        results = [profile_system(s, jobs, model_path, args, work) for s in args.systems]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
