"""QLoRA memory: the same LoRA tasks over a 16-bit, an NF4 and an int8 frozen backbone, side by side.

    python -m bench.qlora                      # builtin:small-llama, bf16 compute, 4 tasks x 4 steps (CPU: ~2 min)
    python -m bench.qlora --model builtin:tiny-llama --n 2 --steps 2 --json qlora.json

Each storage runs in its own interpreter, so its peak memory is its own. Columns:
  weights    the backbone's parameters and buffers as stored (quantization states included)
  planned    what the operator's memory model counts for them (operator/memory.py), builtin models
  load peak  the peak while loading (on CPU transformers reads the 16-bit checkpoint before
             bitsandbytes quantizes it; on CUDA each weight is quantized as it is placed)
  peak       the peak while training, after loading. CUDA: torch.cuda.max_memory_allocated;
             CPU: peak RSS (VmHWM, reset after loading) less the interpreter's runtime (Python,
             torch, transformers, peft, bitsandbytes imported, no model yet)
  tokens/s   real training tokens per second over the timed steps; loss: mean last training loss
Ratios are to the unquantized run (the --dtype weights).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STORAGES = ("none", "nf4", "int8")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:small-llama", help="builtin:NAME, config:NAME or a model directory")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="unquantized weights and the compute dtype of all three")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--n", type=int, default=4, help="LoRA tasks trained together")
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per task")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--storages", nargs="+", default=list(STORAGES), choices=STORAGES)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _worker(spec: dict) -> dict:
    """One storage: load, train the tasks, report weights and peak memory."""
    import peft  # noqa: F401 - imported before the runtime is measured, as in bench/workers.py
    import psutil
    import torch
    import transformers  # noqa: F401

    from bench.workers import _task, data_root
    from bench.workload import Job
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import load_backbone
    from muxtune.engine.model.quantize import stored_bytes
    from muxtune.engine.runtime import install_kernels, pick_device
    from muxtune.engine.trainer import MuxTrainer

    if spec["storage"] != "none":
        import bitsandbytes  # noqa: F401 - part of this storage's runtime
    runtime = psutil.Process().memory_info().rss
    device, dtype = pick_device(spec["device"]), getattr(torch, spec["dtype"])
    backbone = MultiplexedBackbone(load_backbone(Path(spec["path"]), device, dtype, quantization=spec["storage"]))
    load_peak = _peak(device, runtime, reset=True)
    install_kernels(backbone, device)  # the fused LoRA kernels on CUDA, as `muxtune run` does
    jobs = [Job.from_dict(j) for j in spec["jobs"]]
    trainer = MuxTrainer(backbone, Path(spec["out"]), token_budget=4096, base_dir=data_root(jobs), resume=False)
    for job in jobs:
        trainer.add_task(_task(job, job.steps, spec["path"]))
    t0 = time.perf_counter()
    trainer.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tasks = list(trainer.tasks.values())
    if any(rt.phase != "Succeeded" for rt in tasks):
        raise SystemExit("; ".join(f"{rt.name}: {rt.phase} {rt.message}" for rt in tasks if rt.phase != "Succeeded"))
    return {"storage": spec["storage"], "device": device.type, "weights_bytes": stored_bytes(backbone.model),
            "load_peak_bytes": load_peak, "peak_bytes": _peak(device, runtime), "tokens_per_s": sum(rt.tokens_total for rt in tasks) / wall,
            "last_loss": sum(rt.last_loss for rt in tasks) / len(tasks)}


def _peak(device, runtime: int, reset: bool = False) -> int:
    """Peak bytes since the last reset: CUDA's allocator peak, or the process's VmHWM less runtime."""
    import torch

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024 - runtime
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the high-water mark restarts at the current RSS
    return peak


def _planned(model: str, dtype: str, storage: str) -> int | None:
    from muxtune.facts.builtin_models import BUILTIN_ARCHITECTURES
    from muxtune.operator import memory

    arch = BUILTIN_ARCHITECTURES.get(model.removeprefix("builtin:")) if model.startswith("builtin:") else None
    return None if arch is None else memory.weight_bytes(arch.model_copy(update={"dtype": dtype, "quantization": storage}))


def _table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["storage"] == "none"), rows[0])
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.1f} MiB"  # noqa: E731
    lines = ["| storage | weights | x | planned | load peak | peak | x | tokens/s | loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['storage']} | {mib(r['weights_bytes'])} | {r['weights_bytes'] / base['weights_bytes']:.2f} | "
                     f"{mib(r['planned_bytes'])} | {mib(r['load_peak_bytes'])} | {mib(r['peak_bytes'])} | "
                     f"{r['peak_bytes'] / base['peak_bytes']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['last_loss']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker.read_text()))))
        return
    from bench.workload import make_jobs, resolve_model

    path = resolve_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-qlora-") as tmp:
        jobs = make_jobs(Path(tmp) / "data", args.n, ranks=[8, 16], batch_size=args.batch, steps=args.steps,
                         warmup_steps=0, max_seq_len=args.max_seq_len, median_len=64, sigma=0.6, lr=1e-3)
        for storage in args.storages:
            spec = {"storage": storage, "path": str(path), "dtype": args.dtype, "device": args.device,
                    "jobs": [j.to_dict() for j in jobs], "out": str(Path(tmp) / storage)}
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            out = subprocess.run([sys.executable, "-m", "bench.qlora", "--worker", str(Path(tmp) / "spec.json")],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"[bench] {storage} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["planned_bytes"] = _planned(args.model, args.dtype, storage)
            rows.append(row)
            print(f"[bench] {storage}: weights {row['weights_bytes'] / 2**20:.1f} MiB, peak {row['peak_bytes'] / 2**20:.1f} MiB",
                  file=sys.stderr)
    print(f"{args.model}, {args.dtype}, {rows[0]['device']}, {args.n} LoRA tasks x {args.steps} steps x batch {args.batch}")
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
