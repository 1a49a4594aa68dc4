"""`muxtune run --watch --pp 2`, the pod's command with a pipeline: rank 0 serves the whole group's
/v1/status and /metrics (per-stage busy and idle seconds), tasks join and leave by editing the
task file (every rank applies rank 0's reading), and SIGTERM stops the group with checkpoints."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers.data import task_doc

from tests.helpers.parallel_runs import MUXTUNE, env, make_workdir

pytestmark = pytest.mark.slow


def _get(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def _wait(pred, port, timeout=300):
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = json.loads(_get(port, "/v1/status"))
        if pred(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"timed out; last status {status}")


def test_watch_with_a_pipeline(tmp_path):
    root = make_workdir(tmp_path, [])
    stay = task_doc("stay", Path("data/reverse.jsonl"), steps=100000, batch=2)
    join = task_doc("join", Path("data/upper.jsonl"), steps=4, batch=2)
    spec = root / "tasks.yaml"
    spec.write_text(yaml.safe_dump(stay))
    log = root / "stderr.log"
    with open(log, "w") as err:  # a file, not a pipe: nothing blocks when no one reads
        proc = subprocess.Popen([*MUXTUNE, "tasks.yaml", "--output", "out", "--watch", "--pp", "2", "--metrics-port",
                                 "0", "--metrics-host", "127.0.0.1", "--no-progress"],
                                cwd=root, env=env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        port, deadline = None, time.time() + 300
        while port is None and time.time() < deadline and proc.poll() is None:
            m = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", log.read_text())
            port = int(m.group(1)) if m else time.sleep(0.3)
        assert port, "rank 0 did not announce its port: " + log.read_text()
        status = _wait(lambda s: s["tasks"].get("default/stay", {}).get("step", 0) >= 2, port)
        par = status["parallel"]
        assert (par["dp"], par["pp"], par["world"]) == (1, 2, 2)
        assert [s["stage"] for s in par["stages"]] == [0, 1]
        assert all(s["busySeconds"] > 0 and 0 <= s["bubbleFraction"] < 1 for s in par["stages"])
        metrics = _get(port, "/metrics")
        assert re.search(r'muxtune_engine_pipeline_bubble_ratio\{stage="1"\} 0\.\d+', metrics)
        assert 'muxtune_engine_parallel_degree{dim="pp"} 2.0' in metrics

        spec.write_text(yaml.safe_dump_all([stay, join]))  # hot add
        _wait(lambda s: s["tasks"].get("default/join", {}).get("phase") == "Succeeded", port)
        assert list((root / "out").rglob("join/adapter_model.safetensors"))
        spec.write_text(yaml.safe_dump(join))  # hot remove: "stay" leaves with a checkpoint
        _wait(lambda s: "default/stay" not in s["tasks"], port)
        assert list((root / "out").rglob("stay/checkpoints/step-*/state.json"))
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()
