"""training.reportTo: TensorBoard event files read back with TensorBoard's own reader, an MLflow run
on a real tracking server (loopback, SQLite), and a tracker that is down costing only a warning."""
from __future__ import annotations

import json
import logging

import pytest

from muxtune.engine.observe.trackers import Trackers
from tests.helpers.cluster import free_port


def _train(make_task, data_dir, out, trainer_factory, report_to, **training):
    t = make_task("tracked", data_dir / "reverse.jsonl", steps=4, reportTo=report_to, **training)
    if "evalInterval" in training:
        dataset = t.spec.dataset.model_copy(update={"validation_split": 0.25})
        t = t.model_copy(update={"spec": t.spec.model_copy(update={"dataset": dataset})})
    trainer = trainer_factory(out)
    trainer.telemetry = Trackers()
    trainer.add_task(t)
    trainer.run()
    trainer.telemetry.close()
    rt = trainer.tasks[t.key]
    assert rt.phase == "Succeeded", rt.message
    return rt, [json.loads(x) for x in (rt.out_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_every_step(make_task, data_dir, tmp_path, trainer_factory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rt, metrics = _train(make_task, data_dir, tmp_path / "out", trainer_factory, ["tensorboard"])
    acc = EventAccumulator(str(rt.out_dir / "tensorboard"))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [m["step"] for m in metrics]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.value for e in acc.Scalars("train/learning_rate")] == pytest.approx([m["lr"] for m in metrics])
    assert len(acc.Scalars("train/tokens_per_second")) == len(metrics)


@pytest.mark.slow
def test_mlflow_run_per_task_with_params_metrics_and_adapter(mlflow_server, make_task, data_dir, tmp_path,
                                                            trainer_factory, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sources-test")
    rt, metrics = _train(make_task, data_dir, tmp_path / "out", trainer_factory, ["mlflow"], evalInterval=2)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("sources-test")
    (run,) = client.search_runs([exp.experiment_id], "tags.`muxtune.task` = 'default/tracked'")
    assert run.info.status == "FINISHED"
    assert run.data.params["peft.r"] == "4" and run.data.params["baseModel"] == "builtin:tiny-llama"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(h.step, h.value) for h in history] == [(m["step"], pytest.approx(m["loss"])) for m in metrics]
    for name in ("learning_rate", "tokens_per_second"):
        assert len(client.get_metric_history(run.info.run_id, name)) == len(metrics)
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [h.step for h in evals] == [m["step"] for m in metrics if "eval_loss" in m] and evals
    files = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files


def test_a_tracker_that_is_down_costs_a_warning_not_the_task(make_task, data_dir, tmp_path, trainer_factory,
                                                            monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="muxtune.engine"):
        rt, metrics = _train(make_task, data_dir, tmp_path / "out", trainer_factory, ["mlflow", "tensorboard"])
    assert len(metrics) == 4 and (rt.out_dir / "adapter_model.safetensors").exists()
    assert "mlflow tracker off for this task" in caplog.text
    assert list((rt.out_dir / "tensorboard").iterdir())  # the other tracker carried on


@pytest.mark.slow
def test_a_task_resumed_from_its_checkpoint_continues_its_mlflow_run(mlflow_server, make_task, data_dir, tmp_path,
                                                                     trainer_factory, monkeypatch):
    from mlflow.tracking import MlflowClient

    from muxtune.engine.observe.mlflow_tracker import RUN_FILE

    class Crash(BaseException):
        """A process death after step 3 (the newest checkpoint is step 2)."""

    def crash(trainer, rt):
        if rt.step == 3:
            raise Crash()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "resume-test")
    task = make_task("resumed", data_dir / "reverse.jsonl", steps=5, checkpointInterval=2, reportTo=["mlflow"])
    first = trainer_factory(tmp_path / "out")
    first.telemetry = Trackers()
    first.step_hooks.append(crash)
    first.add_task(task)
    with pytest.raises(Crash):
        first.run()
    first.telemetry.close()  # what reached the server before the crash stays there
    second = trainer_factory(tmp_path / "out")
    second.telemetry = Trackers()
    rt = second.add_task(task)
    assert rt.step == 2
    second.run()
    second.telemetry.close()
    assert rt.phase == "Succeeded", rt.message

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("resume-test")
    (run,) = client.search_runs([exp.experiment_id], "tags.`muxtune.task` = 'default/resumed'")
    assert run.info.status == "FINISHED"
    assert json.loads((rt.out_dir / RUN_FILE).read_text())["runId"] == run.info.run_id
    metrics = [json.loads(x) for x in (rt.out_dir / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({h.step for h in history}) == list(range(1, 6))
    assert len(history) == 5 + 1  # step 3 was logged before the crash and again after it
    newest = {h.step: h.value for h in sorted(history, key=lambda h: h.timestamp)}
    assert [newest[m["step"]] for m in metrics] == pytest.approx([m["loss"] for m in metrics])
    # the same task name with another uid (deleted and created again) starts a run of its own
    from types import SimpleNamespace

    from muxtune.engine.observe.mlflow_tracker import MlflowTracker

    again = task.model_copy(update={"metadata": task.metadata.model_copy(update={"uid": "another-uid"})})
    tracker = MlflowTracker(SimpleNamespace(key=task.key, out_dir=rt.out_dir, task=again))
    tracker.close()
    assert tracker.run_id not in (None, run.info.run_id) and not tracker.failed
    assert json.loads((rt.out_dir / RUN_FILE).read_text())["runId"] == tracker.run_id
