"""Prometheus series of the inference side, in engine/observe/engine_metrics.py's style (one registry per
process, label sets bounded by the adapters served: `model` is a served name, never a client's
free text).

| metric | type | meaning |
| --- | --- | --- |
| muxtune_serve_requests_total{model,outcome} | counter | requests that ended: stop, length, abort (client went away), error |
| muxtune_serve_client_disconnects_total{model} | counter | clients that went away before their answer was whole (their rows freed) |
| muxtune_serve_shed_requests_total | counter | requests refused with 429 because they were beyond capacity (queue full, or too long a wait) |
| muxtune_serve_train_share_ratio | gauge | training's share of the recent work time (kept at or above the floor) |
| muxtune_serve_train_floor_ratio | gauge | the share of time training keeps under any load (--train-floor) |
| muxtune_serve_floor_rounds_total | counter | training rounds run past the SLO budget to keep the floor |
| muxtune_serve_rejected_requests_total{status} | counter | requests refused before generation: 400, 404, 429, 503 |
| muxtune_serve_prompt_tokens_total{model} | counter | prompt tokens of admitted requests (tokens in) |
| muxtune_serve_generation_tokens_total{model} | counter | generated tokens (tokens out) |
| muxtune_serve_time_to_first_token_seconds{model} | histogram | arrival to first token |
| muxtune_serve_time_per_output_token_seconds{model} | histogram | a request's mean time per output token after the first |
| muxtune_serve_slo_requests_total{model,slo} | counter | finished requests that met (slo="met") or missed both latency SLOs |
| muxtune_serve_requests_waiting{model} | gauge | requests queued for a KV cache row |
| muxtune_serve_requests_running{model} | gauge | requests generating |
| muxtune_serve_kv_cache_usage_ratio | gauge | KV cache rows in use / rows (0-1) |
| muxtune_serve_inference_duration_seconds | histogram | one batched inference forward (decode + prefill) |
| muxtune_serve_train_tokens_total{model,load} | counter | training tokens run while requests were in flight (load="serving") or not ("idle") |
| muxtune_serve_train_tokens_per_second | gauge | training tokens/s over the last 10 s of iterations with requests in flight |
| muxtune_serve_train_token_budget | gauge | training tokens the SLO controller allowed in the latest iteration |
| muxtune_serve_slo_margin_ratio | gauge | the controller's safety margin on deadlines (0.2-0.85) |
| muxtune_serve_adapter_versions | gauge | frozen adapter versions alive (held by requests or newest) |
| muxtune_serve_adapter_step{model} | gauge | optimizer step of the newest version served for a training task |
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
OUTCOMES = ("stop", "length", "abort", "error")
RATE_WINDOW_S = 10.0


class ServeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, slo=None, clock=time.monotonic):
        self.registry = registry or CollectorRegistry()
        self.slo = slo
        self.clock = clock
        self.engine = None
        self.controller = None
        self.trainer = None
        self.loop = None  # coserve.CoServer: the training floor
        self._lock = threading.Lock()
        self._requests: Counter = Counter()  # (model, outcome)
        self._rejected: Counter = Counter()  # status
        self._disconnects: Counter = Counter()  # model
        self._prompt: Counter = Counter()
        self._generated: Counter = Counter()
        self._slo: Counter = Counter()  # (model, met|missed)
        self._train: Counter = Counter()  # (model, load)
        self._window: deque = deque()  # (time, seconds, tokens) of iterations with requests in flight
        r = self.registry
        self.ttft = Histogram("muxtune_serve_time_to_first_token_seconds", "Request arrival to its first token.",
                              ["model"], registry=r, buckets=TTFT_BUCKETS)
        self.tpot = Histogram("muxtune_serve_time_per_output_token_seconds",
                              "A request's mean time per output token after the first.", ["model"], registry=r,
                              buckets=TPOT_BUCKETS)
        self.forward = Histogram("muxtune_serve_inference_duration_seconds",
                                 "One batched inference forward (decode and prefill tokens).", registry=r,
                                 buckets=FORWARD_BUCKETS)
        r.register(_Collector(self))

    def attach(self, engine, controller=None, trainer=None, loop=None) -> None:
        self.engine, self.controller, self.trainer, self.loop = engine, controller, trainer, loop

    # ----- engine thread ----------------------------------------------------------------------
    def admitted(self, req) -> None:
        with self._lock:
            self._prompt[req.model.name] += len(req.prompt_ids)

    def first_token(self, req) -> None:
        self.ttft.labels(req.model.name).observe(req.ttft)

    def finished(self, req, outcome: str) -> None:
        name = req.model.name
        tpot = req.tpot
        if tpot is not None:
            self.tpot.labels(name).observe(tpot)
        with self._lock:
            self._requests[(name, outcome)] += 1
            self._generated[name] += len(req.output_ids)
            if self.slo is not None and outcome in ("stop", "length"):
                met = req.ttft is not None and req.ttft <= self.slo.ttft_s and (tpot is None or tpot <= self.slo.tpot_s)
                self._slo[(name, "met" if met else "missed")] += 1

    def iteration(self, stats, train_tokens: dict[str, int], train_seconds: float, serving: bool) -> None:
        """train_tokens: real training tokens this iteration, by served task name."""
        if stats is not None:
            self.forward.observe(stats.seconds)
        total = sum(train_tokens.values())
        with self._lock:
            load = "serving" if serving or stats is not None else "idle"
            for name, n in train_tokens.items():
                self._train[(name, load)] += n
            if load == "serving":
                now = self.clock()
                self._window.append((now, (stats.seconds if stats else 0.0) + train_seconds, total))
                while self._window and self._window[0][0] < now - RATE_WINDOW_S:
                    self._window.popleft()

    # ----- HTTP thread ------------------------------------------------------------------------
    def rejected(self, status: int) -> None:
        with self._lock:
            self._rejected[str(status)] += 1

    def disconnected(self, model: str) -> None:
        with self._lock:
            self._disconnects[model] += 1

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import generate_latest
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, m: ServeMetrics):
        self.m = m

    @staticmethod
    def _disconnects(models, disconnects: dict) -> CounterMetricFamily:
        fam = CounterMetricFamily("muxtune_serve_client_disconnects",
                                  "Clients that went away before their answer was whole.", labels=["model"])
        for name in sorted(set(models) | set(disconnects)):
            fam.add_metric([name], disconnects.get(name, 0))
        return fam

    @staticmethod
    def _overload(m: ServeMetrics):
        """What overload costs: requests shed, and the share of time training kept (its floor)."""
        if m.engine is not None:
            yield CounterMetricFamily("muxtune_serve_shed_requests",
                                      "Requests refused with 429: beyond capacity.", value=m.engine.shed)
        if m.loop is not None:
            yield GaugeMetricFamily("muxtune_serve_train_share_ratio", "Training's share of the recent work time.",
                                    value=m.loop.train_share)
            yield GaugeMetricFamily("muxtune_serve_train_floor_ratio", "The share of time training keeps under any load.",
                                    value=m.loop.train_floor)
            yield CounterMetricFamily("muxtune_serve_floor_rounds", "Training rounds run past the SLO budget for the floor.",
                                      value=m.loop.floor_rounds)

    def collect(self):
        m = self.m
        with m._lock:
            requests, rejected, disconnects = dict(m._requests), dict(m._rejected), dict(m._disconnects)
            prompt, generated, slo, train = dict(m._prompt), dict(m._generated), dict(m._slo), dict(m._train)
            window = list(m._window)
        eng, ctl = m.engine, m.controller
        models = sorted({k[0] for k in requests} | set(prompt) | set(generated) | {k[0] for k in slo})
        if eng is not None:
            models = sorted(set(models) | {e.name for e in eng.registry.models()} | {eng.registry.base_id})
        fam = CounterMetricFamily("muxtune_serve_requests", "Requests that ended, by outcome.", labels=["model", "outcome"])
        for name in models:
            for outcome in OUTCOMES:
                fam.add_metric([name, outcome], requests.get((name, outcome), 0))
        yield fam
        yield self._disconnects(models, disconnects)
        fam = CounterMetricFamily("muxtune_serve_rejected_requests", "Requests refused before generation, by HTTP status.",
                                  labels=["status"])
        for status in ("400", "404", "429", "503"):
            fam.add_metric([status], rejected.get(status, 0))
        yield fam
        for metric, doc, data in (("muxtune_serve_prompt_tokens", "Prompt tokens of admitted requests.", prompt),
                                  ("muxtune_serve_generation_tokens", "Generated tokens.", generated)):
            fam = CounterMetricFamily(metric, doc, labels=["model"])
            for name in models:
                fam.add_metric([name], data.get(name, 0))
            yield fam
        fam = CounterMetricFamily("muxtune_serve_slo_requests",
                                  "Finished requests that met or missed the TTFT and TPOT SLOs.", labels=["model", "slo"])
        for name in models:
            for kind in ("met", "missed"):
                fam.add_metric([name, kind], slo.get((name, kind), 0))
        yield fam
        fam = CounterMetricFamily("muxtune_serve_train_tokens",
                                  "Training tokens run with requests in flight (serving) or none (idle).",
                                  labels=["model", "load"])
        from muxtune.engine.serve.adapters import served_name

        tasks = {served_name(rt.task) for rt in list(m.trainer.tasks.values())} if m.trainer is not None else set()
        for name in sorted(tasks | {k[0] for k in train}):
            for load in ("serving", "idle"):
                fam.add_metric([name, load], train.get((name, load), 0))
        yield fam
        seconds = sum(w[1] for w in window)
        yield GaugeMetricFamily("muxtune_serve_train_tokens_per_second",
                                "Training tokens/s over the last 10 s of iterations with requests in flight.",
                                value=sum(w[2] for w in window) / seconds if seconds else 0.0)
        if eng is not None:
            running, waiting = Counter(r.model.name for r in list(eng.running)), Counter(r.model.name for r in list(eng.waiting))
            for metric, doc, data in (("muxtune_serve_requests_waiting", "Requests queued for a KV cache row.", waiting),
                                      ("muxtune_serve_requests_running", "Requests generating.", running)):
                g = GaugeMetricFamily(metric, doc, labels=["model"])
                for name in models:
                    g.add_metric([name], data.get(name, 0))
                yield g
            yield GaugeMetricFamily("muxtune_serve_kv_cache_usage_ratio", "KV cache rows in use / rows.",
                                    value=eng.pool.used / eng.pool.rows)
            yield GaugeMetricFamily("muxtune_serve_adapter_versions",
                                    "Frozen adapter versions alive (held by requests, or the newest).",
                                    value=eng.registry.live_versions)
            g = GaugeMetricFamily("muxtune_serve_adapter_step", "Optimizer step of the newest version served for a task.",
                                  labels=["model"])
            for e in eng.registry.models():
                if e.current is not None and e.current.step is not None:
                    g.add_metric([e.name], e.current.step)
            yield g
        yield from self._overload(m)
        if ctl is not None:
            yield GaugeMetricFamily("muxtune_serve_train_token_budget",
                                    "Training tokens the SLO controller allowed in the latest iteration.",
                                    value=ctl.last_budget)
            yield GaugeMetricFamily("muxtune_serve_slo_margin_ratio", "The SLO controller's safety margin on deadlines.",
                                    value=ctl.margin)
