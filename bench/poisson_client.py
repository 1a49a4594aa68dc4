"""An open-loop Poisson client for an OpenAI-compatible server (loopback only).

Arrivals follow a Poisson process of a given rate from a fixed seed and do not wait for earlier
responses (open loop: a slow server gets a queue, as in production). Every request streams, so
time to first token (TTFT) is the first chunk and time per output token (TPOT) is
(last chunk - first chunk) / (completion tokens - 1), the tokens counted by the server's usage.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlparse


@dataclass
class Result:
    model: str
    status: int
    ttft: float | None = None
    tpot: float | None = None
    tokens: int = 0
    error: str | None = None

    def meets(self, ttft_s: float, tpot_s: float) -> bool:
        return (self.status == 200 and self.error is None and self.ttft is not None and self.ttft <= ttft_s
                and (self.tpot is None or self.tpot <= tpot_s))


def arrivals(rate: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def _one(session, url: str, body: dict, timeout: float) -> Result:
    import aiohttp

    res = Result(model=body["model"], status=0)
    t0 = time.perf_counter()
    first = last = None
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            res.status = r.status
            if r.status != 200:
                res.error = (await r.text())[:200]
                return res
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error")
                elif chunk.get("usage"):
                    res.tokens = chunk["usage"]["completion_tokens"]
                elif chunk.get("choices"):
                    first = first if first is not None else now
                    last = now
    except (asyncio.TimeoutError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    if first is not None:
        res.ttft = first - t0
        if res.tokens > 1:
            res.tpot = (last - first) / (res.tokens - 1)
    return res


async def run_open_loop(base_url: str, bodies: list[dict], times: list[float], timeout: float = 120.0) -> list[Result]:
    import aiohttp

    host = urlparse(base_url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the benchmark client only talks to loopback, not {host}")
    url = base_url.rstrip("/") + "/v1/completions"
    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def fire(at: float, body: dict) -> Result:
            delay = at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            return await _one(session, url, {**body, "stream": True, "stream_options": {"include_usage": True}},
                              timeout)

        return list(await asyncio.gather(*[fire(t, b) for t, b in zip(times, bodies)]))


def percentile(values: list[float], q: float) -> float | None:
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    k = (len(v) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarise(results: list[Result], ttft_s: float, tpot_s: float) -> dict:
    ok = [r for r in results if r.status == 200 and r.error is None]
    return {
        "requests": len(results), "ok": len(ok),
        "rejected": sum(1 for r in results if r.status in (429, 503)),
        "ttft_p50": percentile([r.ttft for r in ok], 0.5), "ttft_p99": percentile([r.ttft for r in ok], 0.99),
        "tpot_p50": percentile([r.tpot for r in ok], 0.5), "tpot_p99": percentile([r.tpot for r in ok], 0.99),
        "slo_attainment": sum(r.meets(ttft_s, tpot_s) for r in results) / max(1, len(results)),
        "results": [asdict(r) for r in results],
    }
