"""training.reportTo: each task's experiment trackers, fed from the engine's telemetry.

Shaped like Hugging Face Trainer's report_to: `tensorboard` writes event files into the task's
output (tensorboard/), `mlflow` keeps one run per task. A tracker is an observer: any error it
raises is logged once as a warning and that tracker is switched off for the task, which trains
on regardless.
"""
from __future__ import annotations

import logging

from muxtune.engine.observe.telemetry import StepRecord, Telemetry

log = logging.getLogger("muxtune.engine")
DONE = ("Succeeded", "Failed", "Suspended")


def _factories() -> dict:
    from muxtune.engine.observe.mlflow_tracker import MlflowTracker
    from muxtune.engine.observe.tensorboard_tracker import TensorBoardTracker

    return {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


class Guarded:
    """One tracker of one task; its first failure is a warning and switches it off."""

    def __init__(self, name: str, task, factory):
        self.name, self.key, self.tracker = name, task.key, None
        self._call(lambda: setattr(self, "tracker", factory(task)), "start")

    def __call__(self, method: str, *args) -> None:
        if self.tracker is not None:
            self._call(lambda: getattr(self.tracker, method)(*args), method)

    def _call(self, fn, what: str) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the task
            log.warning("%s tracker off for this task (%s failed: %s); training goes on", self.name, what,
                        f"{type(exc).__name__}: {exc}"[:300], extra={"task": self.key})
            self.tracker = None


class Trackers(Telemetry):
    """Starts a task's trackers when it first runs, feeds them every step, ends them when it ends."""

    def __init__(self, factories: dict | None = None):
        self.factories = factories
        self.live: dict[str, list[Guarded]] = {}

    def _of(self, task, start: bool) -> list[Guarded]:
        if task.key not in self.live and start and task.task.spec.training.report_to:
            factories = self.factories or _factories()
            self.live[task.key] = [Guarded(n, task, factories[n]) for n in task.task.spec.training.report_to]
        return self.live.get(task.key, [])

    def task_phase(self, task) -> None:
        for t in self._of(task, start=task.phase == "Running"):
            t("phase", task)
        if task.phase in DONE:
            for t in self.live.pop(task.key, []):
                t("close")

    def step_done(self, task, record: StepRecord) -> None:
        for t in self._of(task, start=True):
            t("step", task, record)

    def flush(self, task) -> None:
        for t in self.live.get(task.key, []):
            t("flush")

    def close(self) -> None:
        for key in list(self.live):
            for t in self.live.pop(key):
                t("close")
