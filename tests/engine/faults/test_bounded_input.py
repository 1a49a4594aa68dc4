"""Hostile dataset files fail their own task with a reason naming the file and the cap, without
blocking, without unbounded reads, while the neighbour trains; too-long examples are counted."""
from __future__ import annotations

import json
import logging
import os
import socket

import pytest

from muxtune.engine.data.datafile import DataFileError, DataLimits, open_regular, read_lines


def _run_with_neighbour(trainer, broken, good):
    trainer.add_task(broken)
    trainer.add_task(good)
    trainer.run()
    b, g = trainer.tasks[broken.key], trainer.tasks[good.key]
    assert g.phase == "Succeeded", g.message
    return b


@pytest.mark.timeout(120)  # without the stat-first check, opening the FIFO blocks forever
@pytest.mark.parametrize("kind", ["fifo", "directory", "socket"])
def test_non_regular_dataset_fails_alone_without_blocking(kind, make_task, data_dir, tmp_path, trainer_factory):
    path = data_dir / f"special-{kind}"
    sock = None
    if kind == "fifo":
        os.mkfifo(path)  # nobody ever writes: an open() for reading would wait forever
    elif kind == "directory":
        path.mkdir()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
    try:
        trainer = trainer_factory(tmp_path / "out")
        b = _run_with_neighbour(trainer, make_task("special", path), make_task("good", data_dir / "upper.jsonl", steps=2))
    finally:
        if sock is not None:
            sock.close()
    expected = {"fifo": "is a FIFO", "directory": "is a directory", "socket": "is a socket"}[kind]
    assert b.phase == "Failed" and expected in b.message and path.name in b.message, b.message


def test_devices_are_refused_unread():
    for dev in ("/dev/zero", "/dev/urandom"):
        with pytest.raises(DataFileError, match="character device"):
            open_regular(dev, DataLimits())


def test_file_size_cap_names_the_flag_and_can_be_raised(make_task, data_dir, tmp_path, trainer_factory):
    size = (data_dir / "reverse.jsonl").stat().st_size
    trainer = trainer_factory(tmp_path / "capped")
    trainer.data_limits = DataLimits(max_file_bytes=size - 1)
    b = trainer.add_task(make_task("big", data_dir / "reverse.jsonl", steps=1))
    assert b.phase == "Failed"
    assert f"cap of {size - 1} bytes" in b.message and "--max-dataset-bytes" in b.message and "reverse.jsonl" in b.message

    raised = trainer_factory(tmp_path / "raised")
    raised.data_limits = DataLimits(max_file_bytes=size)
    assert raised.add_task(make_task("big", data_dir / "reverse.jsonl", steps=1)).phase == "Running"


def test_a_file_growing_while_read_stops_at_the_cap(tmp_path):
    path = tmp_path / "grows.jsonl"
    path.write_text("x\n" * 10)
    lines = read_lines(path, DataLimits(max_file_bytes=100, max_line_bytes=10))
    assert next(lines) == (1, "x")
    with open(path, "a") as f:  # another writer appends after the size was checked
        f.write("y\n" * 1000)
    with pytest.raises(DataFileError, match="cap of 100 bytes"):
        for _ in lines:
            pass


def test_line_cap_names_line_and_flag(make_task, data_dir, tmp_path, trainer_factory):
    path = data_dir / "long-line.jsonl"
    rows = [{"prompt": "p", "completion": "short"}, {"prompt": "p", "completion": "z" * 5000}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = trainer_factory(tmp_path / "out")
    trainer.data_limits = DataLimits(max_line_bytes=4096)
    b = _run_with_neighbour(trainer, make_task("long", path), make_task("good", data_dir / "upper.jsonl", steps=2))
    assert b.phase == "Failed"
    assert "long-line.jsonl:2: line longer than the cap of 4096 bytes" in b.message and "--max-line-bytes" in b.message

    # the cap is a setting: raised, the same file trains (the long example truncated to maxSeqLen)
    raised = trainer_factory(tmp_path / "raised")
    raised.data_limits = DataLimits(max_line_bytes=8192)
    assert raised.add_task(make_task("long", path, steps=1)).phase == "Running"


def test_no_error_reason_is_ever_empty(make_task, data_dir, tmp_path, trainer_factory, monkeypatch):
    """Under a memory limit, reading failed with MemoryError, whose text is empty."""
    from muxtune.engine import trainer as trainer_mod

    def oom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(trainer_mod, "load_dataset", oom)
    rt = trainer_factory(tmp_path / "out").add_task(make_task("oom", data_dir / "reverse.jsonl"))
    assert rt.phase == "Failed" and rt.message == "MemoryError"


def test_dataset_symlink_out_of_the_data_root_is_refused(make_task, data_dir, tmp_path, trainer_factory):
    secret = tmp_path.parent / f"{tmp_path.name}-elsewhere.jsonl"
    secret.write_text(json.dumps({"prompt": "secret", "completion": "data"}) + "\n")
    try:
        (data_dir / "link.jsonl").symlink_to(secret)
        from muxtune.engine.data.dataset import DatasetError, dataset_file
        from muxtune.api.finetunetask import DatasetSpec

        with pytest.raises(DatasetError, match="leads outside the data root"):
            dataset_file(DatasetSpec(path="data/link.jsonl"), base_dir=tmp_path)
        for escape in ("data/../../x.jsonl", "/etc/passwd"):  # refused by the API too; the engine holds anyway
            with pytest.raises(DatasetError, match="leads outside the data root"):
                dataset_file(DatasetSpec.model_construct(path=escape), base_dir=tmp_path)
        assert dataset_file(DatasetSpec(path="data/reverse.jsonl"), base_dir=tmp_path) == (data_dir / "reverse.jsonl").resolve()
    finally:
        secret.unlink()


def test_dropped_examples_are_counted_everywhere(make_task, data_dir, tmp_path, trainer_factory, caplog):
    """Prompts longer than maxSeqLen (48) leave no completion token: those examples are dropped,
    and the count reaches the log, status.json, /v1/status, Prometheus and the summary."""
    from muxtune.engine.observe.engine_metrics import EngineMetrics
    from muxtune.engine.observe.progress import summary_table

    path = data_dir / "some-long.jsonl"
    rows = [{"prompt": f"p{i} " + ("long " * 30 if i % 4 == 0 else ""), "completion": "ok"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = trainer_factory(tmp_path / "out")
    metrics = EngineMetrics()
    metrics.attach(trainer)
    trainer.telemetry = metrics
    with caplog.at_level(logging.WARNING, logger="muxtune.engine"):
        rt = trainer.add_task(make_task("drops", path, steps=2))
    assert rt.phase == "Running" and rt.examples_dropped == 5
    warnings = [r for r in caplog.records if "examples dropped" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].dropped == 5 and warnings[0].read == 20
    trainer.run()
    assert json.loads((rt.out_dir / "status.json").read_text())["examplesDropped"] == 5
    assert metrics.status()["tasks"][rt.key]["examplesDropped"] == 5
    text = metrics.render()[0].decode()
    assert 'muxtune_task_examples_dropped_total{namespace="default",task="drops"} 5.0' in text
    table = summary_table(trainer.tasks.values()).splitlines()
    assert "DROPPED" in table[0] and table[1].split()[5] == "5"


def test_tokenizer_without_eos_warns_once_per_backbone(tiny_backbone_dir, tmp_path, caplog):
    import shutil

    import torch

    from muxtune.engine.model.loading import load_backbone

    d = tmp_path / "no-eos"
    shutil.copytree(tiny_backbone_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING, logger="muxtune.engine"):
        loaded = load_backbone(d, torch.device("cpu"), torch.float32)
        load_backbone(tiny_backbone_dir, torch.device("cpu"), torch.float32)
    assert loaded.tokenizer.eos_token_id is None
    assert [r.getMessage() for r in caplog.records].count(
        "the tokenizer has no EOS token: examples end without one, so the adapters never learn to stop") == 1


def test_deeply_nested_json_line_fails_its_task_with_a_reason(make_task, data_dir, tmp_path, trainer_factory):
    path = data_dir / "deep.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    trainer = trainer_factory(tmp_path / "out")
    b = _run_with_neighbour(trainer, make_task("deep", path), make_task("good", data_dir / "upper.jsonl", steps=2))
    assert b.phase == "Failed" and "deep.jsonl:2: JSON nested too deeply" in b.message, b.message
