"""Prometheus metrics and the /v1/status document of one engine process."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from muxtune.engine.telemetry import RoundRecord, StepRecord, Telemetry


class EngineMetrics(Telemetry):
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.trainers = []
        r = self.registry
        labels = ["namespace", "task"]
        self.tokens = Counter("muxtune_task_tokens_total", "Real (non-padding) tokens trained.", labels, registry=r)
        self.steps = Counter("muxtune_task_steps_total", "Optimizer steps completed.", labels, registry=r)
        self.loss = Gauge("muxtune_task_loss", "Training loss of the latest step.", labels, registry=r)
        self.step_seconds = Histogram(
            "muxtune_engine_step_duration_seconds", "Wall time of one fused forward/backward.", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.effective = Gauge(
            "muxtune_engine_effective_token_ratio", "Real tokens / computed tokens of the latest fused step.", registry=r
        )

    def attach(self, trainer) -> None:
        self.trainers.append(trainer)

    @staticmethod
    def _labels(task):
        return {"namespace": task.task.metadata.namespace or "default", "task": task.name}

    def step_done(self, task, record: StepRecord) -> None:
        lab = self._labels(task)
        self.tokens.labels(**lab).inc(record.tokens)
        self.steps.labels(**lab).inc()
        self.loss.labels(**lab).set(record.loss)

    def round_done(self, record: RoundRecord) -> None:
        self.step_seconds.observe(record.seconds)
        self.effective.set(record.effective_token_ratio)

    def status(self) -> dict:
        return {"tasks": {k: t.status() for tr in self.trainers for k, t in list(tr.tasks.items())}}

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
