"""One fault, one task: a write that the disk refuses (full, read-only) is retried with backoff,
then fails the task whose file it is, with the file named; temp files are cleaned up; the
neighbour trains on and the run ends with its summary.

A full disk cannot be made in CI without root tricks (a loop device or a tmpfs mount), so the
fault is injected at the engine's one file-write boundary, `storage._write`, raising what
`torch.save` raises on a full disk (RuntimeError). Everything above that boundary is real.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from muxtune.engine.durable import storage
DISK_FULL = "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)


def _inject(monkeypatch, under: Path, exc_factory, times: int | None = None) -> list[Path]:
    """Fail writes of files below `under` (all of them, or the first `times`). Returns the attempts."""
    real, attempts = storage._write, []

    def write(path, data, **kw):
        path = Path(path)
        final = path.with_name(path.name.removeprefix(storage.TMP_PREFIX))  # a file's temp twin
        if under in (path, final) or under in path.parents:
            attempts.append(path)
            if times is None or len(attempts) <= times:
                raise exc_factory()
        return real(path, data, **kw)

    monkeypatch.setattr(storage, "_write", write)
    return attempts


def _leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]


@pytest.mark.parametrize("target", ["checkpoints", "metrics.jsonl", "adapter_model.safetensors", "status.json"])
def test_full_disk_fails_that_task_alone(target, make_task, data_dir, tmp_path, trainer_factory, monkeypatch):
    victim = make_task("victim", data_dir / "reverse.jsonl", steps=4, checkpointInterval=2)
    good = make_task("good", data_dir / "upper.jsonl", steps=4, checkpointInterval=2)
    trainer = trainer_factory(tmp_path / "out")
    rv, rg = trainer.add_task(victim), trainer.add_task(good)
    attempts = _inject(monkeypatch, rv.out_dir / target, lambda: RuntimeError(DISK_FULL))
    trainer.run()  # returns: the fault does not take the run down

    assert rv.phase == "Failed", rv.message
    assert str(rv.out_dir / target) in rv.message and "file write failed" in rv.message
    assert len(attempts) >= storage.RETRIES, "the write is retried before the task fails"
    assert rg.phase == "Succeeded" and (rg.out_dir / "adapter_model.safetensors").exists()
    assert not _leftovers(rv.out_dir), _leftovers(rv.out_dir)


def test_transient_write_failure_is_retried_and_training_goes_on(make_task, data_dir, tmp_path, trainer_factory, monkeypatch):
    task = make_task("flaky", data_dir / "reverse.jsonl", steps=4, checkpointInterval=2)
    trainer = trainer_factory(tmp_path / "out")
    rt = trainer.add_task(task)
    attempts = _inject(monkeypatch, rt.out_dir / "checkpoints", lambda: OSError(errno.EIO, "I/O error"), times=1)
    trainer.run()
    assert rt.phase == "Succeeded", rt.message
    assert attempts and sorted(p.name for p in (rt.out_dir / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]


def test_output_directory_turning_read_only_fails_that_task_alone(make_task, data_dir, tmp_path, trainer_factory, monkeypatch):
    victim = make_task("victim", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2)
    good = make_task("good", data_dir / "upper.jsonl", steps=6, checkpointInterval=2)
    trainer = trainer_factory(tmp_path / "out")
    rv, rg = trainer.add_task(victim), trainer.add_task(good)

    def turn_read_only(trainer, rt):
        if rt is rv and rt.step == 2:
            rv.out_dir.chmod(0o555)
            probe = rv.out_dir / "probe"
            try:  # root (as in many CI containers) ignores permission bits: then refuse at the boundary,
                probe.write_text("x")  # as a read-only mount would (EROFS), for this directory only
            except PermissionError:
                return
            probe.unlink()
            _inject(monkeypatch, rv.out_dir, lambda: OSError(errno.EROFS, "Read-only file system"))

    trainer.step_hooks.append(turn_read_only)
    try:
        trainer.run()
    finally:
        rv.out_dir.chmod(0o755)
    assert rv.phase == "Failed" and rv.step == 2, rv.message
    assert str(rv.out_dir) in rv.message
    assert rg.phase == "Succeeded"


def test_cli_full_disk_run_ends_with_summary(data_dir, tmp_path):
    """The real command, its write boundary failing for one task's checkpoints: exit 1, a summary."""
    from tests.helpers.data import data_root_dir
    from tests.helpers.data import task_doc

    spec = tmp_path / "tasks.yaml"
    spec.write_text(yaml.safe_dump_all([
        task_doc("victim", data_dir / "reverse.jsonl", steps=3, checkpointInterval=1),
        task_doc("good", data_dir / "upper.jsonl", steps=3, checkpointInterval=1),
    ]))
    out = tmp_path / "out"
    script = (
        "import sys\n"
        "from muxtune.engine.durable import storage\n"
        "real = storage._write\n"
        "def write(path, data, **kw):\n"
        "    if '/victim/checkpoints/' in str(path):\n"
        f"        raise RuntimeError({DISK_FULL!r})\n"
        "    return real(path, data, **kw)\n"
        "storage._write = write\n"
        "storage.BACKOFF_S = 0.001\n"
        "from muxtune.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, "run", str(spec), "--output", str(out), "--no-progress",
                           "--data-root", str(data_root_dir())],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("victim" in ln and "Failed" in ln and "file write failed" in ln for ln in lines), proc.stdout
    assert any("good" in ln and "Succeeded" in ln for ln in lines), proc.stdout
    assert (out / "default" / "victim").is_dir() and not _leftovers(out / "default" / "victim")
