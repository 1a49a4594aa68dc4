"""What `muxtune run` checks before it trains or writes anything. Each problem is a `CliProblem`:
one line on stderr and exit code 2, never a traceback, with nothing trained and nothing written
(the output directory is created only by the lock, the last step)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from muxtune.engine.durable import outputs
from muxtune.engine.durable.runlock import RunLock, RunLockedError
from muxtune.runconfig import RunConfig


class CliProblem(Exception):
    """A problem with the command line or its environment; the message is one line."""


def check_data_root(data_root: Path) -> Path:
    """--data-root must be a directory; its absolute path (what the tasks' dataset paths are relative to)."""
    base_dir = Path(data_root).resolve()
    if not base_dir.is_dir():
        raise CliProblem(f"--data-root {data_root}: not a directory")
    return base_dir


def check_backbones(cfg: RunConfig, base_models: list[str]) -> None:
    """--watch and --serve-port follow one backbone."""
    if cfg.watch and len(base_models) > 1:
        raise CliProblem("--watch serves one backbone; the task files name " + ", ".join(base_models))
    if cfg.serving and len(base_models) > 1:
        raise CliProblem("--serve-port serves one backbone; the task files name " + ", ".join(base_models))


def check_output(output: Path) -> None:
    """--output must be (or be creatable as) a directory: not a file, nor under one."""
    probe = Path(output)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is" if probe == Path(output) else f"is under {probe}, which is"
        raise CliProblem(f"--output {output}: {where} not a directory")


def check_layout(output: Path, tasks) -> None:
    """No task directory outside --output, none shared or nested (engine/durable/outputs.py)."""
    try:
        outputs.plan(output, tasks)
    except outputs.OutputLayoutError as exc:
        raise CliProblem("output directories: " + "; ".join(str(exc).splitlines())) from None


def start_server(host: str, port: int, status, render, token_sha256: str | None = None):
    from muxtune.engine.observe.status_server import EngineServer

    if token_sha256 is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: /metrics and /v1/status on {host}:{port} answer anyone who reaches them "
              "(no --status-token-sha256)", file=sys.stderr)
    try:
        server = EngineServer(host, port, status, render, token_sha256=token_sha256)
    except OSError as exc:  # EADDRINUSE, EACCES below 1024, an unknown host ...
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CliProblem(f"--metrics-port {port}: cannot listen on {host}:{port}: {why}") from None
    return server.start()


def listen(flag: str, host: str, port: int):
    """Bind a port now (the serving API's), so a busy one stops the command before it starts."""
    from muxtune.engine.serve.listener import listen as bind

    try:
        return bind(host, port)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CliProblem(f"{flag} {port}: cannot listen on {host}:{port}: {why}") from None


def lock_output(output: Path) -> RunLock:
    try:
        return RunLock(output).acquire()
    except RunLockedError as exc:
        raise CliProblem(str(exc)) from None
    except OSError as exc:
        raise CliProblem(f"--output {output}: cannot use it: {exc.strerror or exc}") from None
