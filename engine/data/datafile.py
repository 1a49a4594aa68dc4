"""Bounded reading of a dataset file: what a hostile or careless path cannot do to the engine.

- Only regular files: the path is stat()ed before it is opened, so a FIFO is refused without
  blocking on it, and /dev/zero or a socket never reaches a read. The opened descriptor is
  checked again (fstat) in case the path was swapped in between.
- The file and each line are capped (DataLimits, raised with `muxtune run --max-dataset-bytes /
  --max-line-bytes`); reading stops one byte past a cap, so memory stays bounded even if the
  file grows while it is read. Errors name the file, the line and the cap.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from muxtune.facts.data_limits import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_LINE_BYTES


class DataFileError(ValueError):
    """The file cannot be read safely; the message names the file (and line) and the cap."""


@dataclass(frozen=True)
class DataLimits:
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    # s3:// datasets: fetched by this process (muxtune run), or only read from the copy a staging
    # Job left in the data area (engine pods, which hold no credentials: `--no-remote`)
    fetch: bool = True


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, limits: DataLimits, shown: str | None = None):
    """A binary file object for a regular file within the size cap; refuses anything else unopened."""
    shown = shown or str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataFileError(f"{shown}: file not found") from None
    except OSError as exc:
        raise DataFileError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataFileError(f"{shown}: is {_kind(st.st_mode)}; only regular files are read")
    _check_size(st.st_size, limits, shown)
    try:  # O_NONBLOCK: should the path have become a FIFO since the stat, open does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DataFileError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DataFileError(f"{shown}: is {_kind(st.st_mode)}; only regular files are read")
    return os.fdopen(fd, "rb")


def _check_size(size: int, limits: DataLimits, shown: str) -> None:
    if size > limits.max_file_bytes:
        raise DataFileError(
            f"{shown}: larger than the dataset size cap of {limits.max_file_bytes} bytes "
            "(raise it with --max-dataset-bytes)"
        )


def read_lines(path: Path, limits: DataLimits, shown: str | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text without the newline) for each line, never holding more than one capped line."""
    shown = shown or str(path)
    cap = limits.max_line_bytes
    total = 0
    with open_regular(path, limits, shown) as f:
        n = 0
        while True:
            raw = f.readline(cap + 1)
            if not raw:
                return
            n += 1
            total += len(raw)
            _check_size(total, limits, shown)  # the file grew after the stat
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif len(raw) > cap:
                raise DataFileError(
                    f"{shown}:{n}: line longer than the cap of {cap} bytes (raise it with --max-line-bytes)"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(f"{shown}:{n}: not UTF-8 (byte {exc.start} of the line)") from None
            yield n, text
