"""One `muxtune run` per output directory.

An OS lock (flock on `<output>/.muxtune.lock`) is held for the whole run: the kernel drops it
when the process exits however it exits, so a crashed run never leaves a stale lock behind. Who
holds it (pid, host, start time, command) is written next to it, in `.muxtune.lock.json`, only
to explain a refusal; the flock alone decides.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".muxtune.lock"
INFO_NAME = ".muxtune.lock.json"


class RunLockedError(RuntimeError):
    """Another process holds the output directory; the message says which."""


class RunLock:
    def __init__(self, output: Path):
        self.output = Path(output)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Create the output directory if needed and take its lock, or raise RunLockedError."""
        self.output.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.output / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"output {self.output} is in use by another muxtune run ({self._holder()})") from None
        self._fd = fd
        self._write_info()
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            (self.output / INFO_NAME).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": sys.argv}
        tmp = self.output / f"{INFO_NAME}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(info))
            os.replace(tmp, self.output / INFO_NAME)
        except OSError:  # advisory only: a refusal would just say less
            tmp.unlink(missing_ok=True)

    def _holder(self) -> str:
        try:
            info = json.loads((self.output / INFO_NAME).read_text())
            command = " ".join(str(a) for a in info.get("command", []))
            return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}: {command}"
        except (OSError, ValueError, AttributeError):
            return "holder unknown"
