"""The data folder, checked before anything starts.

``pacs-bridge serve`` writes in several folders: the spool and its ``tmp/``
(received instances, PS3.10 files as received), ``outputs/`` (the result
objects sent back), ``heatmaps/``, ``failed/`` (dropped files that are not
DICOM), the watched inbox, and the SQLite database file. A folder it cannot
write would otherwise surface as a database or file-system traceback half-way
through start-up, or later as a failed C-STORE (PS3.4 B.2.3, status 0xA700).
:func:`check_data_dir` creates each folder when missing and writes and
removes a probe file in it, so that an unusable folder stops the start with
one line that names the folder and the reason.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pacs_bridge.config import Settings
from pacs_bridge.errors import ConfigError

__all__ = ["check_data_dir", "data_folders", "sqlite_database_path"]

LOGGER = logging.getLogger(__name__)

# A dot name ending in .tmp: the folder watcher skips such files, so a probe in the inbox is never ingested.
_PROBE_PREFIX = ".pacs-bridge-write-probe-"
_PROBE_SUFFIX = ".tmp"


def sqlite_database_path(url: str) -> Path | None:
    """The file of a SQLite URL (``sqlite:///path``), or None for another database or an in-memory one."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def data_folders(settings: Settings) -> list[tuple[str, Path]]:
    """Every folder that ``serve`` writes, each with the setting it comes from, in the order they are checked.

    The watched inbox and ``failed/`` belong to the ``receive`` role; other nodes do not need them.
    """
    data_dir = settings.storage.data_dir
    folders = [("[storage] data_dir", data_dir)]
    folders += [(f"[storage] data_dir {name}/", data_dir / name) for name in ("spool", "tmp", "outputs", "heatmaps")]
    if settings.watch.enabled and "receive" in settings.queue.roles:
        folders.append(("[storage] data_dir failed/", data_dir / "failed"))
        folders.append(("[watch] inbox", Path(settings.inbox)))
    database = sqlite_database_path(settings.storage.resolved_database_url())
    if database is not None and database.parent != data_dir:
        folders.append(("[storage] database_url folder", database.parent))
    return folders


def _reason(exc: OSError) -> str:
    if exc.errno is not None:
        return exc.strerror or os.strerror(exc.errno)
    return str(exc)


def _check_folder(what: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise ConfigError(f"{what} {folder} cannot be used: it exists and is not a folder") from exc
    except OSError as exc:
        raise ConfigError(f"{what} {folder} cannot be created: {_reason(exc)}") from exc
    if not folder.is_dir():
        raise ConfigError(f"{what} {folder} cannot be used: it exists and is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, suffix=_PROBE_SUFFIX, dir=folder)
    except OSError as exc:
        raise ConfigError(f"{what} {folder} is not writable: {_reason(exc)}") from exc
    try:
        os.close(fd)
    finally:
        try:
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"{what} {folder} is not writable: {_reason(exc)}") from exc


def _check_database_file(path: Path) -> None:
    """An existing SQLite file must open for writing (its folder was probed already)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise ConfigError(f"[storage] database file {path} cannot be used: it is a folder") from exc
        raise ConfigError(f"[storage] database file {path} is not writable: {_reason(exc)}") from exc
    os.close(fd)


def check_data_dir(settings: Settings) -> None:
    """Create every folder ``serve`` writes and probe it with a file; raise ConfigError naming the first that fails.

    Also checks that an existing SQLite database file opens for writing.
    Other databases (PostgreSQL) are checked when they are opened.
    """
    for what, folder in data_folders(settings):
        _check_folder(what, folder)
    database = sqlite_database_path(settings.storage.resolved_database_url())
    if database is not None:
        _check_database_file(database)
    LOGGER.debug("data folders writable under %s", settings.storage.data_dir)
