"""The engine's HTTP side: /metrics for Prometheus, /v1/status for the operator, /healthz for probes.

Bounded by design, because anyone who can reach the port can open connections:
- one event-loop thread serves every connection (an idle or slow client costs a socket, not a
  thread), and the handlers run on a pool of two threads;
- a request's headers must arrive within `header_timeout` (slowloris), a kept-alive connection
  closes after `idle_timeout`, a response that cannot be written in `write_timeout` is dropped;
- at most `max_connections` are open: a new one evicts the longest-idle connection, so idle
  sockets can never lock out a scraper;
- the listen backlog is 1024 (the kernel caps it at somaxconn), not http.server's 5.

Only GET and HEAD of the three routes; the port binds when the server is made, so a busy port is
an OSError for the caller before anything starts.

Who may read: given ``token_sha256`` (pods: the operator passes the SHA-256 of its status token,
never the token), /v1/status and /metrics answer only ``Authorization: Bearer <token>`` whose
digest matches (the operator's polls, Prometheus with the chart's Secret); anything else gets 401.
/healthz stays open for probes. Without it (a local ``muxtune run``) the port is open to whoever
reaches it, which is why it binds 127.0.0.1 unless told otherwise (docs/SECURITY-MODEL.md).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MAX_HEADER_BYTES = 16 << 10
OPEN_ROUTES = frozenset({"/healthz"})  # probes carry no token
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}


class _Conn:
    __slots__ = ("writer", "idle_since")

    def __init__(self, writer):
        self.writer = writer
        self.idle_since: float | None = None  # None while a request is being served


class EngineServer:
    def __init__(self, host: str, port: int, status: Callable[[], dict], metrics: Callable[[], tuple[bytes, str]], *,
                 max_connections: int = 512, header_timeout: float = 10.0, idle_timeout: float = 60.0,
                 write_timeout: float = 30.0, backlog: int = 1024, token_sha256: str | None = None):
        self.routes = {
            "/v1/status": lambda: (json.dumps(status()).encode(), "application/json"),
            "/metrics": metrics,
            "/healthz": lambda: (b"ok\n", "text/plain"),
        }
        self.token_sha256 = token_sha256.strip().lower() if token_sha256 else None
        self.max_connections = max_connections
        self.header_timeout, self.idle_timeout, self.write_timeout = header_timeout, idle_timeout, write_timeout
        self.sock = socket.create_server((host, port), backlog=backlog)  # raises here if the port is taken
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task] = set()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="muxtune-http-handler")
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stopping: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="muxtune-http", daemon=True)

    # ----- lifecycle (caller's thread) --------------------------------------------------------
    def start(self) -> EngineServer:
        self.thread.start()
        self._started.wait(timeout=30)
        return self

    def stop(self) -> None:
        if self.thread.is_alive() and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self.thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.sock.close()

    def connections(self) -> int:
        return len(self._conns)

    # ----- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, sock=self.sock, limit=MAX_HEADER_BYTES)
        self._started.set()
        await self._stopping.wait()
        server.close()
        for c in list(self._conns):
            c.writer.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()

    def _make_room(self) -> bool:
        """Over the cap: close the longest-idle connection; False if every one is busy."""
        if len(self._conns) <= self.max_connections:
            return True
        idle = [c for c in self._conns if c.idle_since is not None]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        oldest.writer.transport.abort()
        self._conns.discard(oldest)
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        conn = _Conn(writer)
        conn.idle_since = loop.time()
        self._conns.add(conn)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            if not self._make_room():
                return
            timeout = self.header_timeout
            while True:
                conn.idle_since = loop.time()
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                except asyncio.LimitOverrunError:
                    await self._respond(writer, 431, b"", "text/plain", head_only=False, close=True)
                    return
                except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                conn.idle_since = None
                keep = await self._serve_one(head, writer)
                if not keep:
                    return
                timeout = self.idle_timeout
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self._conns.discard(conn)
            self._tasks.discard(task)
            writer.close()

    async def _serve_one(self, head: bytes, writer) -> bool:
        """Answer one request; True when the connection may carry another."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            await self._respond(writer, 400, b"", "text/plain", head_only=False, close=True)
            return False
        method, target, version = parts
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        conn_hdr = headers.get("connection", "").lower()
        close = conn_hdr == "close" or (version == "HTTP/1.0" and conn_hdr != "keep-alive")
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            close = True  # a GET with a body: answer, then close rather than parse the body
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"", "text/plain", head_only=False, close=True)
            return False
        path = target.split("?", 1)[0]
        route = self.routes.get(path)
        if route is not None and path not in OPEN_ROUTES and not self.authorized(headers.get("authorization", "")):
            await self._respond(writer, 401, b"unauthorized\n", "text/plain", head_only=method == "HEAD", close=close,
                                extra="WWW-Authenticate: Bearer\r\n")
            return not close
        if route is None:
            await self._respond(writer, 404, b"not found\n", "text/plain", head_only=method == "HEAD", close=close)
            return not close
        try:
            body, ctype = await asyncio.get_running_loop().run_in_executor(self._pool, route)
            code = 200
        except Exception:  # noqa: BLE001 - a failing status source must not kill the server
            body, ctype, code = b"internal error\n", "text/plain", 500
        await self._respond(writer, code, body, ctype, head_only=method == "HEAD", close=close)
        return not close

    def authorized(self, header: str) -> bool:
        """True without a configured token (local use), else for ``Bearer <token>`` of the right digest."""
        if self.token_sha256 is None:
            return True
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        return hmac.compare_digest(digest, self.token_sha256)

    async def _respond(self, writer, code: int, body: bytes, ctype: str, *, head_only: bool, close: bool,
                       extra: str = "") -> None:
        head = (f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"{extra}Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode()
        writer.write(head if head_only else head + body)
        await asyncio.wait_for(writer.drain(), self.write_timeout)
