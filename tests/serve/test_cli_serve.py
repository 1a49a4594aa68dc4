"""The two commands end to end, as a user runs them: `muxtune serve DIRS --port` over finished
adapters (the issue's curl lines, as HTTP requests), and `muxtune run --serve-port` answering
while its tasks train and still after they finish; bad input is refused before anything starts."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.helpers.data import quickstart_tasks

pytestmark = pytest.mark.slow
PORT = re.compile(r"serving the OpenAI API on http://127\.0\.0\.1:(\d+)")


def http(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start(argv, cwd, log):
    proc = subprocess.Popen([sys.executable, "-m", "muxtune.cli", *argv], cwd=cwd, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = PORT.search(log.read_text())
        if m:
            return proc, f"http://127.0.0.1:{m.group(1)}"
        assert proc.poll() is None, log.read_text()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not announce its port:\n" + log.read_text())


def stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


def test_serve_finished_adapters_answers_the_issue_requests(tmp_path):
    tasks = quickstart_tasks(tmp_path, steps=2)
    done = subprocess.run([sys.executable, "-m", "muxtune.cli", "run", str(tasks), "--output", "runs", "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    dirs = sorted(str(p) for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))  # a shell's `runs/*`
    assert dirs == [str(tmp_path / "runs" / "default")]
    proc, url = start(["serve", *dirs, "--port", "0"], tmp_path, tmp_path / "serve.log")
    try:
        status, body = http(f"{url}/v1/models")
        ids = [m["id"] for m in json.loads(body)["data"]]
        assert status == 200 and ids == ["builtin:tiny-llama", "arithmetic", "copy", "reverse"]
        status, body = http(f"{url}/v1/completions",
                            {"model": "reverse", "prompt": "reverse: abc\n", "max_tokens": 8, "temperature": 0})
        out = json.loads(body)
        assert status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")
        assert 1 <= out["usage"]["completion_tokens"] <= 8
        status, body = http(f"{url}/v1/chat/completions",
                            {"model": "reverse", "messages": [{"role": "user", "content": "reverse: abc\n"}],
                             "stream": True, "max_tokens": 8})
        events = [ln[6:] for ln in body.splitlines() if ln.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        status, body = http(f"{url}/v1/completions", {"model": "nope", "prompt": "x"})
        assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"
        status, metrics = http(f"{url}/metrics")
        assert 'muxtune_serve_requests_total{model="reverse",outcome=' in metrics
        assert 'muxtune_engine_memory_peak_bytes{gpu="",kind="host"}' in metrics
    finally:
        assert stop(proc) == 0


def test_run_serves_while_training_and_after(tmp_path):
    tasks = quickstart_tasks(tmp_path, steps=12)
    proc, url = start(["run", str(tasks), "--output", "runs", "--no-progress", "--serve-port", "0",
                       "--metrics-port", "0", "--metrics-host", "127.0.0.1"], tmp_path, tmp_path / "run.log")
    try:
        steps, fingerprints = set(), set()
        while "training finished" not in (tmp_path / "run.log").read_text():
            status, body = http(f"{url}/v1/completions",
                                {"model": "copy", "prompt": "copy: ab\n", "max_tokens": 4, "temperature": 0})
            assert status == 200, body
            fingerprints.add(json.loads(body)["system_fingerprint"])
            models = {m["id"]: m for m in json.loads(http(f"{url}/v1/models")[1])["data"]}
            steps.add(models["copy"]["muxtune"]["step"])
            assert proc.poll() is None
        assert len(fingerprints) >= 2, "answers came from several training steps"  # e.g. copy@step-3, copy@step-7
        models = {m["id"]: m for m in json.loads(http(f"{url}/v1/models")[1])["data"]}
        assert models["copy"]["muxtune"] == {"task": "default/copy", "phase": "Succeeded", "step": 12}
        status, body = http(f"{url}/v1/completions",
                            {"model": "copy", "prompt": "copy: ab\n", "max_tokens": 4, "temperature": 0})
        assert status == 200 and json.loads(body)["system_fingerprint"] == "copy@step-12"
    finally:
        assert stop(proc) == 0  # stopped after training finished: success
    log = (tmp_path / "run.log").read_text()
    assert "default/copy" in log and "Succeeded" in log


def test_bad_input_is_refused_before_serving(tmp_path):
    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    r = subprocess.run([sys.executable, "-m", "muxtune.cli", "serve", str(bad), "--port", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "not an adapter directory" in r.stderr
    docs = [{"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": n},
             "spec": {"baseModel": base, "dataset": {"path": "reverse.jsonl"},
                      "training": {"maxSteps": 1, "learningRate": 1e-3}}}
            for n, base in (("a", "builtin:tiny-llama"), ("b", "builtin:small-llama"))]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump_all(docs))
    r = subprocess.run([sys.executable, "-m", "muxtune.cli", "run", str(tmp_path / "two.yaml"), "--serve-port", "0"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "--serve-port serves one backbone" in r.stderr


def test_adapter_dirs_finds_adapters_in_a_run_output_or_a_namespace_folder(tmp_path):
    from muxtune.engine.serve.serve_cli import adapter_dirs

    for d in ("runs/default/a", "runs/default/b", "runs/team/c", "runs/.replaced-a-1/x"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "adapter_config.json").write_text("{}")
    (tmp_path / "runs/.muxtune.lock").write_text("")
    runs = tmp_path / "runs"
    names = lambda ds: [str(d.relative_to(runs)) for d in ds]  # noqa: E731
    assert names(adapter_dirs([runs])) == ["default/a", "default/b", "team/c"]
    assert names(adapter_dirs([runs / "default"])) == ["default/a", "default/b"]
    assert names(adapter_dirs([runs / "team/c", runs / "nope"])) == ["team/c", "nope"]
