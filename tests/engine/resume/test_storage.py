"""engine/durable/storage.py: a refused write leaves the old file whole and no temp behind; a sealed
directory is trusted only when every file matches its manifest; a torn log tail is dropped,
a bad line elsewhere named."""
from __future__ import annotations

import json

import pytest

from muxtune.engine.durable import storage
@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)


def _refuse(monkeypatch):
    calls = []

    def write(path, data, **kw):
        calls.append(path)
        raise RuntimeError("file write failed")

    monkeypatch.setattr(storage, "_write", write)
    return calls


def test_refused_atomic_write_keeps_old_file_and_names_it(tmp_path, monkeypatch):
    status = tmp_path / "status.json"
    storage.write_json_atomic(status, {"phase": "Running"})
    calls = _refuse(monkeypatch)
    with pytest.raises(storage.StorageError, match=f"^{status}: write failed after {storage.RETRIES} attempts"):
        storage.write_json_atomic(status, {"phase": "Succeeded"})
    assert len(calls) == storage.RETRIES
    assert json.loads(status.read_text()) == {"phase": "Running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_refused_sealed_dir_leaves_nothing_and_names_the_file(tmp_path, monkeypatch):
    _refuse(monkeypatch)
    with pytest.raises(storage.StorageError, match=f"^{tmp_path / 'step-1' / 'a.bin'}: "):
        storage.write_sealed_dir(tmp_path, "step-1", {"a.bin": b"x" * 10})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage,error", [
    (lambda d: (d / "a.bin").write_bytes(b"y" * 10), "a.bin: 10 bytes that do not match"),
    (lambda d: (d / "b.json").unlink(), "b.json: unreadable"),
    (lambda d: (d / storage.MANIFEST).unlink(), "MANIFEST.json: missing"),
    (lambda d: (d / storage.MANIFEST).write_text("{"), "MANIFEST.json: unreadable"),
])
def test_sealed_dir_is_verified_against_its_manifest(tmp_path, damage, error):
    d = storage.write_sealed_dir(tmp_path, "step-1", {"a.bin": b"x" * 10, "b.json": b"{}"})
    assert set(storage.verify_sealed_dir(d)["files"]) == {"a.bin", "b.json"}
    damage(d)
    with pytest.raises(storage.CorruptError) as exc:
        storage.verify_sealed_dir(d)
    assert str(exc.value).startswith(str(d)) and error in str(exc.value)


def test_rewriting_a_sealed_dir_replaces_it_whole(tmp_path):
    storage.write_sealed_dir(tmp_path, "s", {"a": b"1", "old": b"2"})
    d = storage.write_sealed_dir(tmp_path, "s", {"a": b"3"})
    assert sorted(p.name for p in d.iterdir()) == ["MANIFEST.json", "a"] and (d / "a").read_bytes() == b"3"
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_jsonl_torn_tail_is_dropped_bad_middle_line_is_named(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert storage.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    log.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(storage.CorruptError, match=f"^{log}:2: "):
        storage.read_jsonl(log)


def test_append_line_rolls_back_a_partial_write(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    storage.append_line(log, '{"step": 1}')

    class Disk:  # the first attempt writes half the line, then the disk is full
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            if not Disk.once:
                Disk.once = True
                self.f.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")
            return self.f.write(data)

    Disk.once = False
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: Disk(real_open(*a, **k)) if str(a[0]) == str(log) else real_open(*a, **k))
    storage.append_line(log, '{"step": 2}')
    monkeypatch.undo()
    assert storage.read_jsonl(log) == [{"step": 1}, {"step": 2}]
