"""The serving port: an aiohttp application on its own event loop, bounded like the status server
(engine/observe/status_server.py), because anyone who can reach the port can open connections:

- the port binds in the caller's thread (`listen`), so a busy port is an OSError before anything
  starts (`muxtune run` checks it in preflight, with nothing trained);
- a connection that sends no complete request headers within `idle_timeout`, or sits idle that long
  between requests, is closed (aiohttp's keep-alive timer runs from the connection's start and
  partial headers do not reset it: slowloris costs a socket for at most that long);
- at most `max_connections` are open: a new one evicts the longest-idle connection (none serving a
  request), and when every one is serving a request it gets a 503 with Retry-After and is closed;
- request bodies are bounded in size (http_api.MAX_BODY_BYTES) and time (serving.BODY_TIMEOUT_S), and a
  streamed response a client stops reading is dropped after serving.WRITE_TIMEOUT_S.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading

from aiohttp import web

BACKLOG = 1024


def listen(host: str, port: int) -> socket.socket:
    """Bind now (raises OSError: EADDRINUSE, EACCES, an unknown host ...)."""
    sock = socket.create_server((host, port), backlog=BACKLOG)
    sock.setblocking(False)
    return sock


class _Refuse(asyncio.Protocol):
    """Every connection is busy serving a request: answer 503 at once, then close when the client
    does, or after a second (closing at once would reset the connection under a request being
    sent, and the client would lose the answer)."""

    BODY = json.dumps({"error": {"message": "too many connections; retry shortly", "type": "server_error",
                                 "param": None, "code": "service_unavailable"}}).encode()

    def connection_made(self, transport) -> None:
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(self.BODY), self.BODY))
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data: bytes) -> None:  # read and dropped
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes


class ConnectionGuard:
    """Caps the open connections of one aiohttp server; its middleware marks the busy ones."""

    def __init__(self, max_connections: int):
        self.max_connections = max_connections
        self.server: web.Server | None = None  # set when the runner is ready
        self.busy: dict[object, int] = {}  # handler -> requests in progress on it
        self.since: dict[object, float] = {}  # handler -> when it last started or finished a request
        self.refused = 0

    def open_connections(self) -> int:
        return len(self.server.connections) if self.server is not None else 0

    def factory(self):
        loop = asyncio.get_running_loop()
        live = self.server.connections
        for h in [h for h in self.since if h not in live]:  # closed since
            self.since.pop(h, None)
        if len(live) >= self.max_connections:
            idle = [h for h in live if not self.busy.get(h)]
            if not idle:
                self.refused += 1
                return _Refuse()
            min(idle, key=lambda h: self.since.get(h, 0.0)).force_close()
        handler = self.server()
        self.since[handler] = loop.time()
        return handler

    @web.middleware
    async def middleware(self, request, handler):
        conn, loop = request.protocol, asyncio.get_running_loop()
        self.busy[conn] = self.busy.get(conn, 0) + 1
        self.since[conn] = loop.time()
        try:
            return await handler(request)
        finally:
            self.busy[conn] -= 1
            if not self.busy[conn]:
                del self.busy[conn]
            self.since[conn] = loop.time()


class HttpThread:
    """Runs an aiohttp application on a bound socket, on its own event loop in a daemon thread."""

    def __init__(self, app: web.Application, sock: socket.socket, guard: ConnectionGuard, *, idle_timeout: float = 15.0):
        self.app, self.sock, self.guard, self.idle_timeout = app, sock, guard, idle_timeout
        self.host, self.port = sock.getsockname()[:2]
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="muxtune-serve-http", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                    keepalive_timeout=self.idle_timeout)
        try:
            self.loop.run_until_complete(self.runner.setup())
            self.guard.server = self.runner.server
            server = self.loop.run_until_complete(self.loop.create_server(self.guard.factory, sock=self.sock))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def start(self) -> HttpThread:
        self.thread.start()
        self._ready.wait()
        if self._error is not None:
            raise OSError(f"cannot serve on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        self.sock.close()
