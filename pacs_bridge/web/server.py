"""The console's HTTP server: uvicorn in a background thread of ``pacs-bridge serve``.

:class:`WebServer` checks that the console is not exposed unprotected
(:func:`pacs_bridge.web.auth.check_exposure`), binds the socket itself (so
that a port in use is a clear ConfigError at start), serves HTTPS when
``[web] tls_cert``/``tls_key`` are set, and stops with the service. uvicorn's
own access log is off: the app logs method, path and status without the
query string. With no ``[[web.users]]`` on a loopback bind, a one-time
``admin`` password is made for this run and printed once on stderr, never
to the log.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn

from pacs_bridge.config import Settings
from pacs_bridge.errors import ConfigError
from pacs_bridge.health import Health
from pacs_bridge.store.db import Database
from pacs_bridge.web.app import create_app
from pacs_bridge.web.auth import FIRST_LOGIN_USER, check_exposure, first_login_password, is_loopback

__all__ = ["WebServer"]

LOGGER = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve the web console on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class WebServer:
    """The console and HTTP API of one node, served until :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        health: Health,
        ingestor: Any,
        analyser_factory: Callable[[], Any | None],
    ) -> None:
        check_exposure(settings.web)
        self.settings = settings
        self.password: str | None = None
        if not settings.web.users and is_loopback(settings.web.host):
            self.password = first_login_password()
        self.app = create_app(settings, db, health, ingestor, analyser_factory, first_login_password=self.password)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        """Where the console answers."""
        web = self.settings.web
        scheme = "https" if web.tls_cert is not None else "http"
        host = f"[{web.host}]" if ":" in web.host else web.host
        return f"{scheme}://{host}:{web.port}/"

    def start(self, timeout: float = 30.0) -> None:
        """Bind and serve in a background thread; raises ConfigError if the port cannot be bound."""
        web = self.settings.web
        self._socket = _bind(web.host, web.port)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            server_header=False,
            lifespan="off",
            ssl_certfile=str(web.tls_cert) if web.tls_cert else None,
            ssl_keyfile=str(web.tls_key) if web.tls_key else None,
            proxy_headers=web.behind_tls_proxy,
            forwarded_allow_ips="127.0.0.1,::1" if web.behind_tls_proxy else None,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        sockets = [self._socket]
        self._thread = threading.Thread(
            target=lambda: self._server.run(sockets=sockets) if self._server else None, name="web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the web console did not start on {web.host}:{web.port}; see the log")
            time.sleep(0.05)
        LOGGER.info("web console and HTTP API on %s", self.url)
        if self.password is not None:
            # On the console only, once: the log file at INFO never holds it.
            print(
                f"pacs-bridge web console: {self.url} - log in as {FIRST_LOGIN_USER!r} with the one-time password "
                f"{self.password} (valid until the service stops; add [[web.users]] to choose your own, "
                "see docs/console.md)",
                file=sys.stderr,
                flush=True,
            )

    def stop(self) -> None:
        """Finish requests in flight (a few seconds at most) and close the socket."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
