"""A real HTTP server for tests (FHIR and webhook receivers), on a free localhost port.

Every request is kept (:attr:`HttpStub.requests`: method, path, headers,
body) and answered by :attr:`HttpStub.respond`, a function of the request
that returns ``(status, content type, body)``; the default answers
``200`` with an empty JSON object. Use it as a context manager::

    with HttpStub() as server:
        server.respond = lambda request: (500, "text/plain", b"down for maintenance")
        ...  # POST to server.url
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["HttpStub", "Reply", "StubRequest"]


@dataclass(frozen=True)
class StubRequest:
    """One request the stub received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Reply = tuple[int, str, bytes]


def _ok(request: StubRequest) -> Reply:
    return 200, "application/json", b"{}"


class HttpStub:
    """A threaded HTTP/1.1 server on 127.0.0.1 that records requests and answers with :attr:`respond`."""

    def __init__(self, respond: Callable[[StubRequest], Reply] = _ok) -> None:
        self.respond = respond
        self.requests: list[StubRequest] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = StubRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                stub.requests.append(request)
                status, content_type, payload = stub.respond(request)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-stub", daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> HttpStub:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
