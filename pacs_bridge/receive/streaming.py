"""C-STORE data sets written to the spool's temp folder while their fragments arrive.

A C-STORE request's data set comes as P-DATA-TF fragments (PS3.8 §9.3.5,
PS3.8 Annex E). By default pynetdicom gathers them in memory, and the handler
then copies them twice more (the data set, then the PS3.10 file) before a
byte reaches the disk: a 7 MB radiograph is held three or four times, and
the disk waits until the last fragment is in. pynetdicom's documented switch
``_config.STORE_RECV_CHUNKED_DATASET`` writes each fragment to a temporary
file in the DICOM File Format instead (PS3.10 §7: preamble, ``DICM``, File
Meta Information built from the request and its presentation context, then
the data set as received) and hands the handler its path
(``Event.dataset_path``).

:func:`stream_into` turns that on and has those files made in the spool's
``tmp/`` folder, named like the spool's own temp files
(``<node>.<pid>.<random>.part``), so that

- a complete one is linked into the spool without a copy
  (:meth:`pacs_bridge.store.spool.Spool.place`): only its fsync is left when
  the last fragment is in;
- the leftovers of a crash are removed at start-up by
  :meth:`~pacs_bridge.store.spool.Spool.clean_tmp`, never another node's;
- a write that fails (a full disk) is remembered, not raised: raised in
  pynetdicom's reader thread it would drop the association without an
  answer; remembered, the handler answers 0xA700 (Out of Resources,
  PS3.4 B.2.3) and the sender keeps the instance.

The C-STORE requests of the listener are read by :mod:`pacs_bridge.receive.pdata`,
which makes its temp files with :func:`temp_file_factory`; pynetdicom, when it
serves a request, uses the same factory. Whichever wrote the file closes and
removes it once the store has answered; the spool's link to it stays. The setting and the temp-file factory belong
to the process: one receiving service per process.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from pynetdicom import _config, dimse_messages

__all__ = ["SpoolTempFile", "stream_into", "take_write_error", "temp_file_factory"]

LOGGER = logging.getLogger(__name__)

_ERRORS: dict[str, OSError] = {}
_ERRORS_LOCK = threading.Lock()
_MAX_ERRORS = 1000
_FACTORY: list[Callable[[], SpoolTempFile]] = []


# Early write-back: once this much is written, the disk starts on it while the rest arrives.
_EARLY_SYNC_BYTES = 1 << 20
_SYNCER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="early-sync")


class SpoolTempFile:
    """The file pynetdicom writes a data set into: unbuffered, and a failed write is kept, not raised.

    It offers what pynetdicom uses of ``NamedTemporaryFile``: ``name``,
    ``write``, ``file.flush`` and ``close``. With ``early_sync``, every MiB
    written is handed to an ``fdatasync`` in another thread, so that the
    disk writes a large data set while the network still brings it and the
    fsync before the answer only waits for its tail.
    """

    def __init__(self, folder: Path, prefix: str, early_sync: bool = False) -> None:
        self._fd: int | None = None
        self.error: OSError | None = None
        self._early_sync = early_sync
        self._unsynced = 0
        self._sync: Future[None] | None = None
        try:
            self._fd, self.name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".part")  # 0600, unique
        except OSError as exc:
            self.name = str(folder / f"{prefix}{uuid.uuid4().hex}.unwritten")  # never created
            self._failed(exc)

    @property
    def file(self) -> SpoolTempFile:
        """pynetdicom flushes ``file`` after each fragment; the writes are unbuffered already."""
        return self

    def flush(self) -> None:
        """Nothing is buffered here."""

    def write(self, data: Any) -> int:
        """Write all of ``data``; after a failure, drop it and every later write."""
        view = memoryview(data).cast("B")
        if self._fd is None or self.error is not None:
            return len(view)
        try:
            written = 0
            while written < len(view):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            self._failed(exc)
            return len(view)
        self._unsynced += written
        if self._early_sync and self._unsynced >= _EARLY_SYNC_BYTES and (self._sync is None or self._sync.done()):
            self._unsynced = 0
            self._sync = _SYNCER.submit(_datasync, self._fd)
        return len(view)

    def _failed(self, exc: OSError) -> None:
        self.error = exc
        with _ERRORS_LOCK:
            if len(_ERRORS) >= _MAX_ERRORS:
                _ERRORS.clear()  # entries of associations that ended mid-message
            _ERRORS[self.name] = exc

    def close(self) -> None:
        """Close the file (pynetdicom removes it after the handler)."""
        if self._fd is not None:
            if self._sync is not None:
                wait([self._sync])  # never close a descriptor an fdatasync still uses
            fd, self._fd = self._fd, None
            os.close(fd)


def _datasync(fd: int) -> None:
    try:
        os.fdatasync(fd)
    except OSError:
        pass  # only an early start: the fsync before the answer reports what matters


def take_write_error(path: Path | str) -> OSError | None:
    """The error that stopped writing the temp file ``path``, if one did (asked once per file)."""
    with _ERRORS_LOCK:
        return _ERRORS.pop(str(path), None)


def stream_into(folder: Path, prefix: str, *, early_sync: bool = True) -> None:
    """Have C-STORE data sets written into ``folder`` as they arrive, with ``prefix`` names."""

    def make(*_args: Any, **_kwargs: Any) -> SpoolTempFile:
        return SpoolTempFile(folder, prefix, early_sync)

    _FACTORY[:] = [make]
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom names the factory it calls for each received data set; it gets ours.
    dimse_messages.NamedTemporaryFile = make  # type: ignore[attr-defined,assignment]
    LOGGER.debug("C-STORE data sets are written into %s as they arrive", folder)


def temp_file_factory() -> Callable[[], SpoolTempFile] | None:
    """What makes the temp file of a data set as it arrives, once :func:`stream_into` has set it; else None."""
    return _FACTORY[0] if _FACTORY else None
