"""The engine's HTTP port under idle, slow and many clients: requests are still answered and the
server's threads stay bounded. Loopback only, bounded loops, no wall-clock assertions."""
from __future__ import annotations

import http.client
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from muxtune.engine.observe.status_server import EngineServer


def _server(**kwargs) -> EngineServer:
    return EngineServer("127.0.0.1", 0, lambda: {"tasks": {}}, lambda: (b"muxtune_up 1\n", "text/plain"), **kwargs).start()


def _server_threads(before: set) -> int:
    """Threads started since `before` other than the test's own clients: the server's."""
    return sum(t not in before and not t.name.startswith("client") for t in threading.enumerate())


def _get(port: int, path: str = "/metrics", n: int = 5) -> list[int]:
    """n requests on one kept-alive connection."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        codes = []
        for _ in range(n):
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            codes.append(r.status)
        return codes
    finally:
        c.close()


def _idle_sockets(port: int, n: int) -> list[socket.socket]:
    """n connections that never finish a request: silent, half a request line, or headers cut short."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 3 == 1:
            s.sendall(b"GET /metr")
        elif i % 3 == 2:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    return socks


@pytest.mark.parametrize("max_connections", [512, 64], ids=["under-the-cap", "over-the-cap"])
def test_idle_connections_do_not_starve_clients_or_grow_threads(max_connections):
    before = set(threading.enumerate())
    server = _server(max_connections=max_connections)
    socks = []
    try:
        socks = _idle_sockets(server.port, 300)
        peak = _server_threads(before)
        with ThreadPoolExecutor(16, thread_name_prefix="client") as pool:  # 16 concurrent clients, 5 requests each
            futures = [pool.submit(_get, server.port, path) for path in ["/metrics", "/v1/status", "/healthz", "/metrics"] * 4]
            for _ in range(50):  # sample the server's threads while the clients run
                peak = max(peak, _server_threads(before))
                if all(f.done() for f in futures):
                    break
                threading.Event().wait(0.05)
            codes = [c for f in futures for c in f.result()]
        assert codes == [200] * 80
        assert peak <= 3, f"{peak} server threads for 316 connections"  # the loop + a pool of two
        assert server.connections() <= max_connections + 1
    finally:
        for s in socks:
            s.close()
        server.stop()


def test_slow_and_idle_clients_are_disconnected():
    server = _server(header_timeout=0.5, idle_timeout=0.5)
    try:
        slow = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest (slowloris)
        assert slow.recv(1024) == b"", "the server must close a connection whose headers never finish"
        kept = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b"ok\n"
        assert kept.sock.recv(1024) == b"", "an idle kept-alive connection must be closed"
    finally:
        server.stop()


def test_malformed_requests_get_an_answer_not_a_hang():
    server = _server()
    try:
        for request, code in [(b"NONSENSE\r\n\r\n", b"400"), (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"405"),
                              (b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n", b"404"),
                              (b"GET /x HTTP/1.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n", b"431")]:
            s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            s.sendall(request)
            assert s.recv(64).split(b" ")[1] == code
            s.close()
        assert _get(server.port, "/healthz", 1) == [200]
    finally:
        server.stop()


def test_a_busy_port_fails_at_construction():
    holder = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError):
            EngineServer("127.0.0.1", holder.getsockname()[1], dict, lambda: (b"", "text/plain"))
    finally:
        holder.close()


def test_local_runs_bind_loopback_by_default():
    from muxtune.cli import RunCommand

    assert RunCommand.model_fields["metrics_host"].default == "127.0.0.1"
