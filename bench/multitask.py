"""N LoRA fine-tuning tasks five ways: four ways users run them today, and muxtune.

    python -m bench.multitask --quick               # a few minutes on an idle 2-core CPU, tiny model
    python -m bench.multitask --quick --long        # long sequences: median 512 tokens, cap 2048
    python -m bench.multitask                       # full: small-llama on CPU, a ~1B model on GPU
    python -m bench.multitask --quick --json out.json --wait-idle 300 --rounds 2

The workload: for each N in --n, tasks 0..N-1, each a LoRA on q_proj/v_proj with its own rank
(cycling through --ranks, e.g. 4, 8, 16, 32), its own data (prompt/completion pairs whose lengths
follow a lognormal with a long tail, capped at --max-seq-len), --batch-size sequences per step and
--steps timed optimizer steps after --warmup-steps untimed ones. The data files are generated
deterministically, so every system trains exactly the same sequences of every task (the real-token
counts and first-step losses agree across systems; the run fails loudly if they do not).

The systems, each in its own process(es), so peak memory is its own:
  separate    N concurrent processes, each a plain Hugging Face + PEFT loop (get_peft_model, AdamW,
              dynamic padding to the batch's longest sequence, labels -100, sdpa attention, same
              dtype), the way tasks run today. Each process gets max(1, cores // N) torch threads,
              so the N processes share the cores without oversubscription. They start their timed
              region together (a barrier after warm-up).
  sequential  the same loop, the N jobs one after another in one process (all cores, or --threads).
  separate-packed, sequential-packed
              the same two, as a knowledgeable user runs them: padding-free batches (transformers'
              DataCollatorWithFlattening: one row per step, positions restarting per sequence)
              with per-sequence (varlen) attention: the engine's own attention function,
              registered with transformers as a user registers flash-attn, so the baseline attends
              exactly as muxtune does (bench/workers.py).
  muxtune     the N tasks multiplexed in one engine (MuxTrainer over one shared frozen backbone:
              packed rows, per-sequence attention, per-task LoRA deltas, token-budget rounds), all
              cores (or --threads).
Setup (loading the model, tokenising, creating adapters and optimizers) and warm-up steps are
outside the timed region in every system; saving each trained adapter is inside.
Workers start (--launcher) by fork from a process that has imported torch, transformers and peft
but run nothing (the default on CPU: saves ~5 s of imports per process), or as fresh interpreters
(the default on GPU, where a CUDA context cannot survive fork). Timed regions are the same either
way; RSS is not quite: an exec'd interpreter's RSS counts every page its imports touched (~730 MiB
here), a forked worker's only the inherited pages it touches itself (~430 MiB), so the fork default
gives separate the smaller per-process overhead and muxtune the less flattering memory ratio.

How to read the table (one block per N):
  tokens/s   aggregate real (non-padding) training tokens per second over all N tasks: total real
             tokens / wall time from the common start until the last task finishes. Higher is better.
  x sep      this row's tokens/s divided by separate's (same N); x seq, x sep-p, x seq-p likewise
             for sequential, separate-packed, sequential-packed. muxtune's x sep-p is the headline:
             how much faster the same jobs finish together than the best separate setup.
  peak mem   peak memory summed over the system's processes: peak RSS on CPU (each process's
             getrusage maximum; every process carries the Python/torch runtime, 'runtime_rss_bytes'
             in the JSON, which on CPU with a small model is most of it), torch.cuda.max_memory_allocated
             on GPU (each process's CUDA context, ~0.5 GiB, is not included). m/sep, m/sep-p: its
             ratio to separate's, separate-packed's: below 1 is memory saved.
  eff.tok    effective-token ratio: real tokens / computed tokens. For the padded HF loop computed =
             batch x padded length; packed baselines compute no padding; muxtune: rows x chunk size.
  attn       attention work needed / computed: causal (query, key) pairs within each sequence over
             the pairs the attention computed (the padded loop's sdpa computes batch x length^2
             under its mask; per-sequence attention computes the needed pairs and padding tails).
  tok/cpu-s  real tokens per CPU-second of the system's processes: less moved than tokens/s by other
             processes on a shared machine (though spinning threads of a descheduled team still count).
  done (s)   per-task completion times from the common start, first-last task. Sequential finishes
             tasks one by one; separate and muxtune finish them all near the end.
  MFU        (GPU only) useful model FLOPs per second / device peak (--peak-tflops, or a table of
             H100/H200/A100 dense bf16 peaks): 4 x backbone parameters per real token (frozen:
             forward + input gradients), 6 x adapter parameters, and causal attention within each
             sequence; padding is not counted.
Timings are (low) medians over --repeats (and over --rounds: the whole list of systems run again,
alternating, so slow drifts in a shared machine's load hit every system alike); the JSON (--json)
has every repeat, per-task figures
(ranks, real tokens, completion times, first/last losses), CPU seconds and tokens per CPU-second.
On a shared machine, timings mislead: other processes take N shares of the CPU from N separate
processes but stall a multi-threaded one whenever one of its threads is descheduled. The run measures
how many cores other processes kept busy ('background_cores') and warns above 0.25; --wait-idle
waits for a quiet CPU before each system.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.launch import WorkerError, Zygote, launch, wait_idle
from bench.report import SYSTEMS, add_ratios, check_consistency, mib, render

# Defaults per mode; any option given on the command line wins.
PROFILES = {
    "quick": dict(model="builtin:tiny-llama", steps=4, warmup_steps=1, batch_size=8, max_seq_len=256,
                  median_len=64, sigma=0.9, repeats=3, token_budget=4096),
    # batch 4 and cap 384 keep 8 separate HF processes (~1.2 GB RSS each) inside a 24 GB machine
    "full-cpu": dict(model="builtin:small-llama", steps=6, warmup_steps=1, batch_size=4, max_seq_len=384,
                     median_len=96, sigma=0.9, repeats=3, token_budget=4096),
    # cap 1024 keeps 8 separate HF processes (each: weights + padded activations + fp32 logits over a
    # 32k vocabulary) inside an 80 GB H100; --max-seq-len 2048 on an H200
    "full-cuda": dict(model="config:llama-1b", steps=20, warmup_steps=3, batch_size=8, max_seq_len=1024,
                      median_len=192, sigma=1.0, repeats=3, token_budget=16384),
}
# --long: sequences of median 512 tokens, capped at 2048; a budget that still fuses several tasks
LONG = {
    "quick": dict(steps=2, batch_size=4, max_seq_len=2048, median_len=512, sigma=0.8, repeats=2, token_budget=16384),
    "full-cpu": dict(steps=3, batch_size=4, max_seq_len=2048, median_len=512, sigma=0.8, repeats=2, token_budget=16384),
    "full-cuda": dict(steps=10, batch_size=8, max_seq_len=2048, median_len=512, sigma=0.8, repeats=3, token_budget=32768),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.multitask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short CPU mode: tiny model, few steps (a few minutes)")
    p.add_argument("--long", action="store_true", help="long sequences: lognormal median 512 tokens, capped at 2048")
    p.add_argument("--n", type=int, nargs="+", default=[1, 2, 4, 8], metavar="N", help="task counts (default 1 2 4 8)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="which systems to run")
    p.add_argument("--model", help="builtin:tiny-llama | builtin:small-llama | config:llama-1b | config:qwen2-0.5b | a model directory")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32], help="LoRA ranks, cycled over tasks")
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step per task")
    p.add_argument("--steps", type=int, help="timed optimizer steps per task")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (per process, throwaway adapter)")
    p.add_argument("--max-seq-len", type=int, help="cap on sequence length (tokens)")
    p.add_argument("--median-len", type=float, help="median sequence length of the lognormal")
    p.add_argument("--sigma", type=float, help="lognormal sigma (the tail's weight)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (all tasks)")
    p.add_argument("--repeats", type=int, help="timed repeats per system (median reported)")
    p.add_argument("--rounds", type=int, default=1, help="run the whole list of systems this many times, alternating"
                   " (median reported): on a shared machine, load drifts hit every system alike")
    p.add_argument("--token-budget", type=int, help="muxtune: real tokens per fused round")
    p.add_argument("--chunk-size", type=int, default=None, help="muxtune: packed chunk size (default: the engine's choice)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: by GPU name, dense bf16)")
    p.add_argument("--json", type=Path, help="write the rows here (a JSON list, one row per system and N)")
    p.add_argument("--workdir", type=Path, help="keep data, logs and adapters here (default: a temp dir, removed)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed for one system at one N")
    p.add_argument("--threads", type=int, help="torch threads of the one-process systems, sequential and muxtune"
                   " (default: all cores; separate always gets max(1, cores // N) per process)")
    p.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                   help="before each system, wait up to this long for other processes to leave the CPU idle (shared machines)")
    p.add_argument("--no-memory-guard", dest="memory_guard", action="store_false",
                   help="run a system even when its predicted RAM (from smaller N) exceeds 80%% of what is available")
    p.add_argument("--launcher", choices=["auto", "fork", "exec"], default="auto",
                   help="how workers start: fork from a process that imported torch once (auto on CPU), or a fresh"
                        " interpreter each (auto on GPU); the timed region and memory accounting are the same")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for n in args.n:
        if n < 1:
            p.error("--n: task counts must be >= 1")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def resolve_setup(args) -> dict:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    mode = "quick" if args.quick else f"full-{device}"
    profile = dict(PROFILES[mode], **(LONG[mode] if args.long else {}))
    for key, value in profile.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    if args.max_seq_len < 8:
        raise SystemExit("--max-seq-len must be at least 8")
    cores = len(os.sched_getaffinity(0))
    # the parent never creates a CUDA context (it would hold GPU memory through every run): the
    # device name, and so the peak for MFU, come from the first worker's report
    return dict(device=device, dtype=dtype, cores=cores, device_name="cpu" if device == "cpu" else "cuda",
                peak_tflops=args.peak_tflops)


# ----- one system at one N -------------------------------------------------------------------------
def run_system(system: str, jobs, args, setup: dict, model_path: Path, work: Path, zygote=None) -> dict:
    n = len(jobs)
    run_dir = work / "runs" / f"{system}-n{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    common = dict(role=system, model=str(model_path), device="cuda:0" if setup["device"] == "cuda" else "cpu", dtype=setup["dtype"],
                  repeats=args.repeats, token_budget=args.token_budget, chunk_size=args.chunk_size)
    if system.startswith("separate"):
        threads = max(1, setup["cores"] // n)  # the N processes share the cores (on GPU too: CPU-side work)
        sync_dir = run_dir / "sync"
        sync_dir.mkdir(parents=True)
        specs = [dict(common, jobs=[j.to_dict()], worker=i, threads=threads, sync_dir=str(sync_dir),
                      out_dir=str(run_dir / "out"), result=str(run_dir / f"result-{i}.json")) for i, j in enumerate(jobs)]
    else:
        threads = args.threads or setup["cores"]
        specs = [dict(common, jobs=[j.to_dict() for j in jobs], worker=0, threads=threads, sync_dir=None,
                      out_dir=str(run_dir / "out"), result=str(run_dir / "result-0.json"))]
    start = zygote.launch if zygote is not None else launch
    results, background = start(specs, run_dir, args.repeats, system.startswith("separate"), args.timeout)
    row = summarise(system, jobs, results, args, setup, threads)
    row["background_cores"] = background
    row["launcher"] = "exec" if zygote is None else "fork"
    return row


def summarise(system: str, jobs, results: list[dict], args, setup: dict, threads: int) -> dict:
    from bench.workload import train_flops

    names = [j.name for j in jobs]
    per_rep = []
    for rep in range(args.repeats):
        tasks = {}
        for res in results:
            tasks.update(res["reps"][rep]["tasks"])
        if system.startswith("separate"):
            go = min(res["reps"][rep]["go_time"] for res in results)
            wall = max(res["reps"][rep]["end_time"] for res in results) - go
        else:
            wall = results[0]["reps"][rep]["wall_s"]
        real = sum(tasks[n]["real_tokens"] for n in names)
        if system == "muxtune":
            computed = results[0]["reps"][rep]["computed_tokens"]
            if results[0]["reps"][rep]["real_tokens"] != real:
                raise WorkerError("muxtune: round and task token counts disagree")
        else:
            computed = sum(tasks[n]["computed_tokens"] for n in names)
        if system == "muxtune":
            attn = (results[0]["reps"][rep]["attn_needed"], results[0]["reps"][rep]["attn_computed"])
        else:
            attn = (sum(tasks[n]["attn_needed"] for n in names), sum(tasks[n]["attn_computed"] for n in names))
        cpu = sum(res["reps"][rep]["cpu_s"] for res in results)
        per_rep.append(dict(wall=wall, real=real, computed=computed, tasks=tasks, cpu=cpu, attn=attn))
    if len({r["real"] for r in per_rep}) != 1:
        raise WorkerError(f"{system}: real tokens differ between repeats")
    info, dims = {}, results[0]["dims"]
    for res in results:
        info.update(res["tasks"])
    tps = [r["real"] / r["wall"] for r in per_rep]
    mid = sorted(range(len(per_rep)), key=lambda i: tps[i])[(len(per_rep) - 1) // 2]  # the (low) median repeat
    rep = per_rep[mid]
    flops = sum(train_flops(info[n]["lengths"], dims, info[n]["trainable"]) for n in names)
    cuda = setup["device"] == "cuda"
    peak_mem = sum((r["cuda_peak_bytes"] if cuda else r["peak_rss_bytes"]) for r in results)
    if cuda:
        from bench.workload import peak_tflops

        setup["device_name"] = results[0]["device_name"]
        setup["peak_tflops"] = setup["peak_tflops"] or peak_tflops(setup["device_name"])
    mfu = flops / rep["wall"] / (setup["peak_tflops"] * 1e12) if cuda and setup["peak_tflops"] else None
    return {
        "system": system, "n_tasks": len(jobs), "tokens_per_s": tps[mid],
        "tokens_per_s_repeats": tps, "seconds": rep["wall"], "seconds_repeats": [r["wall"] for r in per_rep],
        "real_tokens": rep["real"], "computed_tokens": rep["computed"],
        "cpu_s": rep["cpu"], "tokens_per_cpu_s": rep["real"] / rep["cpu"] if rep["cpu"] > 0 else None,
        "effective_token_ratio": rep["real"] / max(1, rep["computed"]),
        "attention_pairs_needed": rep["attn"][0], "attention_pairs_computed": rep["attn"][1],
        "attention_work_ratio": rep["attn"][0] / rep["attn"][1] if rep["attn"][1] else None,
        "peak_memory_bytes": peak_mem,
        "memory_kind": "cuda_max_memory_allocated" if cuda else "peak_rss",
        "peak_rss_bytes": sum(r["peak_rss_bytes"] for r in results),
        "runtime_rss_bytes": sum(r["runtime_rss_bytes"] for r in results),
        "processes": len(results), "threads_per_process": threads,
        "task_names": names, "task_ranks": [j.rank for j in jobs],
        "task_real_tokens": [rep["tasks"][n]["real_tokens"] for n in names],
        "task_completion_s": [statistics.median(r["tasks"][n]["completion_s"] for r in per_rep) for n in names],
        "task_first_loss": [rep["tasks"][n]["first_loss"] for n in names],
        "task_last_loss": [rep["tasks"][n]["last_loss"] for n in names],
        "model_flops": flops, "model_tflops_per_s": flops / rep["wall"] / 1e12, "mfu": mfu,
        "peak_tflops": setup["peak_tflops"],
        "muxtune_rounds": results[0]["reps"][mid].get("rounds") if system == "muxtune" else None,
        "device": setup["device"], "device_name": results[0]["device_name"], "model": args.model, "cores": setup["cores"],
        "dtype": setup["dtype"], "repeats": args.repeats,
    }


def _predicted_rss(rows: list[dict], system: str, n: int) -> int | None:
    """RAM the system's processes will need at N, from the largest per-process peak seen so far
    (separate* grows with N; the one-process systems barely do). None: nothing to go by yet."""
    seen = [r for r in rows if r["system"] == system]
    if not seen:
        return None
    per_process = max(r["peak_rss_bytes"] / r["processes"] for r in seen)
    return int(per_process * (n if system.startswith("separate") else 1))


def merge_rounds(runs: list[dict]) -> list[dict]:
    """One row per system and N: the round with the (low) median tokens/s, every round's figure kept."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["system"], r["n_tasks"]), []).append(r)
    rows = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["tokens_per_s"])
        row = dict(ranked[(len(ranked) - 1) // 2])
        row["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in group]
        row["rounds"] = len(group)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        from bench.workers import main as worker_main

        worker_main(args.worker)
        return 0
    if args.zygote:
        from bench.launch import zygote_main

        zygote_main()
        return 0
    setup = resolve_setup(args)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="muxtune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    runs, skipped = [], []  # runs: one row per system, N and round
    fork = args.launcher == "fork" or (args.launcher == "auto" and setup["device"] == "cpu")
    if fork and setup["device"] == "cuda":
        raise SystemExit("--launcher fork: not with CUDA (a CUDA context does not survive fork); use exec")
    try:
        _run_all(args, setup, work, fork, runs, skipped)
    except WorkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return _report(runs, skipped, args, setup, t_start)


def _run_all(args, setup: dict, work: Path, fork: bool, runs: list[dict], skipped: list[str]) -> None:
    """Every system for every N, ``args.rounds`` times, appending to ``runs`` (and ``skipped``) as it goes."""
    from bench.workload import make_jobs, resolve_model

    zygote = None
    try:
        model_path = resolve_model(args.model)
        zygote = Zygote() if fork else None
        for n in args.n:
            jobs = make_jobs(work / "data" / f"n{n}", n, ranks=args.ranks, batch_size=args.batch_size, steps=args.steps,
                             warmup_steps=args.warmup_steps, max_seq_len=args.max_seq_len, median_len=args.median_len,
                             sigma=args.sigma, lr=args.lr)
            for _round in range(args.rounds):
                for system in args.systems:
                    if _memory_guard_skips(runs, system, n, args, setup, skipped):
                        continue
                    _wait_for_quiet(args)
                    print(f"[bench] N={n} {system} ...", file=sys.stderr, flush=True)
                    row = run_system(system, jobs, args, setup, model_path, work, zygote)
                    runs.append(row)
                    attn = row["attention_work_ratio"]
                    print(f"[bench] N={n} {system}: {row['tokens_per_s']:,.0f} tokens/s, peak {mib(row['peak_memory_bytes'])}, "
                          f"eff.tok {row['effective_token_ratio']:.3f}, attn {attn if attn is None else round(attn, 3)}",
                          file=sys.stderr, flush=True)
    finally:
        if zygote is not None:
            zygote.close()


def _memory_guard_skips(runs: list[dict], system: str, n: int, args, setup: dict, skipped: list[str]) -> bool:
    """On CPU, skip a system whose processes would need more than 80% of the available RAM (noted once)."""
    need = _predicted_rss(runs, system, n) if setup["device"] == "cpu" and args.memory_guard else None
    if need is None:
        return False
    import psutil

    available = psutil.virtual_memory().available
    if need <= 0.8 * available:
        return False
    note = (f"{system} N={n} skipped: its processes would need ~{mib(need)} of RAM (N x the peak"
            f" per process measured at smaller N), {mib(available)} is available; --no-memory-guard runs it")
    if note not in skipped:
        skipped.append(note)
    print(f"[bench] {note}", file=sys.stderr, flush=True)
    return True


def _wait_for_quiet(args) -> None:
    if args.wait_idle > 0:
        other = wait_idle(args.wait_idle)
        if other >= 0.25:
            print(f"[bench] machine still busy ({other:.1f} cores used by others) after {args.wait_idle:.0f}s; going on",
                  file=sys.stderr, flush=True)


def _report(runs: list[dict], skipped: list[str], args, setup: dict, t_start: float) -> int:
    """Print the table (and write --json); 1 when the systems did not train the same workload."""
    rows = merge_rounds(runs)
    add_ratios(rows)
    problems = check_consistency(runs)
    print(render(rows, args, setup))
    for note in skipped:
        print(f"note: {note}")
    print(f"total wall time {time.monotonic() - t_start:.0f}s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if problems:
        print("error: the systems did not train the same workload:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
