"""`muxtune run --watch` (the pod's command): tasks come and go by editing the task file,
neighbours keep training, and /v1/status reports each task for the operator."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml


def _doc(name, data, steps, lr=1e-3):
    return {
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask",
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": {"baseModel": "builtin:tiny-llama", "dataset": {"path": data.name}, "peft": {"r": 4},
                 "training": {"maxSteps": steps, "batchSize": 2, "learningRate": lr, "checkpointInterval": 0}},
    }


def _status(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as r:
        return json.load(r)["tasks"]


def _wait(pred, port, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        tasks = _status(port)
        if pred(tasks):
            return tasks
        time.sleep(0.3)
    raise AssertionError(f"timed out; last status {tasks}")


@pytest.mark.slow  # a `muxtune run --watch` subprocess edited while it trains
def test_watch_hot_add_and_remove(data_dir, tmp_path):
    spec = tmp_path / "tasks.yaml"
    spec.write_text(yaml.safe_dump(_doc("stay", data_dir / "reverse.jsonl", 100000)))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "muxtune.cli", "run", str(spec), "--output", str(out), "--data-root", str(data_dir), "--watch",
         "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = None
        for line in proc.stderr:
            m = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "engine did not announce its port"
        _wait(lambda t: t.get("team-a/stay", {}).get("step", 0) >= 2, port)

        # hot add: a second task joins the running engine and finishes
        spec.write_text(yaml.safe_dump_all([_doc("stay", data_dir / "reverse.jsonl", 100000),
                                            _doc("join", data_dir / "upper.jsonl", 5)]))
        tasks = _wait(lambda t: t.get("team-a/join", {}).get("phase") == "Succeeded", port)
        assert tasks["team-a/join"]["step"] == 5 and tasks["team-a/join"]["loss"] is not None
        assert (out / "team-a" / "join" / "adapter_model.safetensors").exists()
        step_before = tasks["team-a/stay"]["step"]

        # hot remove: "stay" leaves with a checkpoint; the engine keeps serving
        spec.write_text(yaml.safe_dump(_doc("join", data_dir / "upper.jsonl", 5)))
        _wait(lambda t: "team-a/stay" not in t, port)
        ckpts = list((out / "team-a" / "stay" / "checkpoints").glob("step-*"))
        assert ckpts and json.loads((ckpts[-1] / "state.json").read_text())["step"] >= step_before
        assert proc.poll() is None, "the engine must keep running for future tasks"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
