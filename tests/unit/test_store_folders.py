"""check_data_dir: every folder serve writes is created and probed; the first unusable one is named."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_bridge.config import Settings, load_settings
from pacs_bridge.errors import ConfigError
from pacs_bridge.store.folders import check_data_dir, data_folders


def _settings(tmp_path: Path, **storage: str) -> Settings:
    return load_settings(
        None,
        environ={},
        overrides={
            "storage": {"data_dir": str(tmp_path / "data"), **storage},
            "watch": {"inbox": str(tmp_path / "in")},
        },
    )


def test_creates_every_folder_and_leaves_no_probe(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    check_data_dir(settings)
    data = tmp_path / "data"
    for name in ("spool", "tmp", "outputs", "heatmaps", "failed"):
        assert (data / name).is_dir(), name
    assert (tmp_path / "in").is_dir()
    leftovers = [p for _, folder in data_folders(settings) for p in folder.iterdir() if p.is_file()]
    assert leftovers == []
    assert not (data / "pacs-bridge.db").exists()


def test_a_data_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    with pytest.raises(
        ConfigError, match=r"^\[storage\] data_dir .*/data cannot be used: it exists and is not a folder$"
    ):
        check_data_dir(_settings(tmp_path))


def test_a_database_path_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    settings = _settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'db'}")
    with pytest.raises(ConfigError, match=r"database file .*/db cannot be used: it is a folder"):
        check_data_dir(settings)


def test_the_folder_of_a_database_elsewhere_is_probed(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    settings = _settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'file' / 'pacs-bridge.db'}")
    with pytest.raises(ConfigError, match=r"^\[storage\] database_url folder .*/file cannot be used"):
        check_data_dir(settings)


@pytest.fixture
def immutable_database(tmp_path: Path) -> Iterator[Path]:
    """A database file that no one, root included, may open for writing (chattr +i)."""
    path = tmp_path / "data" / "pacs-bridge.db"
    path.parent.mkdir()
    path.write_bytes(b"")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_database_file_that_cannot_be_written(tmp_path: Path, immutable_database: Path) -> None:
    with pytest.raises(
        ConfigError, match=re.escape(f"database file {immutable_database} is not writable: Operation not permitted")
    ):
        check_data_dir(_settings(tmp_path))
