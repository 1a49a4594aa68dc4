"""The parallel engine: throughput and pipeline bubble by layout, with and without cross-task interleaving.

    python -m bench.parallel --quick                # a few minutes on 2 CPU cores, tiny model
    python -m bench.parallel                        # full: small-llama on CPU; a ~1B model on GPUs
    python -m bench.parallel --quick --json out.json

For each N in --n (tasks, LoRA ranks cycling 4/8/16/32, the lognormal workload of bench.multitask)
the same N tasks train under each layout:
  dp1 pp1            one process (the baseline every ratio refers to)
  dp1 ppP  inter     P pipeline stages, the tasks' micro-batches interleaved in one 1F1B flush per round
  dp1 ppP  flush     P stages, each task's micro-batches a 1F1B flush of their own (--no-interleave)
  dp2 pp1            two data-parallel replicas
P is 2, and 4 where four GPUs are visible (--pp to choose). Each layout is a real torch.distributed
group (gloo on CPU, NCCL on GPUs; ranks sharing one GPU fall back to gloo), started once per world
size with torch's elastic launch; every layout builds its own backbone and trainer, runs
--warmup-steps untimed steps, then --steps timed ones.

Columns:
  tokens/s     real (non-padding) training tokens per second, all tasks, wall time of the timed run
  x pp1        tokens/s over the one-process row at the same N
  bubble       measured: each stage's idle seconds (waiting inside rounds) over its wall seconds in
               rounds, mean over stages (0 for one stage)
  ticks        the schedule's bubble in the tick model (every F or B one tick), from the rounds' plans:
               what --print-schedule shows; interleaving lowers it, flushes per task raise it
  dp eff       dp2 only: tokens/s / (2 x one-process tokens/s), the data-parallel scaling efficiency
On a shared 2-core CPU every number is indicative: ranks compete for the same cores, so pipeline and
data-parallel rows measure overheads more than speed-ups; the tick bubble does not depend on timing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

PROFILES = {
    "quick": dict(model="builtin:tiny-llama", steps=3, warmup_steps=1, batch_size=8, max_seq_len=128,
                  median_len=40, sigma=0.8, token_budget=4096),
    "full-cpu": dict(model="builtin:small-llama", steps=6, warmup_steps=1, batch_size=8, max_seq_len=256,
                     median_len=64, sigma=0.9, token_budget=4096),
    "full-cuda": dict(model="config:llama-1b", steps=10, warmup_steps=2, batch_size=8, max_seq_len=1024,
                      median_len=192, sigma=1.0, token_budget=16384),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short CPU mode: tiny model, few steps")
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 8], help="task counts (default 1 4 8)")
    p.add_argument("--pp", type=int, nargs="+", help="pipeline degrees besides 1 (default 2, and 4 with 4+ GPUs)")
    p.add_argument("--no-dp", dest="dp", action="store_false", help="skip the dp=2 rows")
    p.add_argument("--model", help="builtin:tiny-llama | builtin:small-llama | config:llama-1b | a model directory")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32], help="LoRA ranks, cycled over tasks")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, help="timed optimizer steps per task")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--median-len", type=float)
    p.add_argument("--sigma", type=float)
    p.add_argument("--token-budget", type=int, help="real tokens per round and data-parallel replica")
    p.add_argument("--micro-batches", type=int, help="pipeline micro-batches per task and round (default: pp)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--json", type=Path, help="write one JSON row per layout and N here")
    p.add_argument("--workdir", type=Path, help="keep data and outputs here (default: a temp dir)")
    args = p.parse_args(argv)
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    profile = PROFILES["quick" if args.quick else ("full-cuda" if cuda else "full-cpu")]
    for k, v in profile.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.device = "cuda" if cuda else "cpu"
    if args.pp is None:
        args.pp = [2, 4] if cuda and torch.cuda.device_count() >= 4 else [2]
    return args


def layouts(args) -> list[dict]:
    out = [dict(dp=1, pp=1, interleave=True)]
    for p in args.pp:
        out += [dict(dp=1, pp=p, interleave=True), dict(dp=1, pp=p, interleave=False)]
    if args.dp:
        out.append(dict(dp=2, pp=1, interleave=True))
    return out


# ----- one layout, on every rank of its group ----------------------------------------------
def run_layout(spec: dict, layout: dict, n: int, group, device) -> dict | None:
    import torch

    from bench.workload import Job
    from muxtune.engine import parallel
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import load_backbone

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        spec["dtype"], torch.bfloat16 if device.type == "cuda" else torch.float32)
    staged = layout["pp"] > 1
    backbone = MultiplexedBackbone(load_backbone(Path(spec["model"]), torch.device("cpu") if staged else device, dtype))
    parallel.setup_backbone(backbone, group, device, announce=lambda _m: None)
    jobs = [Job.from_dict(j) for j in spec["jobs"][:n]]

    def trainer(name, steps):
        return _trainer(spec, layout, n, backbone, group, jobs, name, steps)

    if spec["warmup_steps"]:
        trainer("warmup", spec["warmup_steps"]).run()
    tr = trainer("timed", spec["steps"])
    rounds = _round_totals()
    tr.telemetry = rounds
    ticks, restore = _trace_bubble_ticks(layout["pp"])
    try:
        wall = _timed(tr, group, device)
    finally:
        restore()
    bad = [f"{rt.key}: {rt.phase} {rt.message}" for rt in tr.tasks.values() if rt.phase != "Succeeded"]
    if bad:
        raise RuntimeError("; ".join(bad))
    if not group.is_writer:
        return None
    idle_ticks = sum(i for _, i in ticks)
    total_ticks = sum(s for s, _ in ticks)
    return {
        "n_tasks": n, **layout, "world": layout["dp"] * layout["pp"], "wall_s": wall, "real_tokens": rounds.real,
        "tokens_per_s": rounds.real / wall if wall > 0 else 0.0, "rounds": rounds.rounds,
        "bubble_measured": (rounds.wall - rounds.busy) / rounds.wall if layout["pp"] > 1 and rounds.wall else 0.0,
        "bubble_ticks": idle_ticks / total_ticks if total_ticks else 0.0,
        "device": device.type, "model": spec["model"],
    }


def _round_totals():
    """A Telemetry that sums real tokens, rounds, and the stages' busy and wall seconds."""
    from muxtune.engine.observe.telemetry import Telemetry

    class Rounds(Telemetry):
        def __init__(self):
            self.real = self.rounds = 0
            self.busy = self.wall = 0.0

        def round_done(self, r):
            self.real += r.real_tokens
            self.rounds += 1
            for st in r.stages:
                self.busy += st.busy_seconds
                self.wall += max(st.wall_seconds, st.busy_seconds)

    return Rounds()


def _lora_task(spec: dict, job, steps: int):
    """bench.multitask's LoRA job as a FineTuneTask, its data relative to the data root."""
    from bench.workload import TARGET_MODULES
    from muxtune.api.finetunetask import FineTuneTask

    return FineTuneTask.model_validate({
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": job.name},
        "spec": {
            "baseModel": spec["model"],
            "dataset": {"path": Path(job.data).name, "maxSeqLen": job.max_seq_len, "shuffle": False},
            "peft": {"method": "lora", "r": job.rank, "alpha": job.alpha, "dropout": 0.0,
                     "targetModules": TARGET_MODULES},
            "training": {"maxSteps": steps, "batchSize": job.batch_size, "learningRate": job.lr,
                         "seed": job.seed, "maxGradNorm": 1.0, "checkpointInterval": 0},
        },
    })


def _trainer(spec: dict, layout: dict, n: int, backbone, group, jobs: list, name: str, steps: int):
    from muxtune.engine.trainer import MuxTrainer

    tr = MuxTrainer(backbone, Path(spec["out"]) / f"{name}-n{n}-dp{layout['dp']}-pp{layout['pp']}-{layout['interleave']}",
                    token_budget=spec["token_budget"], resume=False, group=group, base_dir=Path(spec["data"]),
                    micro_batches=spec["micro_batches"], interleave=layout["interleave"])
    for job in jobs:
        tr.add_task(_lora_task(spec, job, steps))
    return tr


def _trace_bubble_ticks(pp: int) -> tuple[list[tuple[int, float]], callable]:
    """Record (span, idle ticks) of each round's plan in the tick model (what --print-schedule shows).

    The trainer calls the pipeline executor through its module, so the trace is installed there;
    the returned callable restores it."""
    from muxtune.engine.parallel import pipeline
    from muxtune.engine.parallel.schedule import bubble_fraction, simulate, stage_actions

    ticks: list[tuple[int, float]] = []
    run_pipeline = pipeline.run_pipeline

    def traced(backbone, group, plan, *a):
        tl = simulate(stage_actions(plan.flushes, pp))
        span = max((t + 1 for s in tl for t in s), default=0)
        ticks.append((span, sum(f * span for f in bubble_fraction(tl)) / max(1, len(tl))))
        return run_pipeline(backbone, group, plan, *a)

    def restore() -> None:
        pipeline.run_pipeline = run_pipeline

    pipeline.run_pipeline = traced
    return ticks, restore


def _timed(tr, group, device) -> float:
    """Wall seconds of ``tr.run()``, every rank starting the clock together."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    group.sum(torch.zeros(1, dtype=torch.float64))  # a barrier: every rank starts the clock together
    sync()
    t0 = time.perf_counter()
    tr.run()
    sync()
    return time.perf_counter() - t0


def rank_main(spec: dict, group_layouts: list[dict]) -> list[dict]:
    """Every layout of one world size on this rank (module level: spawn pickles it by name)."""
    import torch

    from muxtune import logs
    from muxtune.engine.parallel.dims import ParallelDims
    from muxtune.engine.parallel.group import DistGroup, LocalGroup
    from muxtune.engine.parallel.ranks import init_distributed

    logs.configure("error", extra={"torch.distributed": "error"})
    device = torch.device(spec["device"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        device = init_distributed(device)
    rows = []
    for layout in group_layouts:
        for n in spec["n"]:
            group = (DistGroup(ParallelDims(layout["dp"], 1, layout["pp"], world), device) if world > 1
                     else LocalGroup())
            row = run_layout(spec, layout, n, group, device)
            if row is not None:
                rows.append(row)
                print(f"  N={n} dp{layout['dp']} pp{layout['pp']} {'inter' if layout['interleave'] else 'flush'}: "
                      f"{row['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    return rows


def run_world(spec: dict, world: int, group_layouts: list[dict]) -> list[dict]:
    if world == 1:
        return rank_main(spec, group_layouts)
    from torch.distributed.launcher.api import elastic_launch

    from muxtune.engine.parallel.ranks import launch_config

    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("PET_")]}
    try:
        results = elastic_launch(launch_config(world), rank_main)(spec, group_layouts)
    finally:
        os.environ.update(saved)
    return results[0]


def add_ratios(rows: list[dict]) -> None:
    base = {r["n_tasks"]: r["tokens_per_s"] for r in rows if r["dp"] == 1 and r["pp"] == 1}
    for r in rows:
        b = base.get(r["n_tasks"])
        r["speedup_vs_pp1"] = r["tokens_per_s"] / b if b else None
        r["dp_efficiency"] = r["tokens_per_s"] / (r["dp"] * b) if b and r["dp"] > 1 else None


def render(rows: list[dict]) -> str:
    head = f"{'N':>3}  {'layout':<16} {'tokens/s':>9} {'x pp1':>6} {'bubble':>7} {'ticks':>6} {'dp eff':>7}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["n_tasks"], r["dp"], r["pp"], not r["interleave"])):
        mode = "" if r["pp"] == 1 else (" inter" if r["interleave"] else " flush")
        eff = f"{r['dp_efficiency']:.2f}" if r["dp_efficiency"] is not None else "-"
        x = f"{r['speedup_vs_pp1']:.2f}" if r["speedup_vs_pp1"] is not None else "-"
        name = "dp%d pp%d%s" % (r["dp"], r["pp"], mode)
        lines.append(f"{r['n_tasks']:>3}  {name:<16} {r['tokens_per_s']:>9.0f} {x:>6} "
                     f"{r['bubble_measured']:>7.3f} {r['bubble_ticks']:>6.3f} {eff:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from bench.workload import make_jobs, resolve_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="muxtune-bench-par-"))
    jobs = make_jobs(work / "data", max(args.n), ranks=args.ranks, batch_size=args.batch_size, steps=args.steps,
                     warmup_steps=args.warmup_steps, max_seq_len=args.max_seq_len, median_len=args.median_len,
                     sigma=args.sigma, lr=args.lr)
    model = resolve_model(args.model)
    spec = {"model": str(model), "jobs": [j.to_dict() for j in jobs], "n": args.n, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "token_budget": args.token_budget, "micro_batches": args.micro_batches,
            "device": args.device, "dtype": args.dtype, "out": str(work / "out"), "data": str(work / "data")}
    by_world: dict[int, list[dict]] = {}
    for layout in layouts(args):
        by_world.setdefault(layout["dp"] * layout["pp"], []).append(layout)
    print(f"model {args.model} on {args.device}; N in {args.n}; {args.steps} timed steps per task", file=sys.stderr)
    rows = []
    for world, group_layouts in sorted(by_world.items()):
        rows += run_world(spec, world, group_layouts)
    add_ratios(rows)
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
