"""Co-serving benchmark: inference requests at several rates while tasks train, three ways.

  muxtune   one process trains and serves; the hybrid scheduler mixes inference and training
            tokens each iteration under the latency SLOs (`muxtune run --serve-port`);
  temporal  the same process, but it serves only between training steps: a step (a whole
            fused round) runs only while no request is in flight or waiting (`--serve-policy temporal`);
  separate  two processes, each with its own backbone: `muxtune serve` (the tasks' adapters as
            files) and `muxtune run` (training only), each with half the threads.

An open-loop Poisson client (fixed seed, a fixed number of streamed requests per rate, 127.0.0.1
only, `bench/poisson_client.py`) drives each system at every rate in turn. Per rate and system:
TTFT and TPOT p50/p99, SLO attainment (both latencies within their SLO), training tokens/s during
the rate's window and its ratio to training alone (the same process without requests), and peak
memory of the system's processes (host RSS; plus GPU memory on CUDA), read from their /metrics.

    python -m bench.coserve --quick          # 2 CPU cores, tiny model: a few minutes
    python -m bench.coserve                  # small-llama on CPU, or a 0.5B model on a GPU
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.poisson_client import arrivals, run_open_loop, summarise
from bench.workload import lognormal_lengths, write_dataset

SYSTEMS = ("muxtune", "temporal", "separate")
PROFILES = {
    "quick": dict(model="builtin:tiny-llama", tasks=3, rates=[1.0, 2.0, 4.0], requests=16, max_tokens=48,
                  slo_tpot_ms=100.0, slo_ttft_ms=1000.0, warmup_s=5.0, max_seq_len=96, batch_size=4,
                  overload_rate=24.0, overload_s=20.0),
    "full-cpu": dict(model="builtin:small-llama", tasks=4, rates=[0.5, 1.0, 2.0, 4.0], requests=40, max_tokens=32,
                     slo_tpot_ms=200.0, slo_ttft_ms=2000.0, warmup_s=15.0, max_seq_len=256, batch_size=8,
                     overload_rate=24.0, overload_s=30.0),
    "full-cuda": dict(model="config:qwen2-0.5b", tasks=8, rates=[2.0, 5.0, 10.0, 20.0], requests=200,
                      max_tokens=128, slo_tpot_ms=50.0, slo_ttft_ms=500.0, warmup_s=20.0, max_seq_len=1024,
                      batch_size=8, overload_rate=200.0, overload_s=30.0),
}
READY = {"serve": re.compile(r"serving the OpenAI API on http://127\.0\.0\.1:(\d+)"),
         "metrics": re.compile(r"serving /metrics and /v1/status on 127\.0\.0\.1:(\d+)")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.coserve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2-core CPU mode: tiny model, three rates, few requests")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--model", help="builtin:NAME, config:NAME (bench/workload.py) or a model directory")
    p.add_argument("--tasks", type=int, help="training tasks (LoRA ranks 8/16 alternating, the last one IA3)")
    p.add_argument("--rates", type=float, nargs="+", help="request rates (requests/s), low to high")
    p.add_argument("--requests", type=int, help="requests per rate")
    p.add_argument("--max-tokens", type=int, help="tokens generated per request (ignore_eos: a fixed length)")
    p.add_argument("--slo-tpot-ms", type=float)
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--attainment", type=float, default=0.9, help="a system meets the SLO at a rate when at least this"
                   " share of its requests had both latencies within their SLO")
    p.add_argument("--overload-rate", type=float, help="a request rate beyond capacity, run last: training kept per "
                   "task (its floor) and requests shed with 429 (0: skip)")
    p.add_argument("--overload-s", type=float, help="seconds of arrivals at the overload rate")
    p.add_argument("--warmup-s", type=float, help="seconds of training before the first rate")
    p.add_argument("--alone-s", type=float, help="seconds training alone is measured (default: max(10, requests / lowest rate))")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--token-budget", type=int, default=4096, help="trainer's token budget (all systems)")
    p.add_argument("--threads", type=int, help="torch threads of one-process systems (default: all cores; separate"
                   " gives each of its two processes half)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the rows here")
    p.add_argument("--workdir", type=Path, help="keep data and logs here (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for a process to be ready")
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in PROFILES["quick" if args.quick else f"full-{args.device}"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.cores = len(os.sched_getaffinity(0))
    args.threads = args.threads or args.cores
    return args


# ----- workload --------------------------------------------------------------------------------
def write_workload(args, root: Path) -> tuple[list[str], list[str]]:
    """Datasets and task files in root (relative paths: processes run there); returns the task
    names and the prompts requests use."""
    import yaml

    from bench.workload import resolve_model

    base = args.model if args.model.startswith("builtin:") else str(resolve_model(args.model))
    rng = random.Random(args.seed)
    docs, prompts, names = [], [], []
    for i in range(args.tasks):
        name = f"task-{i}"
        lengths = lognormal_lengths(rng, 256, median=args.max_seq_len / 3, sigma=0.5, lo=8, cap=args.max_seq_len)
        write_dataset(root / f"{name}.jsonl", lengths, seed=args.seed + i)
        prompts += [json.loads(line)["prompt"] for line in (root / f"{name}.jsonl").read_text().splitlines()[:32]]
        ia3 = i == args.tasks - 1 and args.tasks > 1
        peft = ({"method": "ia3", "targetModules": ["k_proj", "v_proj", "down_proj"], "feedforwardModules": ["down_proj"]}
                if ia3 else {"method": "lora", "r": 8 if i % 2 == 0 else 16, "alpha": 16, "targetModules": ["q_proj", "v_proj"]})
        docs.append({"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": name},
                     "spec": {"baseModel": base, "dataset": {"path": f"{name}.jsonl", "maxSeqLen": args.max_seq_len},
                              "peft": peft, "training": {"maxSteps": 1_000_000, "batchSize": args.batch_size,
                                                         "learningRate": 1e-4, "seed": i, "checkpointInterval": 0}}})
        names.append(name)
    (root / "tasks.yaml").write_text(yaml.safe_dump_all(docs))
    for d in docs:  # one step each: the adapter files `separate` serves
        d["spec"]["training"]["maxSteps"] = 1
    (root / "prep.yaml").write_text(yaml.safe_dump_all(docs))
    return names, prompts


def request_bodies(args, models: list[str], prompts: list[str], rate_index: int) -> list[dict]:
    rng = random.Random(args.seed * 1000 + rate_index)
    return [{"model": models[k % len(models)], "prompt": rng.choice(prompts), "max_tokens": args.max_tokens,
             "temperature": 0, "ignore_eos": True} for k in range(args.requests)]


# ----- processes -------------------------------------------------------------------------------
class Proc:
    def __init__(self, name: str, argv: list[str], root: Path, threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        # idle OpenMP threads sleep instead of spinning: with several processes (or a busy machine)
        # spinning workers starve each other (a tiny-llama forward: ~600 ms spinning vs ~9 ms passive,
        # measured on a loaded 2-core machine)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.name, self.log = name, root / f"{name}.log"
        exe = str(Path(sys.executable).with_name("muxtune"))
        self.proc = subprocess.Popen([exe, *argv], cwd=root, env=env, stdout=open(self.log, "w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def port(self, kind: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = READY[kind].search(self.log.read_text())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n" + self.log.read_text()[-3000:])
            time.sleep(0.2)
        raise SystemExit(f"{self.name}: not ready after {timeout:.0f}s:\n" + self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def train_tokens(port: int) -> float:
    return scrape(port).get(("muxtune_engine_real_tokens_total", ()), 0.0)


def task_tokens(port: int) -> dict[str, float]:
    """Real tokens of each task's completed steps."""
    return {dict(labels)["task"]: v for (name, labels), v in scrape(port).items()
            if name == "muxtune_task_tokens_total"}


def counter(port: int, name: str) -> float:
    return scrape(port).get((name, ()), 0.0)


def wait_training(port: int, timeout: float) -> None:
    """The metrics port opens before the backbone loads: wait for the first training round."""
    deadline = time.monotonic() + timeout
    while train_tokens(port) <= 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"no training round after {timeout:.0f}s (metrics port {port})")
        time.sleep(0.5)


def peak_memory(ports: list[int]) -> dict:
    host = gpu = 0.0
    for port in ports:
        for (name, labels), v in scrape(port).items():
            if name == "muxtune_engine_memory_peak_bytes":
                kind = dict(labels).get("kind")
                host += v if kind == "host" else 0
                gpu += v if kind == "gpu" else 0
    return {"peak_host_bytes": host, "peak_gpu_bytes": gpu}


def serve_flags(args) -> list[str]:
    return ["--slo-tpot-ms", str(args.slo_tpot_ms), "--slo-ttft-ms", str(args.slo_ttft_ms),
            "--max-tokens", str(max(args.max_tokens, 16)), "--max-queue", "1024",
            "--device", args.device]


def start_system(system: str, args, root: Path) -> tuple[list[Proc], int, int, list[int]]:
    """Processes, the serving port, the training metrics port, and every metrics port (for memory)."""
    train = ["run", "tasks.yaml", "--output", f"out-{system}", "--no-progress", "--no-resume", "--device", args.device,
             "--token-budget", str(args.token_budget), "--metrics-port", "0", "--metrics-host", "127.0.0.1"]
    if system in ("muxtune", "temporal"):
        p = Proc(system, train + ["--serve-port", "0", "--serve-policy", "coserve" if system == "muxtune" else "temporal",
                                  *serve_flags(args)], root, args.threads)
        serve, metrics = p.port("serve", args.timeout), p.port("metrics", args.timeout)
        return [p], serve, metrics, [metrics]
    half = max(1, args.threads // 2)
    trainer = Proc("separate-train", train, root, half)
    server = Proc("separate-serve", ["serve", *[f"prep/default/{n}" for n in args.names], "--port", "0",
                                     *serve_flags(args)], root, half)
    serve, metrics = server.port("serve", args.timeout), trainer.port("metrics", args.timeout)
    return [trainer, server], serve, metrics, [metrics, serve]


def measure_alone(args, root: Path) -> tuple[float, dict, dict[str, float]]:
    p = Proc("alone", ["run", "tasks.yaml", "--output", "out-alone", "--no-progress", "--no-resume", "--device",
                       args.device, "--token-budget", str(args.token_budget), "--metrics-port", "0",
                       "--metrics-host", "127.0.0.1"], root, args.threads)
    try:
        port = p.port("metrics", args.timeout)
        wait_training(port, args.timeout)
        time.sleep(args.warmup_s)
        t0, n0, per0 = time.perf_counter(), train_tokens(port), task_tokens(port)
        time.sleep(args.alone_s or max(10.0, args.requests / min(args.rates)))
        seconds = time.perf_counter() - t0
        per = {k: (v - per0.get(k, 0.0)) / seconds for k, v in task_tokens(port).items()}
        return (train_tokens(port) - n0) / seconds, peak_memory([port]), per
    finally:
        p.stop()


def run_overload(system: str, args, url: str, serve: int, metrics: int, models, prompts, alone_tasks) -> dict:
    """Arrivals at the overload rate: training kept per task (tokens/s against training alone) and
    the requests shed with 429 (the client's count and the server's muxtune_serve_shed_requests_total)."""
    count = max(1, int(args.overload_rate * args.overload_s))
    bodies = [request_bodies(args, models, prompts, 100 + i // args.requests)[i % args.requests] for i in range(count)]
    t0, per0 = time.perf_counter(), task_tokens(metrics)
    shed0, floor0 = counter(serve, "muxtune_serve_shed_requests_total"), counter(metrics, "muxtune_serve_floor_rounds_total")
    results = asyncio.run(run_open_loop(url, bodies, arrivals(args.overload_rate, count, args.seed + 100)))
    seconds = time.perf_counter() - t0
    per = {k: (v - per0.get(k, 0.0)) / seconds for k, v in task_tokens(metrics).items()}
    row = summarise(results, args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    row.update(system=system, rate=args.overload_rate, window_s=seconds, overload=True,
               shed_429=sum(1 for r in results if r.status == 429),
               server_shed=counter(serve, "muxtune_serve_shed_requests_total") - shed0,
               floor_rounds=counter(metrics, "muxtune_serve_floor_rounds_total") - floor0,
               task_tokens_per_s=per, task_kept={k: per[k] / alone_tasks[k] for k in per if alone_tasks.get(k)})
    print(f"  {system:9s} overload {args.overload_rate:.2f}/s: {row['ok']} ok, {row['shed_429']} shed (429), "
          f"kept per task {', '.join(f'{k} {v:.2f}' for k, v in sorted(row['task_kept'].items()))}",
          file=sys.stderr, flush=True)
    return row


def run_system(system: str, args, root: Path, models: list[str], prompts: list[str], alone: float,
               alone_tasks: dict[str, float] | None = None) -> list[dict]:
    procs, serve, metrics, mem_ports = start_system(system, args, root)
    url = f"http://127.0.0.1:{serve}"
    rows = []
    try:
        wait_training(metrics, args.timeout)
        asyncio.run(run_open_loop(url, request_bodies(args, models, prompts, -1)[:2], [0.0, 0.1]))  # warm up
        time.sleep(args.warmup_s)
        for i, rate in enumerate(args.rates):
            t0, n0 = time.perf_counter(), train_tokens(metrics)
            results = asyncio.run(run_open_loop(url, request_bodies(args, models, prompts, i),
                                                arrivals(rate, args.requests, args.seed + i)))
            seconds = time.perf_counter() - t0
            tps = (train_tokens(metrics) - n0) / seconds
            row = summarise(results, args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
            row.update(system=system, rate=rate, window_s=seconds, train_tokens_per_s=tps,
                       train_kept=tps / alone if alone else None)
            rows.append(row)
            print(f"  {system:9s} rate {rate:5.2f}/s: attainment {row['slo_attainment']:.2f}, "
                  f"train {tps:8.0f} tok/s", file=sys.stderr, flush=True)
        if args.overload_rate:
            rows.append(run_overload(system, args, url, serve, metrics, models, prompts, alone_tasks or {}))
        mem = peak_memory(mem_ports)
        for row in rows:
            row.update(mem)
    finally:
        for p in procs:
            p.stop()
    return rows


# ----- report ----------------------------------------------------------------------------------
def _ms(v) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def render(rows: list[dict], args, alone: float, alone_mem: dict) -> str:
    head = (f"co-serving: {args.model}, {args.tasks} training tasks, {args.requests} requests/rate of "
            f"{args.max_tokens} tokens, SLO TTFT {args.slo_ttft_ms:.0f} ms / TPOT {args.slo_tpot_ms:.0f} ms, "
            f"{args.device}, {args.threads} threads; training alone {alone:.0f} tok/s, "
            f"{alone_mem['peak_host_bytes'] / 2**20:.0f} MiB")
    cols = ("rate/s", "system", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "SLO att.", "train tok/s", "kept",
            "peak MiB", "ok/429")
    lines = [head, "  ".join(f"{c:>11s}" for c in cols)]
    for r in sorted((r for r in rows if not r.get("overload")), key=lambda r: (r["rate"], SYSTEMS.index(r["system"]))):
        mem = (r["peak_host_bytes"] + r["peak_gpu_bytes"]) / 2**20
        vals = (f"{r['rate']:.2f}", r["system"], _ms(r["ttft_p50"]), _ms(r["ttft_p99"]), _ms(r["tpot_p50"]),
                _ms(r["tpot_p99"]), f"{r['slo_attainment']:.2f}", f"{r['train_tokens_per_s']:.0f}",
                "-" if r["train_kept"] is None else f"{r['train_kept']:.2f}", f"{mem:.0f}", f"{r['ok']}/{r['rejected']}")
        lines.append("  ".join(f"{v:>11s}" for v in vals))
    lines += verdict([r for r in rows if not r.get("overload")], args)
    lines += render_overload([r for r in rows if r.get("overload")], args)
    return "\n".join(lines)


def render_overload(rows: list[dict], args) -> list[str]:
    """Per system at the overload rate: requests answered and shed, and training kept per task."""
    if not rows:
        return []
    out = [f"overload: {args.overload_rate:.2f} requests/s for {args.overload_s:.0f}s (beyond capacity); "
           "training kept = task tokens/s against training alone"]
    for r in rows:
        kept = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["task_kept"].items()))
        out.append(f"  {r['system']:9s} {r['requests']} requests: {r['ok']} answered, {r['shed_429']} shed with 429 "
                   f"(server counted {r['server_shed']:.0f}), floor rounds {r['floor_rounds']:.0f}; kept per task: {kept}")
    return out


def verdict(rows: list[dict], args) -> list[str]:
    """The goal, checked per rate: where separate meets the SLO muxtune does too, muxtune trains
    faster than temporal, and uses less memory than separate."""
    by = {(r["rate"], r["system"]): r for r in rows}
    out = []
    for rate in args.rates:
        m, t, s = by.get((rate, "muxtune")), by.get((rate, "temporal")), by.get((rate, "separate"))
        if not m:
            continue
        notes = []
        if s:
            if s["slo_attainment"] >= args.attainment:
                notes.append("SLO: separate meets it, muxtune " + ("meets it" if m["slo_attainment"] >= args.attainment
                                                                    else "MISSES it"))
            notes.append("memory vs separate " + ("lower" if m["peak_host_bytes"] + m["peak_gpu_bytes"]
                                                   < s["peak_host_bytes"] + s["peak_gpu_bytes"] else "NOT lower"))
        if t:
            notes.append("training vs temporal " + ("faster" if m["train_tokens_per_s"] > t["train_tokens_per_s"]
                                                     else "NOT faster"))
        out.append(f"rate {rate:.2f}/s: " + "; ".join(notes))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="muxtune-coserve-") as tmp:
        root = (args.workdir or Path(tmp)).resolve()
        root.mkdir(parents=True, exist_ok=True)
        names, prompts = write_workload(args, root)
        args.names = names
        prep = subprocess.run([str(Path(sys.executable).with_name("muxtune")), "run", "prep.yaml", "--output", "prep",
                               "--no-progress", "--no-resume", "--device", args.device], cwd=root,
                              capture_output=True, text=True)
        if prep.returncode != 0:
            raise SystemExit("preparing the adapters failed:\n" + prep.stdout + prep.stderr)
        base = args.model if args.model.startswith("builtin:") else None
        models = names + ([base] if base else [])
        print(f"training alone ({args.threads} threads) ...", file=sys.stderr, flush=True)
        alone, alone_mem, alone_tasks = measure_alone(args, root)
        rows = []
        for system in args.systems:
            print(f"{system} ...", file=sys.stderr, flush=True)
            rows += run_system(system, args, root, models, prompts, alone, alone_tasks)
        print(render(rows, args, alone, alone_mem))
        if args.json:
            args.json.write_text(json.dumps({"alone_tokens_per_s": alone, "alone_memory": alone_mem,
                                             "alone_task_tokens_per_s": alone_tasks, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
