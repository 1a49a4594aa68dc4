"""reportTo mlflow: one MLflow run per task, fed from a background thread.

The tracking server comes from MLFLOW_TRACKING_URI (in a cluster, the chart's engine value) and the
experiment from MLFLOW_EXPERIMENT_NAME (default `muxtune`), as Hugging Face Trainer reads them.
The run holds the task's parameters, per-step loss, learning rate, tokens/s and grad norm, the
eval loss, and at the end the adapter directory as artifacts (adapter/). Calls run on a worker
thread, so a slow or absent server never holds a training round; the first failure is a warning
and the rest of the task's records are dropped.

The run's id is kept in the task's output directory (RUN_FILE), beside its checkpoints: a task
resumed from its checkpoint (a restart, a move to another group) continues the same run, as
HF Trainer does with MLFLOW_RUN_ID. Steps replayed after the checkpoint are logged again (MLflow
keeps every value; the newest of a step is the one training kept).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading

from muxtune.engine.observe.telemetry import StepRecord

log = logging.getLogger("muxtune.engine")
# fail fast against a tracker that is down (mlflow's defaults retry for minutes); the user's own settings win
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                   "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
CLOSE_WAIT_S = 60.0
RUN_FILE = "mlflow_run.json"
ARTIFACTS = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "chat_template.jinja")


def params(task) -> dict[str, str]:
    """The spec's settings, flattened (peft.r, training.learningRate, ...), as MLflow params."""
    spec = task.spec
    flat = {"baseModel": spec.base_model, "dataset.format": spec.dataset.format,
            "dataset.maxSeqLen": spec.dataset.max_seq_len}
    for section in ("peft", "training"):
        for k, v in getattr(spec, section).to_wire().items():
            flat[f"{section}.{k}"] = v
    return {k: str(v)[:500] for k, v in flat.items()}


def _server() -> str:
    """The tracking server, hashed (its URI may carry credentials; the run file must not)."""
    from mlflow import get_tracking_uri

    return hashlib.sha256(get_tracking_uri().encode()).hexdigest()[:16]


class MlflowTracker:
    def __init__(self, task):
        for k, v in CLIENT_DEFAULTS.items():
            os.environ.setdefault(k, v)
        from mlflow.tracking import MlflowClient

        self.key, self.out_dir = task.key, task.out_dir
        self.client = MlflowClient()
        self.run_id: str | None = None
        self.failed = False
        self.jobs: queue.Queue = queue.Queue(maxsize=10000)
        self.thread = threading.Thread(target=self._work, name=f"mlflow-{task.key}", daemon=True)
        self.thread.start()
        self._submit(self._start, task.task)

    def _submit(self, fn, *args) -> None:
        if not self.failed:
            try:
                self.jobs.put_nowait((fn, args))
            except queue.Full:  # the server cannot keep up: drop records rather than hold training
                pass

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            fn, args = job
            if self.failed:
                continue
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker never fails the task
                self.failed = True
                log.warning("mlflow tracker off for this task (%s); training goes on",
                            f"{type(exc).__name__}: {exc}"[:300], extra={"task": self.key})

    def _start(self, task) -> None:
        c = self.client
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "muxtune")
        exp = c.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else c.create_experiment(name)
        uid = task.metadata.uid or ""
        self.run_id = self._resumable(exp_id, uid)
        if self.run_id is not None:
            c.update_run(self.run_id, status="RUNNING")
            log.info("mlflow: continuing run %s", self.run_id, extra={"task": self.key})
            return
        run = c.create_run(exp_id, run_name=task.key.replace("/", "."), tags={"muxtune.task": task.key, "muxtune.uid": uid})
        self.run_id = run.info.run_id
        self._remember(exp_id, uid)
        from mlflow.entities import Param

        c.log_batch(self.run_id, params=[Param(k, v) for k, v in params(task).items()])

    def _resumable(self, exp_id: str, uid: str) -> str | None:
        """The run this task's directory names, if it is this task's (same uid, experiment and
        server) and still exists."""
        try:
            saved = json.loads((self.out_dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        if (saved.get("uid"), saved.get("experimentId"), saved.get("server")) != (uid, exp_id, _server()):
            return None
        try:
            run = self.client.get_run(saved["runId"])
        except Exception:  # noqa: BLE001 - deleted or never there: a new run
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    def _remember(self, exp_id: str, uid: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps({"runId": self.run_id, "experimentId": exp_id, "uid": uid,
                                   "server": _server()}))
        os.replace(tmp, self.out_dir / RUN_FILE)

    def _metrics(self, record: StepRecord) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        values = {"loss": record.loss, "learning_rate": record.lr, "tokens_per_second": record.tokens_per_second,
                  "grad_norm": record.grad_norm}
        if record.eval_loss is not None:
            values["eval_loss"] = record.eval_loss
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, record.step) for k, v in values.items()])

    def _end(self, phase: str) -> None:
        if phase == "Succeeded":
            for name in ARTIFACTS:
                if (self.out_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.out_dir / name), "adapter")
        self.client.set_terminated(self.run_id, {"Succeeded": "FINISHED", "Failed": "FAILED"}.get(phase, "KILLED"))

    def phase(self, task) -> None:
        if task.phase in ("Succeeded", "Failed", "Suspended"):
            self._submit(self._end, task.phase)

    def step(self, task, record: StepRecord) -> None:
        self._submit(self._metrics, record)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(CLOSE_WAIT_S)
        if self.thread.is_alive():
            log.warning("mlflow tracker: records still unsent after %.0fs; leaving them", CLOSE_WAIT_S,
                        extra={"task": self.key})
