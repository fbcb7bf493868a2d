"""Durable files: the spool of received instances, as received, byte for byte.

A file is written to ``<data_dir>/tmp/``, flushed and fsynced, then renamed
into ``<data_dir>/spool/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` and the
folder fsynced. A crash at any point leaves either no file or a whole file in
the spool; partial files can only exist in ``tmp/``, which is emptied at
start-up. Path components are UIDs validated against PS3.5 §9.1
(``[0-9.]{1,64}``) before they touch the file system.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pacs_bridge.errors import OutOfResources, RejectedInstance

__all__ = ["Spool", "fsync_dir", "valid_uid", "write_durably"]

LOGGER = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9.]{1,64}$")


def valid_uid(value: object) -> bool:
    """True if ``value`` is a UID made only of digits and dots, 1 to 64 characters."""
    return isinstance(value, str) and bool(_UID_RE.match(value)) and ".." not in value


def fsync_dir(path: Path) -> None:
    """fsync a folder so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(target: Path, chunks: Iterable[bytes], tmp_dir: Path, *, fsync: bool = True) -> int:
    """Write ``chunks`` to ``target`` through a temp file in ``tmp_dir``; return the size.

    ``target`` is replaced atomically if it exists.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, suffix=".part")
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                size += len(chunk)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp_name, target)
        if fsync:
            fsync_dir(target.parent)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return size


class Spool:
    """The folder of received instances under ``data_dir``."""

    def __init__(self, data_dir: Path, *, min_free_mb: float = 0, fsync: bool = True) -> None:
        self.root = Path(data_dir) / "spool"
        self.tmp = Path(data_dir) / "tmp"
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def clean_tmp(self) -> int:
        """Remove partial files left by a crash; return how many."""
        removed = 0
        for item in self.tmp.iterdir():
            if item.is_file():
                item.unlink()
                removed += 1
        return removed

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`OutOfResources` if storing ``incoming`` bytes would cross the watermark."""
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise OutOfResources(
                f"free disk {free // (1024 * 1024)} MiB is below the watermark of "
                f"{self.min_free_bytes // (1024 * 1024)} MiB ([storage] min_free_mb); free space or lower it"
            )

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        """Where an instance lives; both UIDs must be valid."""
        for name, uid in (("Study Instance UID", study_uid), ("SOP Instance UID", sop_uid)):
            if not valid_uid(uid):
                raise RejectedInstance(f"{name} {uid!r} is not a valid UID ([0-9.]{{1,64}})")
        return self.root / study_uid / f"{sop_uid}.dcm"

    def store(self, study_uid: str, sop_uid: str, chunks: Iterable[bytes], size_hint: int = 0) -> tuple[Path, int]:
        """Store an instance durably; return its path and size. An existing file is replaced."""
        target = self.path_for(study_uid, sop_uid)
        self.check_space(size_hint)
        try:
            size = write_durably(target, chunks, self.tmp, fsync=self.fsync)
        except OSError as exc:
            raise OutOfResources(f"cannot write {target.name}: {exc.strerror or exc}") from exc
        return target, size

    def files(self) -> Iterable[Path]:
        """Every stored instance file."""
        return self.root.glob("*/*.dcm")
