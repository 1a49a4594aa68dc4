"""The dev cluster's processes: spawned detached with pid files, told apart from recycled pids,
stopped tier by tier; plus the HTTP probes that wait for them."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from muxtune.devcluster import build as _build

# start order; teardown is the reverse
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def _log(msg: str) -> None:
    print(f"[muxtune.devcluster] {msg}", file=sys.stderr, flush=True)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid_alive(pid: int, state_dir: Path) -> bool:
    """True if ``pid`` runs and is one of ours.

    Children of this process are asked directly (``Popen.poll``); other pids
    (read back from pid files) must be alive, not zombies, and have the state
    dir in their command line, so a recycled pid is never mistaken for ours.
    """
    for p in _CHILDREN:
        if p.pid == pid:
            return p.poll() is None
    for attempt in range(10):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):  # zombie / dead
            return False
        if cmdline:
            return str(state_dir).encode() in cmdline
        time.sleep(0.02 * (attempt + 1))  # empty while the process is exec()ing
    return False


def _spawn(name: str, args: list[str], state_dir: Path, env: dict[str, str] | None = None) -> int:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    exe = str(_build.bin_path(name))
    with open(logs / f"{name}.log", "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {exe} {' '.join(args)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [exe, *args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=state_dir, start_new_session=True, close_fds=True, env=env,
        )
    (state_dir / "pids").mkdir(exist_ok=True)
    (state_dir / "pids" / f"{name}.pid").write_text(f"{proc.pid}\n")
    # keep a reference so that Python's child reaper does not warn; the process
    # lives on in its own session after we exit.
    _CHILDREN.append(proc)
    return proc.pid


_CHILDREN: list[subprocess.Popen] = []


def _log_tail(state_dir: Path, name: str, lines: int = 30) -> str:
    try:
        return "".join((state_dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return "(no log)"


def _read_pids(state_dir: Path) -> dict[str, int]:
    """Every component's pid file: the control plane's and add-ons' (Kueue)."""
    pids = {}
    names = list(COMPONENTS) + sorted(f.stem for f in (state_dir / "pids").glob("*.pid") if f.stem not in COMPONENTS)
    for name in names:
        f = state_dir / "pids" / f"{name}.pid"
        with contextlib.suppress(OSError, ValueError):
            pids[name] = int(f.read_text().strip())
    return pids


def _stop_pids(state_dir: Path, pids: dict[str, int], timeout: float = 20) -> None:
    """SIGTERM components in reverse start order, one tier at a time (clients, then the
    apiserver, then etcd) so each can shut down cleanly; SIGKILL after ``timeout``."""
    order = [n for n in reversed(COMPONENTS) if n in pids] + [n for n in pids if n not in COMPONENTS]
    tiers = [
        [n for n in order if n not in ("kube-apiserver", "etcd")],
        [n for n in order if n == "kube-apiserver"],
        [n for n in order if n == "etcd"],
    ]
    for tier in tiers:
        for name in tier:
            if _pid_alive(pids[name], state_dir):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pids[name], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in tier:
            pid = pids[name]
            while _pid_alive(pid, state_dir) and time.monotonic() < deadline:
                _reap()
                time.sleep(0.05)
            if _pid_alive(pid, state_dir):
                _log(f"{name} (pid {pid}) ignored SIGTERM for {timeout:.0f}s; killing")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
    _reap()


def _reap() -> None:
    for p in list(_CHILDREN):
        if p.poll() is not None:
            _CHILDREN.remove(p)


# --------------------------------------------------------------------------- HTTP probes


def _ssl_ctx(state_dir: Path) -> ssl.SSLContext:
    pki = state_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def _get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 3) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ssl.SSLError) as e:
        return 0, str(e)


def _insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _wait(what: str, cond, timeout: float, state_dir: Path, component: str, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = cond()
        if ok:
            return
        if pid is not None and not _pid_alive(pid, state_dir):
            raise RuntimeError(f"{component} exited while waiting for {what}:\n{_log_tail(state_dir, component)}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last}):\n{_log_tail(state_dir, component)}")
