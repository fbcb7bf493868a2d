"""What the HTTP destinations share: the client (authentication, TLS verification) and how answers are classified.

Used by STOW-RS (PS3.18 §10.5), FHIR R4 and webhook delivery. The client
sends HTTP basic (RFC 7617) or bearer (RFC 6750) credentials when the
destination asks for them, verifies the server's certificate against
``tls_ca`` (or the system's CAs) unless ``verify_tls`` is off, presents
``tls_cert``/``tls_key`` when set, and follows no redirects (a moved
endpoint is a configuration matter, reported rather than followed).

Failures are classified once, here: no connection, a timeout, HTTP 408,
425, 429 and 5xx are transient; the other 3xx and 4xx answers (400, 401,
403, 404, 409, 413, 415, 422, ...) are permanent, because the same
request would get the same answer.
"""

from __future__ import annotations

import logging
import ssl

import httpx

import pacs_bridge
from pacs_bridge.config import DestinationSettings
from pacs_bridge.send.dimse import Failure

__all__ = ["describe_response", "http_client", "http_failure", "transport_error"]

LOGGER = logging.getLogger(__name__)

_TRANSIENT_STATUSES = frozenset({408, 425, 429})
_BODY_CHARS = 300
"""How much of an error answer's body goes into the error text (servers explain themselves there)."""


def _verify(destination: DestinationSettings) -> ssl.SSLContext | bool:
    if not destination.verify_tls:
        LOGGER.warning("destination %s: TLS certificate verification is off", destination.name)
        return False
    cafile = str(destination.tls_ca) if destination.tls_ca else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.tls_cert is not None:
        context.load_cert_chain(
            str(destination.tls_cert), str(destination.tls_key) if destination.tls_key is not None else None
        )
    return context


def http_client(destination: DestinationSettings, timeout: float) -> httpx.Client:
    """An HTTP client for ``destination``: its credentials, its TLS settings, ``timeout`` seconds per operation."""
    headers = {"User-Agent": f"pacs-bridge/{pacs_bridge.__version__}"}
    auth: httpx.Auth | None = None
    if destination.auth == "basic":
        auth = httpx.BasicAuth(destination.username, destination.password)
    elif destination.auth == "bearer":
        headers["Authorization"] = f"Bearer {destination.token}"
    return httpx.Client(
        auth=auth,
        headers=headers,
        verify=_verify(destination),
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
    )


def http_failure(status_code: int) -> Failure:
    """Transient for 408, 425, 429 and 5xx; permanent for the other non-2xx answers."""
    if status_code >= 500 or status_code in _TRANSIENT_STATUSES:
        return Failure.TRANSIENT
    return Failure.PERMANENT


def describe_response(response: httpx.Response) -> str:
    """``HTTP 403 Forbidden from <url>: <start of the body>``, for logs and ``last_error``."""
    body = response.text.strip().replace("\n", " ")
    if len(body) > _BODY_CHARS:
        body = body[:_BODY_CHARS] + "..."
    text = f"HTTP {response.status_code} {response.reason_phrase} from {response.request.url.copy_with(query=None)}"
    return f"{text}: {body}" if body else text


def transport_error(destination: DestinationSettings, exc: Exception) -> str:
    """The reason an HTTP request got no answer (refused, timed out, TLS, name resolution)."""
    if isinstance(exc, httpx.TimeoutException):
        what = "no answer in time"
    elif isinstance(exc, httpx.ConnectError):
        what = "cannot connect"
    else:
        what = "request failed"
    return f"{what} to {destination.name} ({destination.address}): {type(exc).__name__}: {exc}"
