"""Logins, sessions, CSRF, tokens, throttling and the exposure rule of the console."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pacs_bridge.config import WebSettings, load_settings
from pacs_bridge.errors import ConfigError
from pacs_bridge.web.auth import (
    COOKIE_NAME,
    Authenticator,
    LoginThrottle,
    SessionSigner,
    check_exposure,
    hash_password,
    hash_token,
)
from tests.support.serve import free_port, run_cli
from tests.web.conftest import PASSWORD, TOKEN, WebRig, csrf_of, login


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_login_sets_a_strict_http_only_cookie_and_logout_ends_it(rig: WebRig) -> None:
    client = rig.client()
    response = login(client, next_path="/failures")
    assert response.status_code == 303 and response.headers["location"] == "/failures"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback
    assert PASSWORD not in cookie
    page = client.get("/studies")
    assert page.status_code == 200 and "alice" in page.text
    assert (
        page.headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in page.headers["content-security-policy"]
    )
    assert page.headers["cache-control"] == "no-store"
    csrf = csrf_of(client)
    assert client.post("/logout", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert client.get("/studies", follow_redirects=False).status_code == 303


def test_cookie_is_secure_behind_a_tls_proxy(make_rig: Any) -> None:
    client = make_rig(behind_tls_proxy=True).client()
    assert "Secure" in login(client).headers["set-cookie"]


def test_wrong_credentials_are_refused(rig: WebRig) -> None:
    client = rig.client()
    assert login(client, password="wrong").status_code == 401
    assert login(client, user="mallory", password=PASSWORD).status_code == 401
    assert client.get("/api/studies").status_code == 401
    assert client.get("/api/studies", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    # A forged cookie is no session.
    client.cookies.set(COOKIE_NAME, "eyJ1IjogImFsaWNlIn0.AAAA")
    assert client.get("/api/studies").status_code == 401


def test_login_form_needs_its_csrf_token_and_next_stays_on_site(rig: WebRig) -> None:
    client = rig.client()
    client.get("/login")
    forged = client.post(
        "/login", data={"username": "alice", "password": PASSWORD, "login_csrf": "guess"}, follow_redirects=False
    )
    assert forged.status_code == 403
    assert login(client, next_path="//evil.example/").headers["location"] == "/studies"


def test_state_changes_need_the_csrf_token_with_a_session_but_not_with_a_token(rig: WebRig) -> None:
    client = rig.client()
    login(client)
    csrf = csrf_of(client)
    unknown = "1.2.3.4"
    assert client.post(f"/api/studies/{unknown}/reanalyse").status_code == 403
    assert client.post(f"/api/studies/{unknown}/reanalyse", headers={"X-CSRF-Token": "x" + csrf}).status_code == 403
    assert client.post(f"/studies/{unknown}/resend", data={"csrf": "nope"}).status_code == 403
    assert client.post("/logout", data={}).status_code == 403
    assert client.post(f"/api/studies/{unknown}/reanalyse", headers={"X-CSRF-Token": csrf}).status_code == 404
    script = TestClient(rig.app)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert script.get("/api/studies", headers=bearer).status_code == 200
    assert script.post(f"/api/studies/{unknown}/reanalyse", headers=bearer).status_code == 404  # past auth


def test_sessions_expire(make_rig: Any) -> None:
    clock = Clock()
    rig = make_rig(app_kwargs={"signer": SessionSigner(30, clock=clock)}, session_minutes=30)
    client = rig.client()
    assert login(client).status_code == 303
    assert client.get("/api/studies").status_code == 200
    clock.now += 29 * 60
    assert client.get("/api/studies").status_code == 200
    clock.now += 2 * 60
    assert client.get("/api/studies").status_code == 401
    assert client.get("/studies", follow_redirects=False).headers["location"].startswith("/login")


def test_repeated_failed_logins_are_slowed_per_user_and_address(make_rig: Any) -> None:
    clock = Clock()
    rig = make_rig(app_kwargs={"throttle": LoginThrottle(free=3, clock=clock)})
    client = rig.client()
    for _ in range(3):
        assert login(client, password="wrong").status_code == 401
    fourth = login(client, password="wrong")
    assert fourth.status_code == 401 and "wait 1 s" in fourth.text
    # Now even the right password waits: the try is refused without checking it.
    refused = login(client)
    assert refused.status_code == 429 and "Too many failed logins" in refused.text
    clock.now += 1.5
    assert login(client).status_code == 303  # the wait is over; success clears the count

    throttle = LoginThrottle(free=2, max_seconds=60, clock=clock)
    waits = [throttle.failed("bob", "10.0.0.1") for _ in range(10)]
    assert waits == [0, 0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert throttle.wait_seconds("BOB", "10.0.0.1") == 60  # user names compare without case
    assert throttle.wait_seconds("bob", "10.0.0.2") == 0  # another address is not slowed
    assert throttle.wait_seconds("carol", "10.0.0.1") == 0  # nor another user
    throttle.succeeded("bob", "10.0.0.1")
    assert throttle.wait_seconds("bob", "10.0.0.1") == 0


def test_passwords_and_tokens_are_stored_as_hashes() -> None:
    web = WebSettings(
        users=[{"name": "alice", "password_hash": hash_password("s3cret-pass")}],  # type: ignore[list-item]
        api_tokens=[hash_token("tok")],
    )
    assert web.users[0].password_hash.startswith("$argon2id$")
    auth = Authenticator(web)
    assert auth.check_password("alice", "s3cret-pass") and not auth.check_password("alice", "s3cret-pas")
    assert auth.check_token("tok") is not None and auth.check_token("tok2") is None
    with pytest.raises(ValueError, match="argon2"):
        WebSettings(users=[{"name": "bob", "password_hash": "plain-text-password-here"}])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="sha256"):
        WebSettings(api_tokens=["tok"])
    proc = run_cli("web-hash-password", env={})
    assert proc.returncode == 1  # empty stdin: too short
    hashed = subprocess.run(
        [sys.executable, "-m", "pacs_bridge.cli", "web-hash-password"],
        input="a long enough password\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Authenticator(WebSettings(users=[{"name": "x", "password_hash": hashed}])).check_password(  # type: ignore[list-item]
        "x", "a long enough password"
    )


@pytest.mark.parametrize(
    ("web", "refused"),
    [
        ({"host": "0.0.0.0"}, "without authentication"),
        ({"host": "0.0.0.0", "api_tokens": [hash_token("t")]}, "without TLS"),
        ({"host": "10.1.2.3", "behind_tls_proxy": True}, "without authentication"),
        ({"host": "0.0.0.0", "api_tokens": [hash_token("t")], "behind_tls_proxy": True}, None),
        ({"host": "127.0.0.1"}, None),
        ({"host": "::1"}, None),
        ({"host": "localhost"}, None),
    ],
)
def test_exposure_rule(web: dict[str, Any], refused: str | None) -> None:
    settings = WebSettings(**web)
    if refused is None:
        check_exposure(settings)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_exposure(settings)


def test_serve_refuses_a_public_console_without_auth_and_tls(tmp_path: Path) -> None:
    config = tmp_path / "public.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[dicom]\nport = {free_port()}\n[analysis]\nenabled = false\n'
        f'[web]\nhost = "0.0.0.0"\nport = {free_port()}\n',
        encoding="utf-8",
    )
    load_settings(config, environ={})  # the file itself is valid
    proc = run_cli("serve", "--config", str(config), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "exposes the console" in proc.stderr and "without authentication" in proc.stderr
