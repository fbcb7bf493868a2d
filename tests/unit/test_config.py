"""Settings: TOML, then environment, then flags; clear errors; the reference page is current."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_bridge.config import load_settings, settings_reference
from pacs_bridge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_need_no_file() -> None:
    settings = load_settings(None, environ={})
    assert settings.dicom.ae_title == "PACS_BRIDGE"
    assert settings.dicom.port == 11112
    assert settings.study.settle_seconds == 10
    assert settings.storage.resolved_database_url().startswith("sqlite:///")
    assert settings.inbox == settings.storage.data_dir / "inbox"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        """
[dicom]
ae_title = "BRIDGE"
port = 11000
allowed_calling_aets = ["PACS1", "PACS2@10.0.0.5"]
[storage]
data_dir = "/var/lib/pacs-bridge"
database_url = "postgresql+psycopg://bridge@db/bridge"
[watch]
inbox = "/srv/inbox"
[study]
settle_seconds = 30
[[destinations]]
name = "main-pacs"
ae_title = "PACS1"
host = "pacs.example.org"
port = 104
[web]
host = "0.0.0.0"
port = 8443
""",
        encoding="utf-8",
    )
    env = {"PACS_BRIDGE_DICOM_PORT": "11001", "PACS_BRIDGE_STUDY_MODALITIES": "DX,CR"}
    settings = load_settings(path, environ=env, overrides={"dicom": {"port": 11002}})
    assert settings.dicom.ae_title == "BRIDGE"
    assert settings.dicom.port == 11002
    assert settings.dicom.allowed_calling_aets == ["PACS1", "PACS2@10.0.0.5"]
    assert settings.study.modalities == ["DX", "CR"]
    assert settings.study.settle_seconds == 30
    assert settings.storage.resolved_database_url() == "postgresql+psycopg://bridge@db/bridge"
    assert settings.destinations[0].host == "pacs.example.org"
    assert settings.web.port == 8443
    assert str(settings.inbox) == "/srv/inbox"
    assert load_settings(path, environ=env).dicom.port == 11001


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[dicom]\nport = 0\n", "dicom.port"),
        ('[dicom]\nae_title = "A\\\\B"\n', "dicom.ae_title"),
        ("[dicom]\nunknown_key = 1\n", "dicom.unknown_key"),
        ("[study]\nsettle_seconds = -1\n", "study.settle_seconds"),
        ('[[destinations]]\nname = "x"\n', "destinations.0.ae_title"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ={})
    assert expected in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_reference_page_is_current() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page.strip() == settings_reference().strip(), "regenerate: pacs-bridge config --reference"
    for key in ("ae_title", "allowed_calling_aets", "data_dir", "database_url", "inbox", "settle_seconds"):
        assert f"`{key}`" in page


def test_shipped_production_example_loads() -> None:
    """deploy/pacs-bridge.example.toml is what an administrator copies: every key in it is valid."""
    settings = load_settings(ROOT / "deploy" / "pacs-bridge.example.toml", environ={})
    assert settings.dicom.host == "0.0.0.0" and settings.dicom.allowed_calling_aets
    assert settings.storage.fsync and settings.destinations[0].name == "pacs"
    assert settings.web.host == "127.0.0.1" and not settings.web.users
