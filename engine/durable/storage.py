"""Durable files: atomic writes, checkpoint directories sealed by a manifest written last,
bounded retries, and reads that name the file in every error.

Why: a crash, a full disk or a read-only volume must never leave a file that looks whole and is
not, and must fail only the task whose file it is. The module knows nothing of tasks or tensors
(bytes in, bytes out), so any caller can use it: the trainer's status and metrics, the checkpoint
format in `checkpoint.py`, and a parallel engine's rank 0 writing state gathered from the others.

Entry points:
- `write_atomic(path, data)`: a whole file (temp file, fsync, rename); readers see old or new.
- `append_line(path, line)`: one line; a failed write is rolled back before the retry.
- `write_sealed_dir(root, name, files)`: a directory of files, then MANIFEST.json (sizes and
  sha256, written last), renamed into place. A directory without a valid manifest is not whole.
- `verify_sealed_dir(path)`: the manifest, or CorruptError naming the file that is wrong.
- `read_json(path)`, `read_jsonl(path)`: CorruptError naming the file; a torn last line of a
  JSON-lines log (a crash mid-append) is dropped and reported, not fatal.
- `move_aside(path, name)`: keep something out of the way without deleting it.

Writes are retried `RETRIES` times with exponential backoff, then raise StorageError
("<path>: <what went wrong>"). Every byte goes through `_write`, the one boundary where the
operating system can refuse; tests inject full-disk and read-only faults there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, TypeVar

log = logging.getLogger("muxtune.engine")

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "muxtune-sealed-dir/1"
TMP_PREFIX = ".tmp-"
RETRIES = 3
BACKOFF_S = 0.05  # 0.05 s, 0.2 s between the attempts: rides out a hiccup, not a full disk

T = TypeVar("T")


class StorageError(Exception):
    """A write that kept failing; the message starts with the file's path."""


class CorruptError(Exception):
    """A file or sealed directory that cannot be trusted; the message starts with the file's path."""


def _write(path: Path, data: bytes, *, append: bool = False) -> None:
    """The one place bytes reach the disk. Appends are rolled back to the old length on failure."""
    with open(path, "ab" if append else "wb") as f:
        start = f.tell()
        try:
            f.write(data)
            f.flush()
            if not append:
                os.fsync(f.fileno())
        except BaseException:
            if append:
                try:
                    f.truncate(start)
                except OSError:
                    pass
            raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def retrying(path: Path, fn: Callable[[], T], cleanup: Callable[[], None] | None = None) -> T:
    """Run a write, retrying with backoff; then StorageError naming `path`.

    Any exception counts (torch raises RuntimeError on a full disk, not OSError)."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - whatever the disk said, it is this file's failure
            if cleanup is not None:
                cleanup()
            if attempt + 1 == RETRIES:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise StorageError(f"{path}: write failed after {RETRIES} attempts: {reason}") from exc
            log.warning("write failed; retrying", extra={"path": str(path), "attempt": attempt + 1, "error": str(exc)})
            time.sleep(BACKOFF_S * 4**attempt)
    raise AssertionError("unreachable")


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")

    def once():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(tmp, data)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    retrying(path, once, cleanup=lambda: _unlink_quietly(tmp))


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def append_line(path: Path, line: str) -> None:
    """Append one line (no fsync: a log line lost in a crash is re-created on resume)."""
    path = Path(path)

    def once():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, (line.rstrip("\n") + "\n").encode(), append=True)

    retrying(path, once)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_sealed_dir(root: Path, name: str, files: dict[str, bytes]) -> Path:
    """Write `files` into root/name as a whole: a temp directory, MANIFEST.json last, one rename.

    An existing root/name is replaced (moved away first, removed after). On failure the temp
    directory is removed and StorageError names the file that could not be written."""
    root = Path(root)
    final, tmp, old = root / name, root / f"{TMP_PREFIX}{name}", root / f".old-{name}"
    manifest = {"format": MANIFEST_FORMAT,
                "files": {f: {"size": len(b), "sha256": _digest(b)} for f, b in sorted(files.items())}}
    current = {"path": tmp}

    def once():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for fname, data in files.items():
            current["path"] = tmp / fname
            _write(tmp / fname, data)
        current["path"] = tmp / MANIFEST
        _write(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        current["path"] = final
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)

    def cleanup():
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        retrying(final, once, cleanup=cleanup)
    except StorageError as exc:  # name the file that failed, not only the directory
        failed = str(current["path"]).replace(str(tmp), str(final))
        raise StorageError(f"{failed}: {str(exc).split(': ', 1)[1]}") from exc.__cause__
    return final


def verify_sealed_dir(path: Path) -> dict:
    """The directory's manifest, once every listed file has its size and hash; else CorruptError."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_bytes())
    except FileNotFoundError:
        raise CorruptError(f"{mpath}: missing (the write did not finish)") from None
    except (OSError, ValueError) as exc:
        raise CorruptError(f"{mpath}: unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CorruptError(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    for fname, want in manifest["files"].items():
        fpath = path / fname
        try:
            data = fpath.read_bytes()
        except OSError as exc:
            raise CorruptError(f"{fpath}: unreadable: {exc.strerror or exc}") from None
        if len(data) != want.get("size") or _digest(data) != want.get("sha256"):
            raise CorruptError(f"{fpath}: {len(data)} bytes that do not match {MANIFEST} ({want.get('size')} bytes, sha256 {str(want.get('sha256'))[:12]}...)")
    return manifest


def remove_temporaries(root: Path) -> None:
    """Temp directories and files left by a process that died mid-write."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((TMP_PREFIX, ".old-")):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else _unlink_quietly(p)


def read_json(path: Path) -> dict | None:
    """A JSON object, None when the file is absent; CorruptError naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptError(f"{path}: unreadable: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CorruptError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptError(f"{path}: expected a JSON object")
    return data


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines log; [] when absent. A torn last line (the writer died
    mid-append) is dropped with a warning; a bad line elsewhere is CorruptError naming file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CorruptError(f"{path}: unreadable: {exc.strerror or exc}") from None
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if all(not rest.strip() for rest in lines[n:]):
                log.warning("dropped a torn last line", extra={"path": f"{path}:{n}"})
                break
            raise CorruptError(f"{path}:{n}: not a JSON object line ({exc})") from None
        records.append(rec)
    return records


def move_aside(path: Path, name: str) -> Path:
    """Rename `path` to a free sibling `name`, `name.1`, ...: kept, out of the way."""
    path = Path(path)
    target, n = path.with_name(name), 0
    while target.exists():
        n += 1
        target = path.with_name(f"{name}.{n}")
    os.replace(path, target)
    return target
