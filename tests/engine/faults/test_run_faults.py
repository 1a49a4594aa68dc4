"""`muxtune run` end to end under faults: a broken backbone fails only its own tasks, CLI problems
exit 2 with one line and write nothing, a second run on the same output is refused naming the
first, and task directories never collide or leave --output. Datasets are relative paths under
the run's working directory (the default data root)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml


def _doc(name, *, ns="default", base="builtin:tiny-llama", data="data/reverse.jsonl", steps=2, output=None):
    doc = {"apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": name, "namespace": ns},
           "spec": {"baseModel": base, "dataset": {"path": data, "maxSeqLen": 48}, "peft": {"r": 4},
                    "training": {"maxSteps": steps, "batchSize": 2, "learningRate": 1e-3, "checkpointInterval": 0}}}
    if output:
        doc["spec"]["output"] = {"path": output}
    return doc


@pytest.fixture
def workdir(data_dir) -> Path:
    """The run's working directory: datasets under data/, the default data root."""
    return data_dir.parent


def _cmd(workdir: Path, docs, *extra) -> list[str]:
    (workdir / "tasks.yaml").write_text(yaml.safe_dump_all(docs))
    return [sys.executable, "-m", "muxtune.cli", "run", "tasks.yaml", "--output", "out", "--no-progress",
            "--device", "cpu", *extra]


def _run(workdir: Path, docs, *extra, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(_cmd(workdir, docs, *extra), cwd=workdir, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _status(workdir: Path, ns: str, name: str) -> dict:
    return json.loads((workdir / "out" / ns / name / "status.json").read_text())


@pytest.mark.slow
def test_broken_backbones_fail_their_own_tasks_and_the_run_goes_on(workdir, tiny_backbone_dir):
    models = workdir / "models"
    (models / "no-weights").mkdir(parents=True)
    shutil.copy(tiny_backbone_dir / "config.json", models / "no-weights")
    shutil.copytree(tiny_backbone_dir, models / "corrupt")
    blob = (models / "corrupt" / "model.safetensors").read_bytes()
    (models / "corrupt" / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # a torn copy
    docs = [_doc("nw", base="./models/no-weights"), _doc("torn", base="./models/corrupt"), _doc("good")]
    p = _run(workdir, docs)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines() if line.startswith("default/")}
    assert set(rows) == {"default/nw", "default/torn", "default/good"}, p.stdout
    assert rows["default/good"].split()[1] == "Succeeded"
    assert (workdir / "out" / "default" / "good" / "adapter_model.safetensors").exists()
    nw, torn = _status(workdir, "default", "nw"), _status(workdir, "default", "torn")
    assert nw["phase"] == "Failed" and "no weights" in nw["message"] and "no-weights" in nw["message"]
    assert torn["phase"] == "Failed" and "model.safetensors: not a readable safetensors file" in torn["message"]
    assert "Failed" in rows["default/nw"] and "Failed" in rows["default/torn"]


@pytest.mark.slow
def test_cli_problems_exit_2_with_one_line_and_write_nothing(workdir):
    holder = socket.create_server(("127.0.0.1", 0))
    try:
        port = holder.getsockname()[1]
        p = _run(workdir, [_doc("a")], "--metrics-port", str(port), timeout=300)
    finally:
        holder.close()
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"error: --metrics-port {port}: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert not (workdir / "out").exists(), "nothing may be written"

    (workdir / "out").write_text("a file, not a directory\n")
    for output in ("out", "out/sub"):
        cmd = _cmd(workdir, [_doc("a")])
        cmd[cmd.index("--output") + 1] = output
        p = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2
        [line] = p.stderr.strip().splitlines()
        assert line.startswith(f"error: --output {output}: ") and "not a directory" in line, line
        assert (workdir / "out").read_text() == "a file, not a directory\n"


@pytest.mark.slow
def test_second_run_on_one_output_is_refused_naming_the_holder(workdir):
    from muxtune.engine.durable.runlock import RunLock

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_cmd(workdir, [_doc("long", steps=100000)]), cwd=workdir, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        info = workdir / "out" / ".muxtune.lock.json"
        for _ in range(600):  # bounded wait for the first run to hold the lock
            if info.exists() or first.poll() is not None:
                break
            time.sleep(0.2)
        assert info.exists(), "the first run never took the lock"
        (workdir / "tasks2.yaml").write_text(yaml.safe_dump(_doc("other")))
        second = subprocess.run([sys.executable, "-m", "muxtune.cli", "run", "tasks2.yaml", "--output", "out",
                                 "--no-progress"], cwd=workdir, capture_output=True, text=True, timeout=300, env=env)
        assert second.returncode == 2
        [line] = second.stderr.strip().splitlines()
        assert f"pid {first.pid} on {socket.gethostname()} since " in line and "run tasks.yaml --output out" in line, line
        assert not (workdir / "out" / "default" / "other").exists()
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the kernel drops its flock
        first.wait(timeout=60)
    with RunLock(workdir / "out"):  # no stale lock after the holder died
        pass


@pytest.mark.slow
def test_output_directories_are_refused_before_training_when_they_collide_or_escape(workdir):
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    (workdir / "out" / "default").mkdir(parents=True)
    (workdir / "out" / "default" / "escape").symlink_to(elsewhere)
    docs = [_doc("p1", output="same"), _doc("p2", output="same"),
            _doc("outer", output="shared"), _doc("inner", output="shared/inner"),
            _doc("esc", output="escape"), _doc("fine")]
    p = _run(workdir, docs, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    [line] = p.stderr.strip().splitlines()
    assert "tasks default/p1 and default/p2 both write to default/same" in line, line
    assert "task default/inner would write inside task default/outer's directory default/shared" in line, line
    assert "task default/esc: output directory 'default/escape' leads outside the run output" in line, line
    assert str(workdir) not in line
    assert sorted(os.listdir(workdir / "out" / "default")) == ["escape"] and not os.listdir(elsewhere)


@pytest.mark.slow
def test_same_name_in_two_namespaces_trains_into_two_directories(workdir):
    p = _run(workdir, [_doc("dup", ns="team-a"), _doc("dup", ns="team-b")])
    assert p.returncode == 0, p.stdout + p.stderr
    for ns in ("team-a", "team-b"):
        assert _status(workdir, ns, "dup")["task"] == f"{ns}/dup"
        lines = (workdir / "out" / ns / "dup" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2]  # not interleaved with the other's


def test_a_task_joining_later_cannot_take_a_resident_task_directory(make_task, data_dir, tmp_path, trainer_factory):
    """--watch adds tasks to a running engine: a collision fails the newcomer alone, and it writes
    nothing, not even its status, into the resident task's directory."""
    trainer = trainer_factory(tmp_path / "out")
    a = make_task("a", data_dir / "reverse.jsonl", steps=2)
    a.spec.output.path = "shared"
    b = make_task("b", data_dir / "upper.jsonl", steps=2)
    b.spec.output.path = "shared"
    ra, rb = trainer.add_task(a), trainer.add_task(b)
    assert ra.phase == "Running" and rb.phase == "Failed" and rb.out_dir is None
    assert "tasks default/a and default/b both write to default/shared" in rb.message
    trainer.run()
    assert json.loads((ra.out_dir / "status.json").read_text())["task"] == "default/a"


def test_status_endpoint_reports_paths_relative_to_the_output(make_task, data_dir, tmp_path, trainer_factory):
    from muxtune.engine.observe.engine_metrics import EngineMetrics

    trainer = trainer_factory(tmp_path / "out")
    metrics = EngineMetrics()
    metrics.attach(trainer)
    trainer.telemetry = metrics
    trainer.add_task(make_task("rel", data_dir / "reverse.jsonl", steps=2, checkpointInterval=1))
    trainer.run()
    status = metrics.status()["tasks"]["default/rel"]
    assert status["checkpoint"] == "default/rel/checkpoints/step-00000002", status
    assert str(tmp_path) not in json.dumps(metrics.status())


def test_output_paths_cannot_escape_even_past_the_api(make_task, data_dir, tmp_path):
    """The API refuses absolute and '..' output paths; the engine refuses them again (defence in depth)."""
    from muxtune.api.finetunetask import OutputSpec
    from muxtune.engine.durable import outputs
    task = make_task("t", data_dir / "reverse.jsonl")
    for escape in ("../../elsewhere", "/tmp/elsewhere", "x/../../../elsewhere"):
        task.spec.__dict__["output"] = OutputSpec.model_construct(path=escape)  # past validation, on purpose
        with pytest.raises(outputs.OutputLayoutError, match="leads outside the run output"):
            outputs.task_dir(tmp_path / "out", task)
    task.spec.__dict__["output"] = OutputSpec(path="fine/deeper")
    assert outputs.task_dir(tmp_path / "out", task) == (tmp_path / "out" / "default" / "fine" / "deeper").resolve()
