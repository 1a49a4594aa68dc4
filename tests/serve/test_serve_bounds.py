"""The serving port is bounded like the status server (engine/serve/listener.py): a connection cap
that evicts idle connections and refuses with 503 when all are busy, a timeout on headers that
trickle in (slowloris) and on bodies that never arrive, and a busy port refused before training."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest


@pytest.fixture
def bare_server(tiny_backbone):
    """A real serving stack over the base model whose engine loop does NOT run: a generation
    request stays in flight (its connection busy) until the stack closes."""
    from muxtune.engine.serve.stack import Serving

    from tests.helpers.serving import serve_flags

    made = []

    def start(**flags):
        serving = Serving(tiny_backbone, "base", serve_flags(**flags), host="127.0.0.1", port=0).start()
        made.append(serving)
        return serving

    yield start
    for s in made:
        s.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    return s


def closed_by_server(s: socket.socket) -> bool:
    """True when the server closed the connection (possibly after sending a response)."""
    try:
        while True:
            if s.recv(65536) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def get(port: int, path: str) -> tuple[int, bytes]:
    s = connect(port)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return int(data.split(b" ", 2)[1]), data


def wait_for(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_idle_connections_are_evicted_for_a_new_one(bare_server):
    serving = bare_server(max_connections=2)
    port = serving.http.port
    idle = [connect(port), connect(port)]
    assert wait_for(lambda: serving.http.guard.open_connections() == 2)
    status, _ = get(port, "/health")  # a third connection: the longest-idle one makes room
    assert status == 200
    idle[0].settimeout(10)
    assert closed_by_server(idle[0])
    for s in idle:
        s.close()


def test_all_connections_busy_gets_503_with_retry_after(bare_server):
    serving = bare_server(max_connections=1)
    port = serving.http.port
    busy = connect(port)  # a completion that stays in flight (the engine loop is not running)
    body = json.dumps({"model": "base", "prompt": "abc", "max_tokens": 4}).encode()
    busy.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_for(lambda: bool(serving.http.guard.busy))  # its handler runs
    status, data = get(port, "/health")
    assert status == 503 and b"Retry-After: 1" in data
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "service_unavailable"
    assert serving.http.guard.refused == 1
    busy.close()


def test_trickled_headers_are_cut_off(bare_server):
    serving = bare_server(idle_timeout_s=0.5)
    s = connect(serving.http.port)
    s.sendall(b"GET /health HTTP/1.1\r\nHo")  # never finishes its headers
    s.settimeout(15)
    assert closed_by_server(s)
    s.close()


def test_a_body_that_never_arrives_gets_408(bare_server, monkeypatch):
    from muxtune.engine.serve import serving as serving_path

    monkeypatch.setattr(serving_path, "BODY_TIMEOUT_S", 0.5)  # the generation endpoints read bodies there
    serving = bare_server()
    s = connect(serving.http.port)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\":")
    data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 408")
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request_error"
    s.close()


def test_a_busy_serve_port_stops_the_run_before_training(tmp_path):
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    from tests.helpers.data import quickstart_tasks

    tasks = quickstart_tasks(tmp_path, steps=2)
    done = subprocess.run([sys.executable, "-m", "muxtune.cli", "run", str(tasks), "--output", "out",
                           "--serve-port", str(port), "--no-progress"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    holder.close()
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: --serve-port {port}: cannot listen on 127.0.0.1:{port}: Address already in use")
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
