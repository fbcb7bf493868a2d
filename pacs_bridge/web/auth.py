"""Who may use the console and the HTTP API, and how a login is kept.

- Users come from ``[web] users`` (name and argon2id hash); with none
  configured and a loopback bind, :func:`first_login_password` makes a
  one-time ``admin`` password for this run, printed once on stderr.
- Scripts use ``Authorization: Bearer <token>``; ``[web] api_tokens`` holds
  only ``sha256:<hex>`` of each token (tokens are 256 random bits, so a fast
  hash is enough; passwords get argon2).
- A console login is a signed cookie (HMAC-SHA256 with a key made at start:
  a restart logs everyone out) holding the user, the expiry and the CSRF
  token; HttpOnly, SameSite=Strict, Secure when served over TLS.
- Every state-changing request with a cookie carries the CSRF token in the
  ``X-CSRF-Token`` header or a ``csrf`` form field (bearer tokens need none:
  a browser never sends them by itself).
- Failed logins are slowed per user and address (:class:`LoginThrottle`).
- :func:`check_exposure` refuses a console reachable from the network
  without authentication and TLS.

Nothing here logs a password, a token or a cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from pacs_bridge.config import WebSettings
from pacs_bridge.errors import ConfigError

__all__ = [
    "COOKIE_NAME",
    "CSRF_HEADER",
    "FIRST_LOGIN_USER",
    "Authenticator",
    "LoginThrottle",
    "Principal",
    "SessionSigner",
    "check_exposure",
    "first_login_password",
    "hash_password",
    "hash_token",
    "is_loopback",
    "new_token",
]

LOGGER = logging.getLogger(__name__)

COOKIE_NAME = "pb_session"
CSRF_HEADER = "X-CSRF-Token"
FIRST_LOGIN_USER = "admin"

_HASHER = PasswordHasher()
# Verifying against this keeps an unknown user name as slow as a wrong password.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """The argon2id hash of ``password``, for ``[[web.users]] password_hash``."""
    return _HASHER.hash(password)


def new_token() -> str:
    """A fresh API token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """``sha256:<hex>`` of ``token``, for ``[web] api_tokens``."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(web: WebSettings) -> None:
    """Raise ConfigError if the console would be reachable from the network unprotected.

    A non-loopback bind needs users or API tokens (authentication) and
    ``tls_cert``/``tls_key`` or ``behind_tls_proxy = true`` (TLS), since the
    console shows patient data and passwords travel to it.
    """
    if is_loopback(web.host):
        return
    missing = []
    if not web.users and not web.api_tokens:
        missing.append("authentication ([[web.users]] or [web] api_tokens)")
    if web.tls_cert is None and not web.behind_tls_proxy:
        missing.append("TLS ([web] tls_cert and tls_key, or behind_tls_proxy = true)")
    if missing:
        raise ConfigError(
            f"[web] host = {web.host!r} exposes the console (patient data) to the network without "
            + " and without ".join(missing)
            + "; bind it to 127.0.0.1, or configure what is missing (docs/console.md)"
        )
    for path in (web.tls_cert, web.tls_key):
        if path is not None and not path.is_file():
            raise ConfigError(f"[web] TLS file not found: {path}")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a console user (cookie, needs CSRF) or an API token."""

    name: str
    via: str  # "session" or "token"
    csrf: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Makes and checks the session cookie: ``payload.signature``, both base64url."""

    def __init__(self, minutes: float, *, key: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self.seconds = minutes * 60.0
        self._key = key or secrets.token_bytes(32)
        self._clock = clock

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(self, user: str) -> tuple[str, str]:
        """A new cookie value for ``user`` and its CSRF token."""
        csrf = secrets.token_urlsafe(24)
        payload = json.dumps({"u": user, "exp": self._clock() + self.seconds, "csrf": csrf}).encode()
        return f"{_b64(payload)}.{_b64(self._sign(payload))}", csrf

    def read(self, cookie: str | None) -> Principal | None:
        """The session in ``cookie`` if the signature holds and it has not expired."""
        if not cookie or "." not in cookie:
            return None
        payload_text, _, signature_text = cookie.partition(".")
        try:
            payload = _unb64(payload_text)
            signature = _unb64(signature_text)
        except (ValueError, TypeError):
            return None
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(payload)
            user, expires, csrf = str(data["u"]), float(data["exp"]), str(data["csrf"])
        except (ValueError, KeyError, TypeError):
            return None
        if self._clock() >= expires:
            return None
        return Principal(user, "session", csrf)


class LoginThrottle:
    """Slows repeated failed logins per (user, address): after ``free`` failures each try waits longer.

    The wait after the n-th consecutive failure (n > ``free``) is
    ``2 ** (n - free - 1)`` seconds, at most ``max_seconds``; a success clears
    the count. Entries of quiet pairs are forgotten after an hour.
    """

    def __init__(
        self, *, free: int = 3, max_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.free = free
        self.max_seconds = max_seconds
        self._clock = clock
        self._failures: dict[tuple[str, str], tuple[int, float, float]] = {}
        self._lock = threading.Lock()

    def wait_seconds(self, user: str, address: str) -> float:
        """Seconds before this pair may try again (0 = now)."""
        with self._lock:
            entry = self._failures.get((user.lower(), address))
        if entry is None:
            return 0.0
        _count, not_before, _last = entry
        return max(0.0, not_before - self._clock())

    def failed(self, user: str, address: str) -> float:
        """Record a failure; the wait it imposes."""
        now = self._clock()
        key = (user.lower(), address)
        with self._lock:
            self._forget_old(now)
            count = self._failures.get(key, (0, 0.0, 0.0))[0] + 1
            wait = 0.0 if count <= self.free else min(2.0 ** (count - self.free - 1), self.max_seconds)
            self._failures[key] = (count, now + wait, now)
        return wait

    def succeeded(self, user: str, address: str) -> None:
        """Clear the pair's failures."""
        with self._lock:
            self._failures.pop((user.lower(), address), None)

    def _forget_old(self, now: float) -> None:
        if len(self._failures) < 1000:
            return
        for key in [k for k, (_c, _nb, last) in self._failures.items() if now - last > 3600]:
            del self._failures[key]


class Authenticator:
    """Checks passwords and tokens against ``[web]``, or against the one-time first-login password."""

    def __init__(self, web: WebSettings, *, first_login_password: str | None = None) -> None:
        self._users = {user.name: user.password_hash for user in web.users}
        if not self._users and first_login_password:
            self._users[FIRST_LOGIN_USER] = hash_password(first_login_password)
        self._tokens = {value.removeprefix("sha256:") for value in web.api_tokens}

    @property
    def has_users(self) -> bool:
        """True when someone can log in."""
        return bool(self._users)

    def check_password(self, name: str, password: str) -> bool:
        """True if ``password`` is ``name``'s (constant work for unknown names)."""
        stored = self._users.get(name)
        try:
            return _HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def check_token(self, token: str) -> Principal | None:
        """The principal of a bearer token, or None."""
        digest = hash_token(token).removeprefix("sha256:")
        for known in self._tokens:
            if hmac.compare_digest(known, digest):
                return Principal(f"token:{digest[:8]}", "token")
        return None


def first_login_password() -> str:
    """A one-time password for the ``admin`` user of this run (no users configured, loopback only)."""
    return secrets.token_urlsafe(12)
