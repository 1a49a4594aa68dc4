"""Resume survives what a crash or a careless user leaves behind: a corrupt newest checkpoint
(fall back to the newest intact one, warning which was skipped), a torn metrics.jsonl tail, an empty
status.json, a changed dataset (refused unless allowed), and a task re-created under the same name
(a new metadata.uid starts fresh; the old output is moved aside, not deleted)."""
from __future__ import annotations

import json
import logging

import pytest
from safetensors.torch import load_file


class Crash(Exception):
    pass


def _crash_at(step):
    def hook(trainer, rt):
        if rt.step == step:
            raise Crash(f"simulated crash after step {step}")
    return hook


def _with_uid(task, uid):
    return task.model_copy(update={"metadata": task.metadata.model_copy(update={"uid": uid})})


def _interrupted(trainer_factory, out, task, crash_step):
    first = trainer_factory(out)
    first.step_hooks.append(_crash_at(crash_step))
    first.add_task(task)
    with pytest.raises(Crash):
        first.run()
    return first.tasks[task.key].out_dir


def _steps(out_dir):
    return [json.loads(ln)["step"] for ln in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_corrupt_newest_checkpoint_falls_back_to_intact_one(make_task, data_dir, tmp_path, trainer_factory, caplog):
    task = make_task("fb", data_dir / "reverse.jsonl", steps=7, checkpointInterval=2, lr=2e-2)
    straight = trainer_factory(tmp_path / "straight")
    straight.add_task(task)
    straight.run()

    task_dir = _interrupted(trainer_factory, tmp_path / "out", task, crash_step=5)  # checkpoints at 2 and 4
    newest = sorted((task_dir / "checkpoints").glob("step-*"))[-1]
    assert newest.name == "step-00000004"
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # torn by a crash or a bad disk

    second = trainer_factory(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="muxtune.engine"):
        rt = second.add_task(task)
    assert rt.phase == "Running" and rt.step == 2, rt.message
    assert any(str(weights) in r.getMessage() + json.dumps(r.__dict__, default=str) for r in caplog.records), \
        "the warning must name the file that was wrong"
    second.run()
    assert rt.phase == "Succeeded" and _steps(task_dir) == list(range(1, 8))
    a = load_file(straight.tasks[task.key].out_dir / "adapter_model.safetensors")
    assert _max_diff(a, load_file(task_dir / "adapter_model.safetensors")) == 0.0


def test_checkpoint_without_manifest_is_not_a_checkpoint(make_task, data_dir, tmp_path, trainer_factory):
    task = make_task("mf", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2)
    task_dir = _interrupted(trainer_factory, tmp_path / "out", task, crash_step=5)
    newest = sorted((task_dir / "checkpoints").glob("step-*"))[-1]
    (newest / "MANIFEST.json").unlink()  # as if the process died before the manifest, written last
    rt = trainer_factory(tmp_path / "out").add_task(task)
    assert rt.phase == "Running" and rt.step == 2


def test_torn_metrics_tail_and_empty_status_are_tolerated(make_task, data_dir, tmp_path, trainer_factory):
    task = make_task("torn", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2)
    task_dir = _interrupted(trainer_factory, tmp_path / "out", task, crash_step=5)
    with open(task_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 1.2')  # the process died mid-line
    (task_dir / "status.json").write_text("")  # a non-atomic writer died after truncating
    second = trainer_factory(tmp_path / "out")
    rt = second.add_task(task)
    assert rt.phase == "Running" and rt.step == 4, rt.message
    second.run()
    assert rt.phase == "Succeeded" and _steps(task_dir) == list(range(1, 7))
    assert json.loads((task_dir / "status.json").read_text())["phase"] == "Succeeded"


def test_spec_mismatch_names_the_checkpoint(make_task, data_dir, tmp_path, trainer_factory):
    task = make_task("sm", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2)
    task_dir = _interrupted(trainer_factory, tmp_path / "out", task, crash_step=3)
    changed = make_task("sm", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2, r=8)
    rt = trainer_factory(tmp_path / "out").add_task(changed)
    assert rt.phase == "Failed" and "different spec" in rt.message
    assert str(task_dir / "checkpoints" / "step-00000002") in rt.message


def test_changed_dataset_is_refused_for_that_task_alone_unless_allowed(make_task, data_dir, tmp_path, trainer_factory):
    from tests.helpers.data import write_jsonl

    data = write_jsonl(data_dir / "mine.jsonl", 40, seed=5)
    task = make_task("dc", data, steps=6, checkpointInterval=2)
    other = make_task("other", data_dir / "upper.jsonl", steps=3)
    _interrupted(trainer_factory, tmp_path / "out", task, crash_step=3)
    write_jsonl(data, 40, seed=6)  # replaced between runs: same size, other examples

    second = trainer_factory(tmp_path / "out")
    rt = second.add_task(task)
    neighbour = second.add_task(other)
    assert rt.phase == "Failed", "a changed dataset must not resume silently"
    assert "dataset changed" in rt.message and task.spec.dataset.path in rt.message and "--allow-data-change" in rt.message
    second.run()
    assert neighbour.phase == "Succeeded"

    third = trainer_factory(tmp_path / "out")
    third.allow_data_change = True
    rt = third.add_task(task)
    assert rt.phase == "Running" and rt.step == 2
    third.run()
    assert rt.phase == "Succeeded"


def test_recreated_task_with_new_uid_starts_fresh_and_old_output_is_kept(make_task, data_dir, tmp_path, trainer_factory, caplog):
    task = make_task("job", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2)
    old = _with_uid(task, "uid-old")
    task_dir = _interrupted(trainer_factory, tmp_path / "out", old, crash_step=3)

    same = trainer_factory(tmp_path / "out").add_task(old)  # the same object comes back: resume
    assert same.step == 2

    # deleted and re-created under the same name, even with another spec: a new object starts fresh
    new = _with_uid(make_task("job", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2, r=8), "uid-new")
    with caplog.at_level(logging.WARNING, logger="muxtune.engine"):
        rt = trainer_factory(tmp_path / "out").add_task(new)
    assert rt.phase == "Running" and rt.step == 0, rt.message
    moved = [p for p in task_dir.parent.iterdir() if p != task_dir and "uid-old" in p.name]
    assert len(moved) == 1 and list((moved[0] / "checkpoints").glob("step-*")), "the old output is moved aside"
    assert any(str(moved[0]) in json.dumps(r.__dict__, default=str) for r in caplog.records), "log says where"
    assert json.loads((task_dir / "status.json").read_text())["uid"] == "uid-new"


def test_without_uid_output_resumes_as_before(make_task, data_dir, tmp_path, trainer_factory):
    task = make_task("local", data_dir / "reverse.jsonl", steps=6, checkpointInterval=2)
    _interrupted(trainer_factory, tmp_path / "out", _with_uid(task, "uid-1"), crash_step=3)
    rt = trainer_factory(tmp_path / "out").add_task(task)  # a local run names no uid
    assert rt.phase == "Running" and rt.step == 2


@pytest.mark.parametrize("flag", [False, True])
def test_allow_data_change_flag_reaches_the_engine(flag, make_task, data_dir, tmp_path, trainer_factory):
    """`muxtune run --allow-data-change`, parsed as the CLI parses it, through run_group."""
    from pydantic_settings import CliApp

    from muxtune.cli import RunCommand
    from muxtune.engine.run import run_group
    from tests.helpers.data import write_jsonl

    data = write_jsonl(data_dir / "mine.jsonl", 40, seed=5)
    task = make_task("flag", data, steps=4, checkpointInterval=2)
    _interrupted(trainer_factory, tmp_path / "out", task, crash_step=3)
    write_jsonl(data, 40, seed=6)
    args = ["x.yaml", "--output", str(tmp_path / "out"), "--device", "cpu", "--no-progress"]
    cmd = CliApp.run(RunCommand, cli_args=args + (["--allow-data-change"] if flag else []), cli_cmd_method_name="model_copy")
    assert cmd.allow_data_change is flag
    from tests.helpers.data import data_root_dir

    trainer = run_group([task], cmd, lambda: False, data_root_dir())
    rt = trainer.tasks[task.key]
    assert rt.phase == ("Succeeded" if flag else "Failed"), rt.message


def test_no_resume_starts_over_and_keeps_old_checkpoints_aside(make_task, data_dir, tmp_path, trainer_factory):
    task = make_task("nr", data_dir / "reverse.jsonl", steps=4, checkpointInterval=2)
    task_dir = _interrupted(trainer_factory, tmp_path / "out", task, crash_step=3)
    fresh = trainer_factory(tmp_path / "out")
    fresh.resume = False
    rt = fresh.add_task(task)
    assert rt.step == 0 and not (task_dir / "metrics.jsonl").exists()
    assert list((task_dir / ".checkpoints-not-resumed").glob("step-*")), "the old checkpoints are kept"
    fresh.run()
    assert sorted(p.name for p in (task_dir / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert _steps(task_dir) == [1, 2, 3, 4]
