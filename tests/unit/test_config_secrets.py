"""``pacs-bridge config --show`` output can be shared: every password and token is masked."""

from __future__ import annotations

import json

import pytest

from pacs_bridge.config import StorageSettings, load_settings

ARGON2 = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaA"
TOKEN_HASH = "sha256:" + "ab" * 32


def test_to_toml_dict_masks_database_web_and_destination_secrets() -> None:
    settings = load_settings(
        None,
        environ={},
        overrides={
            "storage": {"database_url": "postgresql+psycopg://bridge:p@ss:w0rd@db:5432/bridge?sslmode=require"},
            "web": {
                "users": [{"name": "admin", "password_hash": ARGON2}],
                "api_tokens": [TOKEN_HASH],
            },
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104},
                {
                    "name": "ris",
                    "type": "webhook",
                    "url": "https://hooks.example.org/ai",
                    "auth": "bearer",
                    "token": "bearer-token",
                },
                {
                    "name": "archive",
                    "type": "dicomweb",
                    "url": "https://archive.example.org/dicom-web",
                    "auth": "basic",
                    "username": "bridge",
                    "password": "archive-pw",
                },
            ],
        },
    )
    data = settings.to_toml_dict()
    text = json.dumps(data)
    for secret in ("p@ss:w0rd", "w0rd", ARGON2, TOKEN_HASH, "bearer-token", "archive-pw"):
        assert secret not in text, secret
    assert data["storage"]["database_url"] == "postgresql+psycopg://bridge:********@db:5432/bridge?sslmode=require"
    assert data["web"]["users"] == [{"name": "admin", "password_hash": "********"}]
    assert data["web"]["api_tokens"] == ["********"]
    assert data["destinations"][1]["token"] == "********"
    assert data["destinations"][2]["password"] == "********"
    assert data["destinations"][2]["username"] == "bridge"
    # The settings themselves keep the real values; only the printed form is masked.
    assert settings.web.users[0].password_hash == ARGON2
    assert settings.storage.resolved_database_url().startswith("postgresql+psycopg://bridge:p@ss:w0rd@db")


def test_empty_secrets_stay_empty() -> None:
    data = load_settings(
        None,
        environ={},
        overrides={"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "pacs", "port": 104}]},
    ).to_toml_dict()
    assert data["destinations"][0]["password"] == ""
    assert data["destinations"][0]["token"] == ""
    assert data["web"]["api_tokens"] == []


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bridge@db/bridge", "postgresql://bridge@db/bridge"),
        ("postgresql://db:5432/bridge", "postgresql://db:5432/bridge"),
        ("postgresql://u:secret@db/bridge", "postgresql://u:********@db/bridge"),
        (
            "postgresql://u@db/bridge?password=secret&sslmode=require",
            "postgresql://u@db/bridge?password=********&sslmode=require",
        ),
        ("sqlite:////var/lib/pacs-bridge/a@b/pacs-bridge.db", "sqlite:////var/lib/pacs-bridge/a@b/pacs-bridge.db"),
    ],
)
def test_display_database_url(url: str, shown: str) -> None:
    assert StorageSettings(database_url=url).display_database_url() == shown
