"""The issue's soak, short: the quickstart's three tasks train with `--serve-port` while N
closed-loop streaming clients (16 by default; some leave after the first chunk) keep the server
busy. Every few seconds it reads each task's optimizer step and tokens from /metrics, and reports
per task the steps and tokens under load, its share of the training tokens (the fair share is
1/tasks: the scheduler is token-fair) and the longest time it went without a step, against the
same before the load. A task that starves shows as a long gap and a share near zero.

    python -m bench.coserve_soak --seconds 45          # 2 CPU cores: about a minute and a half
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.coserve import Proc, scrape, wait_training

QUICKSTART = Path(__file__).resolve().parent.parent / "examples" / "quickstart"


def write_tasks(root: Path) -> list[str]:
    """The quickstart's tasks with steps enough for the whole soak (their data copied next to them)."""
    docs = []
    for f in sorted(QUICKSTART.glob("*.yaml")):
        d = yaml.safe_load(f.read_text())
        d["spec"]["training"].update(maxSteps=1_000_000, checkpointInterval=0)
        name = Path(d["spec"]["dataset"]["path"]).name
        (root / name).write_text((QUICKSTART / name).read_text())
        d["spec"]["dataset"]["path"] = name
        docs.append(d)
    (root / "tasks.yaml").write_text(yaml.safe_dump_all(docs))
    return [d["metadata"]["name"] for d in docs]


def progress(port: int) -> dict[str, tuple[float, float]]:
    """{task: (step, tokens)} from the engine's /metrics."""
    out: dict[str, list[float]] = {}
    for (name, labels), v in scrape(port).items():
        task = dict(labels).get("task")
        if task and name in ("muxtune_task_step", "muxtune_task_tokens_total"):
            out.setdefault(task, [0.0, 0.0])[name == "muxtune_task_tokens_total"] = v
    return {k: (s, t) for k, (s, t) in out.items()}


async def client(session, url: str, models: list[str], prompts: list[str], rng: random.Random, stop: float,
                 counts: dict) -> None:
    import aiohttp

    while time.monotonic() < stop:
        body = {"model": rng.choice(models), "prompt": rng.choice(prompts), "max_tokens": rng.randint(16, 64),
                "temperature": 0.7, "stream": True}
        abandon = rng.random() < 0.1
        try:
            async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=120)) as r:
                counts[r.status] = counts.get(r.status, 0) + 1
                if r.status != 200:
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                    continue
                async for _ in r.content:
                    if abandon:
                        counts["abandoned"] = counts.get("abandoned", 0) + 1
                        break
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1


async def load(url: str, models: list[str], prompts: list[str], clients: int, seconds: float, seed: int) -> dict:
    import aiohttp

    counts: dict = {}
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*[client(session, url + "/v1/completions", models, prompts, random.Random(seed + i),
                                      stop, counts) for i in range(clients)])
    return counts


def watch(port: int, seconds: float, every: float) -> list[tuple[float, dict]]:
    samples, t0 = [], time.monotonic()
    while True:
        samples.append((time.monotonic() - t0, progress(port)))
        if samples[-1][0] >= seconds:
            return samples
        time.sleep(every)


def summary(samples: list[tuple[float, dict]]) -> dict[str, dict]:
    """Per task: steps and tokens over the window, its token share, and its longest time without a step."""
    (t0, first), (t1, last) = samples[0], samples[-1]
    tokens = {k: last[k][1] - first.get(k, (0, 0))[1] for k in last}
    total = sum(tokens.values()) or 1.0
    out = {}
    for k in last:
        gap, since = 0.0, t0
        for (ta, a), (tb, b) in zip(samples, samples[1:]):
            if b[k][0] > a.get(k, (0, 0))[0]:
                since = tb
            gap = max(gap, tb - since)
        out[k] = {"steps": last[k][0] - first.get(k, (0, 0))[0], "tokens": tokens[k], "share": tokens[k] / total,
                  "longest_without_step_s": gap, "window_s": t1 - t0}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.coserve_soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=45.0, help="seconds of load (and as many before it, at most 20)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between reads of /metrics")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `muxtune run` flags (e.g. --train-floor 0)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="muxtune-soak-") as tmp:
        root = Path(tmp)
        names = write_tasks(root)
        prompts = [json.loads(line)["prompt"] for n in names
                   for line in (root / f"{n}.jsonl").read_text().splitlines()[:16]]
        proc = Proc("soak", ["run", "tasks.yaml", "--output", "out", "--no-progress", "--no-resume", "--serve-port", "0",
                             "--metrics-port", "0", "--metrics-host", "127.0.0.1", *args.extra], root, args.threads)
        try:
            serve, metrics = proc.port("serve", 300), proc.port("metrics", 300)
            wait_training(metrics, 300)
            before = summary(watch(metrics, min(20.0, args.seconds), args.every))
            loop = asyncio.new_event_loop()
            task = loop.run_in_executor(None, watch, metrics, args.seconds, args.every)
            counts = loop.run_until_complete(load(f"http://127.0.0.1:{serve}", names + ["builtin:tiny-llama"], prompts,
                                                  args.clients, args.seconds, args.seed))
            under = summary(loop.run_until_complete(task))
            loop.close()
        finally:
            proc.stop()
    print(f"{args.clients} clients for {args.seconds:.0f}s; responses {counts}")
    print(f"{'task':12s} {'steps before':>12s} {'steps load':>10s} {'tokens load':>11s} {'share':>6s} "
          f"{'max gap s':>9s}  (fair share {1 / len(under):.2f})")
    for k in sorted(under):
        b, u = before.get(k, {}), under[k]
        print(f"{k:12s} {b.get('steps', 0):12.0f} {u['steps']:10.0f} {u['tokens']:11.0f} {u['share']:6.2f} "
              f"{u['longest_without_step_s']:9.1f}")
    print(json.dumps({"before": before, "under_load": under, "responses": counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
