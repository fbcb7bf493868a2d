"""The folder watcher: DICOM files dropped into the inbox take the C-STORE path.

watchdog reports new and moved files; a periodic rescan catches anything it
missed (network shares, files present at start-up). A file is read only after
its size and modification time have been unchanged for ``stable_seconds``
(it may still be being copied). A file that is ingested leaves the inbox; a
file that fails moves to ``<data_dir>/failed/`` with a ``.reason.txt`` beside
it. Files are DICOM Part 10 files (PS3.10 §7); bare data sets without File
Meta Information are accepted in Implicit VR Little Endian.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from pacs_bridge.receive.ingest import Ingestor
from pacs_bridge.store.spool import fsync_dir

__all__ = ["FolderWatcher"]

LOGGER = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class _Seen:
    size: int
    mtime: float
    since: float


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.wake.set()


def _check_pixel_length(ds: Any) -> None:
    """Refuse native pixel data shorter than Rows x Columns x Samples x Bits x Frames (truncated files)."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if "PixelData" not in ds or ts is None or ts.is_compressed:
        return
    try:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.BitsAllocated)
            // 8
        )
    except (AttributeError, TypeError, ValueError):
        return
    actual = len(ds.PixelData)
    if actual < expected:
        raise ValueError(f"pixel data truncated: {actual} of {expected} bytes")


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
        self.ingestor = ingestor
        self.stable_seconds = stable_seconds
        self.poll_seconds = poll_seconds
        self.on_stored = on_stored
        self._seen: dict[Path, _Seen] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: Any = None

    def start(self) -> None:
        """Start watching in the background."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.failed_dir.mkdir(parents=True, exist_ok=True)
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
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                LOGGER.exception("inbox scan failed; retrying")
            self._wake.wait(timeout=min(self.poll_seconds, max(self.stable_seconds / 2, 0.2)))
            self._wake.clear()

    def scan(self, now: float | None = None) -> int:
        """Ingest every stable file; return how many were handled."""
        now = time.monotonic() if now is None else now
        present: set[Path] = set()
        handled = 0
        for root, dirs, files in os.walk(self.inbox):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith(".") or name.endswith((".part", ".tmp")):
                    continue
                path = Path(root) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                present.add(path)
                seen = self._seen.get(path)
                if seen is None or seen.size != st.st_size or seen.mtime != st.st_mtime:
                    self._seen[path] = _Seen(st.st_size, st.st_mtime, now)
                    if self.stable_seconds > 0:
                        continue
                    seen = self._seen[path]
                if now - seen.since < self.stable_seconds:
                    continue
                if self._stop.is_set():
                    return handled
                self._handle(path)
                self._seen.pop(path, None)
                handled += 1
        for gone in set(self._seen) - present:
            self._seen.pop(gone, None)
        return handled

    def _handle(self, path: Path) -> None:
        try:
            data = path.read_bytes()
            try:
                ds = dcmread(path, force=False)
            except InvalidDicomError:
                raise ValueError("not a DICOM file (no DICM preamble)") from None
            _check_pixel_length(ds)
            ts = ds.file_meta.get("TransferSyntaxUID")
            if ts is None:
                raise ValueError("no Transfer Syntax UID in the file meta information")
        except Exception as exc:
            self._fail(path, str(exc) or type(exc).__name__)
            return
        outcome = self.ingestor.ingest(
            ds, (data,), size=len(data), transfer_syntax=str(ts), calling_aet=None, source="folder"
        )
        if not outcome.ok:
            self._fail(path, f"refused (0x{outcome.status:04X}): {outcome.message}")
            return
        path.unlink(missing_ok=True)
        LOGGER.info(
            "inbox file %s ingested as %s of study %s%s",
            path.name,
            outcome.sop_instance_uid,
            outcome.study_instance_uid,
            " (duplicate)" if outcome.duplicate else "",
        )
        if not outcome.duplicate and outcome.study_instance_uid:
            self.on_stored(outcome.study_instance_uid)

    def _fail(self, path: Path, reason: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        safe = _SAFE_NAME.sub("_", path.name)[:100] or "file"
        target = self.failed_dir / f"{stamp}-{safe}"
        try:
            os.replace(path, target)
            target.with_name(target.name + ".reason.txt").write_text(
                f"file: {path.name}\nreason: {reason}\nat: {stamp}\n", encoding="utf-8"
            )
            fsync_dir(self.failed_dir)
        except OSError as exc:
            LOGGER.error("inbox file %s failed (%s) and could not be moved: %s", path.name, reason, exc)
            return
        LOGGER.warning("inbox file %s failed: %s; moved to %s", path.name, reason, target)
