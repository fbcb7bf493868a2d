"""The folder watcher: DICOM files dropped into the inbox take the C-STORE path.

watchdog reports new and moved files; a periodic rescan catches anything it
missed (network shares, files present at start-up). A file is read only after
its size and modification time have been unchanged for ``stable_seconds``
(it may still be being copied). Files are DICOM Part 10 files (PS3.10 §7).

Only regular files inside the inbox are read: an entry is checked with
``lstat`` (a symbolic link, to a file or a folder, is never followed), opened
with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO or device cannot block the watcher)
and checked again with ``fstat`` after opening (it may have been swapped).
Every entry is handled once:

- ingested (or a duplicate): removed from the inbox;
- refused for what it is (not DICOM, bad UIDs, truncated pixel data, a
  symbolic link, a FIFO, too large, any error while handling it): moved to
  ``<data_dir>/failed/`` with a ``.reason.txt`` beside it;
- refused for a passing reason (disk below the watermark, database busy):
  left in the inbox and tried again later, with a growing pause, logged once;
- if it cannot even be moved to ``failed/``: remembered, logged once, and
  not tried again until it changes.

So one bad file costs one attempt, never a hot loop, and never delays the
files after it. File names are the sender's: INFO lines name the instance
by UID only, and a line that must name the file shows it with every
non-printable character escaped (no forged or disguised log lines).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from pacs_bridge.logsafe import redact
from pacs_bridge.receive.decode import InflatesTooLarge, NotDicom, dataset_from_part10
from pacs_bridge.receive.failed import FailedFolder
from pacs_bridge.receive.ingest import Ingestor

__all__ = ["FolderWatcher"]

LOGGER = logging.getLogger(__name__)

_MAX_RETRY_SECONDS = 60.0


@dataclass
class _Seen:
    size: int
    mtime: float
    since: float


@dataclass
class _Deferred:
    """A file refused for a passing reason, or one that cannot be moved: when to look at it again."""

    size: int
    mtime: float
    not_before: float
    delay: float


def _shown(name: str) -> str:
    """A file name as a log line may show it: every non-printable character escaped.

    A line break would forge a log line, a bidirectional control character
    would disguise one, and a name that is not valid UTF-8 arrives as lone
    surrogates; all of them appear as ``\\n``, ``\\u202e``, ``\\udcff``.
    """
    return "".join(ch if ch.isprintable() and ch != "\\" else ascii(ch)[1:-1] for ch in name)


class _FileFailed(Exception):
    """This file fails for good: move it to failed/ with the message as the reason."""


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.wake.set()


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link (not followed)"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes; raises :class:`_FileFailed`."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno in (getattr(os, "ELOOP", 40), getattr(os, "EMLINK", 31)):
            raise _FileFailed("a symbolic link (not followed)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _FileFailed(_kind(st.st_mode))
        if st.st_size > limit:
            raise _FileFailed(f"{st.st_size} bytes exceeds [dicom] max_instance_mb")
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise _FileFailed("grew past [dicom] max_instance_mb while being read")
    return data


class FolderWatcher:
    """Watches one inbox folder and ingests what lands there."""

    def __init__(
        self,
        inbox: Path,
        failed_dir: Path,
        ingestor: Ingestor,
        *,
        stable_seconds: float,
        poll_seconds: float,
        on_stored: Any,
    ) -> None:
        self.inbox = inbox
        self.failed_dir = failed_dir
        self.failed = FailedFolder(failed_dir)
        self.ingestor = ingestor
        self.stable_seconds = stable_seconds
        self.poll_seconds = poll_seconds
        self.on_stored = on_stored
        self._seen: dict[Path, _Seen] = {}
        self._deferred: dict[Path, _Deferred] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None
        self._scan_error: str | None = None

    def start(self) -> None:
        """Start watching in the background."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(_Wake(self._wake), str(self.inbox), recursive=True)
        self._observer.start()
        self._thread = threading.Thread(target=self._run, name="folder-watcher", daemon=True)
        self._thread.start()
        LOGGER.info("watching %s (failed files go to %s)", self.inbox, self.failed_dir)

    def stop(self) -> None:
        """Stop after the file being ingested, if any."""
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        pause = min(self.poll_seconds, max(self.stable_seconds / 2, 0.2))
        while not self._stop.is_set():
            try:
                self.scan()
                if self._scan_error is not None:
                    LOGGER.info("inbox %s can be scanned again", self.inbox)
                    self._scan_error = None
            except Exception as exc:
                # The inbox itself is unreadable (removed, permissions): say so once, keep the usual pace.
                text = redact(str(exc)) or type(exc).__name__
                if text != self._scan_error:
                    LOGGER.error("inbox %s cannot be scanned: %s; retrying every %.1f s", self.inbox, text, pause)
                    self._scan_error = text
            self._wake.wait(timeout=pause)
            self._wake.clear()

    def scan(self, now: float | None = None) -> int:
        """Handle every stable entry once; return how many were handled."""
        now = time.monotonic() if now is None else now
        present: set[Path] = set()
        handled = 0
        for root, dirs, files in os.walk(self.inbox, followlinks=False):
            for name in list(dirs):
                if name.startswith("."):
                    dirs.remove(name)
                elif (Path(root) / name).is_symlink():
                    # os.walk does not descend into it; it is an entry of its own, handled like a file.
                    dirs.remove(name)
                    files.append(name)
            for name in files:
                if name.startswith(".") or name.endswith((".part", ".tmp")):
                    continue
                path = Path(root) / name
                try:
                    st = path.lstat()
                except FileNotFoundError:
                    continue
                present.add(path)
                deferred = self._deferred.get(path)
                if deferred is not None:
                    changed = deferred.size != st.st_size or deferred.mtime != st.st_mtime
                    if not changed and now < deferred.not_before:
                        continue
                seen = self._seen.get(path)
                if seen is None or seen.size != st.st_size or seen.mtime != st.st_mtime:
                    self._seen[path] = _Seen(st.st_size, st.st_mtime, now)
                    if self.stable_seconds > 0 and stat.S_ISREG(st.st_mode):
                        continue
                    seen = self._seen[path]
                if stat.S_ISREG(st.st_mode) and now - seen.since < self.stable_seconds:
                    continue
                if self._stop.is_set():
                    return handled
                self._handle(path, st, now)
                self._seen.pop(path, None)
                handled += 1
        for gone in set(self._seen) - present:
            self._seen.pop(gone, None)
        for gone in set(self._deferred) - present:
            self._deferred.pop(gone, None)
        return handled

    def _handle(self, path: Path, st: os.stat_result, now: float) -> None:
        """One attempt at one entry; never raises."""
        try:
            if not stat.S_ISREG(st.st_mode):
                raise _FileFailed(_kind(st.st_mode))
            data = _read_regular(path, self.ingestor.max_instance_bytes)
            try:
                ds = dataset_from_part10(data, self.ingestor.max_instance_bytes)
            except (NotDicom, InflatesTooLarge) as exc:
                raise _FileFailed(str(exc)) from None
            ts = ds.file_meta.get("TransferSyntaxUID")
            if ts is None:
                raise _FileFailed("no Transfer Syntax UID in the file meta information")
            outcome = self.ingestor.ingest(
                ds, (data,), size=len(data), transfer_syntax=str(ts), calling_aet=None, source="folder"
            )
        except _FileFailed as exc:
            self._fail(path, st, now, str(exc))
            return
        except Exception as exc:
            self._fail(path, st, now, f"{type(exc).__name__}: {redact(str(exc))}")
            return
        if not outcome.ok:
            if outcome.retryable:
                self._defer(path, st, now, f"refused for now (0x{outcome.status:04X}): {outcome.message}")
            else:
                self._fail(path, st, now, f"refused (0x{outcome.status:04X}): {outcome.message}")
            return
        self._deferred.pop(path, None)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self._defer(path, st, now, f"ingested, but cannot be removed from the inbox: {exc.strerror or exc}")
        # File names are the sender's to choose and often carry the patient's name: not at INFO.
        LOGGER.info(
            "inbox file ingested as %s of study %s%s",
            outcome.sop_instance_uid,
            outcome.study_instance_uid,
            " (duplicate)" if outcome.duplicate else "",
        )
        LOGGER.debug("inbox file %s was instance %s", _shown(path.name), outcome.sop_instance_uid)
        if not outcome.duplicate and outcome.study_instance_uid:
            self.on_stored(outcome.study_instance_uid)

    def _defer(self, path: Path, st: os.stat_result, now: float, reason: str) -> None:
        previous = self._deferred.get(path)
        delay = min(previous.delay * 2, _MAX_RETRY_SECONDS) if previous else max(self.poll_seconds, 1.0)
        if previous is None:
            LOGGER.warning(
                "inbox file %s: %s; it stays in the inbox and is tried again later", _shown(path.name), redact(reason)
            )
        self._deferred[path] = _Deferred(st.st_size, st.st_mtime, now + delay, delay)

    def _fail(self, path: Path, st: os.stat_result, now: float, reason: str) -> None:
        try:
            target = self.failed.keep(path, reason, origin="inbox")
        except FileNotFoundError:
            self._deferred.pop(path, None)
            return  # gone meanwhile (the sender took it back): nothing to do
        except OSError as exc:
            if path not in self._deferred:
                LOGGER.error(
                    "inbox file %s failed (%s) and cannot be moved to %s: %s; it is left alone until it changes",
                    _shown(path.name),
                    redact(reason),
                    self.failed_dir,
                    exc.strerror or exc,
                )
            # Not again until it changes (or an hour passes): a file we cannot move must not cost a loop.
            self._deferred[path] = _Deferred(st.st_size, st.st_mtime, now + 3600.0, 3600.0)
            return
        self._deferred.pop(path, None)
        # The reason file keeps the details; the log line keeps no value read from the file.
        LOGGER.warning("inbox file %s failed: %s; moved to %s", _shown(path.name), redact(reason), target)
