"""Checkpoints make runs resumable: an interrupted run, rerun with the same output, ends
exactly where an uninterrupted one does, with each step trained and logged once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file


class Crash(Exception):
    pass


def _crash_at(step):
    def hook(trainer, rt):
        if rt.step == step:
            raise Crash(f"simulated crash after step {step}")
    return hook


def _adapter(out):
    return load_file(out / "adapter_model.safetensors")


def test_resume_after_crash_matches_uninterrupted(make_task, data_dir, tmp_path, trainer_factory):
    task = make_task("res", data_dir / "reverse.jsonl", steps=9, checkpointInterval=3, schedule="linear", lr=2e-2)
    straight = trainer_factory(tmp_path / "straight")
    straight.add_task(task)
    straight.run()

    first = trainer_factory(tmp_path / "interrupted")
    first.step_hooks.append(_crash_at(5))  # dies after step 5; the last checkpoint is step 3
    first.add_task(task)
    with pytest.raises(Crash):
        first.run()
    second = trainer_factory(tmp_path / "interrupted")
    rt = second.add_task(task)
    assert rt.step == 3 and rt.checkpoint.endswith("step-00000003")
    second.run()
    assert rt.phase == "Succeeded"

    a, b = _adapter(straight.tasks[task.key].out_dir), _adapter(rt.out_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    steps = [json.loads(ln)["step"] for ln in (rt.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))
    straight_losses = [json.loads(ln)["loss"] for ln in (straight.tasks[task.key].out_dir / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(ln)["loss"] for ln in (rt.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-6)


def test_finished_task_is_not_retrained_and_changed_spec_is_refused(make_task, data_dir, tmp_path, trainer_factory):
    task = make_task("done", data_dir / "reverse.jsonl", steps=3, checkpointInterval=2)
    t1 = trainer_factory(tmp_path / "out")
    t1.add_task(task)
    t1.run()
    weights = t1.tasks[task.key].out_dir / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime_ns

    t2 = trainer_factory(tmp_path / "out")
    rt = t2.add_task(task)
    assert rt.phase == "Succeeded" and "already trained" in rt.message
    assert not t2.run_round() and weights.stat().st_mtime_ns == mtime

    changed = make_task("done", data_dir / "reverse.jsonl", steps=3, checkpointInterval=2, r=8)
    (t1.tasks[task.key].out_dir / "status.json").unlink()  # pretend it had not finished
    t3 = trainer_factory(tmp_path / "out")
    rt = t3.add_task(changed)
    assert rt.phase == "Failed" and "different spec" in rt.message


@pytest.mark.slow  # 400 steps in a subprocess, twice
def test_sigterm_checkpoints_and_rerun_completes(data_dir, tmp_path):
    doc = {
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": "long"},
        "spec": {"baseModel": "builtin:tiny-llama", "dataset": {"path": "reverse.jsonl"},
                 "peft": {"r": 4}, "training": {"maxSteps": 400, "batchSize": 4, "learningRate": 1e-3,
                                                "checkpointInterval": 1000}},
    }
    spec = tmp_path / "long.yaml"
    spec.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "muxtune.cli", "run", str(spec), "--output", str(out), "--data-root", str(data_dir), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    metrics = out / "default" / "long" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    ckpts = sorted((out / "default" / "long" / "checkpoints").glob("step-*"))
    assert ckpts, "SIGTERM must leave a checkpoint even between intervals"
    stopped_at = json.loads((ckpts[-1] / "state.json").read_text())["step"]
    assert 5 <= stopped_at < 400

    doc["spec"]["training"]["maxSteps"] = 400
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    assert steps == list(range(1, 401))
