"""An unexpected exception inside a training round fails the tasks of that backbone with the reason
(status Failed, exit code 1), with no traceback exit and no task left Running."""
from __future__ import annotations

import json

import yaml

from muxtune.engine import executor
from tests.helpers.data import task_doc, write_jsonl


def test_an_exception_in_a_round_fails_the_backbones_tasks(monkeypatch, tmp_path, capsys):
    from muxtune.cli import RunCommand
    from muxtune.engine.run import run_from_cli

    write_jsonl(tmp_path / "d.jsonl", 8)
    docs = [task_doc(name, tmp_path / "d.jsonl", steps=3, seed=i) for i, name in enumerate(("a", "b"))]
    for d in docs:
        d["spec"]["dataset"]["path"] = "d.jsonl"
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump_all(docs))
    monkeypatch.chdir(tmp_path)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second round: a step is half done
            raise RuntimeError("kernel exploded")
        return real(*args, **kwargs)

    real = executor.run_fused
    monkeypatch.setattr(executor, "run_fused", boom)
    code = run_from_cli(RunCommand(tasks=["tasks.yaml"], output=tmp_path / "out", progress=False, device="cpu"))
    assert code == 1
    for name in ("a", "b"):
        status = json.loads((tmp_path / "out" / "default" / name / "status.json").read_text())
        assert status["phase"] == "Failed", status
        assert "internal error in a training round: RuntimeError: kernel exploded" in status["message"]
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Failed" in out.out
