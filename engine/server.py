"""The engine's HTTP side: /metrics for Prometheus, /v1/status for the operator, /healthz for probes."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class EngineServer:
    def __init__(self, host: str, port: int, status: Callable[[], dict], metrics: Callable[[], tuple[bytes, str]]):
        routes = {
            "/v1/status": lambda: (json.dumps(status()).encode(), "application/json"),
            "/metrics": metrics,
            "/healthz": lambda: (b"ok\n", "text/plain"),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                body, ctype = route()
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: scrapes every few seconds are not news
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="muxtune-http", daemon=True)

    def start(self) -> EngineServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
