"""What every request handler of the console reaches: settings, database, health, ingest, model, auth.

One :class:`Console` per web server, kept in ``app.state.console``; the
request helpers here find the caller (:func:`current_principal`) and enforce
login and CSRF (:func:`require_reader`, :func:`require_writer`).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request

from pacs_bridge.config import Settings
from pacs_bridge.health import Health
from pacs_bridge.store.db import Database
from pacs_bridge.web.auth import COOKIE_NAME, CSRF_HEADER, Authenticator, LoginThrottle, Principal, SessionSigner
from pacs_bridge.web.metrics import ServiceMetrics
from pacs_bridge.web.upload import UploadStore

__all__ = ["Console", "LoginRequired", "console_of", "current_principal", "require_reader", "require_writer"]

LOGGER = logging.getLogger(__name__)

# Paths answered in JSON (401) rather than with the login page.
_MACHINE_PREFIXES = ("/api/", "/dicomweb/", "/metrics", "/openapi.json")


@dataclass
class Console:
    """The state shared by the handlers of one web server."""

    settings: Settings
    db: Database
    health: Health
    ingestor: Any
    analyser_factory: Callable[[], Any | None]
    auth: Authenticator
    signer: SessionSigner
    throttle: LoginThrottle
    metrics: ServiceMetrics
    uploads: UploadStore = field(default_factory=UploadStore)
    _own_analyser: Any = None
    _own_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def secure_cookies(self) -> bool:
        """Cookies are marked Secure when the browser reaches the console over TLS."""
        web = self.settings.web
        return web.tls_cert is not None or web.behind_tls_proxy

    def analyser(self) -> Any | None:
        """The service's analyser; on a node that does not analyse, one loaded here on first use."""
        shared = self.analyser_factory()
        if shared is not None:
            return shared
        if not self.settings.analysis.enabled or "analyse" in self.settings.queue.roles:
            return None  # analysis is off, or this node's analyse stage has no model: say so, do not retry here
        with self._lock:
            if self._own_analyser is None and self._own_error is None:
                from pacs_bridge.service import load_analyser

                try:
                    self._own_analyser = load_analyser(self.settings)
                except Exception as exc:
                    self._own_error = str(exc)
                    LOGGER.error("web console: no model for uploads: %s", exc)
            return self._own_analyser

    def model_identity(self) -> tuple[str, str] | None:
        """Name and version of the model in use, if one is loaded."""
        analyser = self.analyser_factory()
        if analyser is None:
            analyser = self._own_analyser
        if analyser is None:
            return None
        manifest = analyser.model.manifest
        return str(manifest.name), str(manifest.version)


class LoginRequired(Exception):
    """A page was asked for without a valid login: the browser goes to the login page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def console_of(request: Request) -> Console:
    """The :class:`Console` of the app serving ``request``."""
    console: Console = request.app.state.console
    return console


def current_principal(request: Request) -> Principal | None:
    """The caller: a bearer token, or a valid session cookie; None if neither."""
    console = console_of(request)
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return console.auth.check_token(token.strip())
    return console.signer.read(request.cookies.get(COOKIE_NAME))


def _refuse(request: Request) -> Exception:
    path = request.url.path
    if path.startswith(_MACHINE_PREFIXES):
        return HTTPException(
            401,
            "authentication required: a console login or Authorization: Bearer <token>",
            {"WWW-Authenticate": "Bearer"},
        )
    return LoginRequired(path)


def require_reader(request: Request) -> Principal:
    """Dependency: a logged-in user or a token."""
    principal = current_principal(request)
    if principal is None:
        raise _refuse(request)
    request.state.principal = principal
    return principal


async def require_writer(request: Request) -> Principal:
    """Dependency for state-changing requests: as :func:`require_reader`, plus the CSRF token for a session."""
    principal = require_reader(request)
    if principal.via == "session":
        token = request.headers.get(CSRF_HEADER)
        content_type = request.headers.get("content-type", "")
        if token is None and content_type.startswith("application/x-www-form-urlencoded"):
            form = await request.form()
            value = form.get("csrf")
            token = value if isinstance(value, str) else None
        if not token or not hmac.compare_digest(token, principal.csrf):
            raise HTTPException(403, "missing or wrong CSRF token: reload the page and try again")
    return principal
