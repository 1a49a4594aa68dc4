"""HTTP errors in OpenAI's shape ({"error": {"message", "type", "param", "code"}}), with Retry-After
where a client should come back later."""
from __future__ import annotations

from aiohttp import web

from muxtune.engine.serve import protocol
from muxtune.engine.serve.request import Failed


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.retry_after = status, kind, param, code, retry_after

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response(protocol.error_body(str(self), self.kind, self.param, self.code),
                                 status=self.status, headers=headers)


def failed(f: Failed) -> HttpError:
    """An engine-side failure of a request not yet answered."""
    kind = "invalid_request_error" if f.status < 500 else "server_error"
    return HttpError(f.status, f.message, kind, code="model_not_found" if f.status == 404 else None,
                     retry_after=5 if f.status == 503 else None)
