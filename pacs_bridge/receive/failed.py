"""The failed folder: files that could not be ingested, each kept with the reason why.

``<data_dir>/failed/<stamp>-<name>`` holds the file as it was found (moved,
never rewritten) and ``<stamp>-<name>.reason.txt`` beside it says where it
came from and why it failed. Nothing is deleted: an administrator can fix
and drop a file back into the inbox. The folder is 0700 and every file in
it 0600, since the files hold patient data. Names are made from the
original file name reduced to ``[A-Za-z0-9._-]``, never from dataset values.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path

from pacs_bridge.store.spool import PRIVATE_FILE_MODE, fsync_dir, make_private_dir

__all__ = ["FailedFolder"]

LOGGER = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class FailedFolder:
    """Moves files that failed into ``folder`` with a reason file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def _target(self, name: str, prefix: str) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        with self._lock:
            serial = next(self._counter)
        safe = _SAFE_NAME.sub("_", name)[:100].lstrip(".") or "file"
        return self.folder / f"{prefix}{stamp}-{serial}-{safe}"

    def keep(self, path: Path, reason: str, *, origin: str) -> Path:
        """Move ``path`` (a file, a symbolic link or a FIFO: moved as it is) here; its new path.

        Raises :class:`OSError` when it cannot be moved (the caller decides what to do).
        """
        make_private_dir(self.folder)
        target = self._target(path.name, "spool-" if origin == "spool" else "")
        os.replace(path, target)
        try:
            if not target.is_symlink():
                target.chmod(PRIVATE_FILE_MODE)
        except OSError:
            pass  # a FIFO or a file we do not own: the 0700 folder still keeps it private
        note = target.with_name(target.name + ".reason.txt")
        fd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"file: {path}\nfrom: {origin}\nreason: {reason}\nat: {datetime.now(UTC).isoformat()}\n")
        fsync_dir(self.folder)
        return target
