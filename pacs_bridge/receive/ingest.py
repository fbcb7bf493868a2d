"""The one ingest path shared by the C-STORE SCP and the folder watcher.

Order of work, so that an acknowledgement means the instance is safe:
validate and read every attribute the index needs (UIDs, size, pixel data
length) → write the received bytes durably into the spool under a name that
no other file has → commit the index rows → only then report success. An
instance that cannot be read is refused before any byte is written, so a
refused instance never leaves a file behind. The Storage Service Class
statuses used are those of PS3.4 B.2.3: 0x0000 success, 0xA700 refused: out
of resources, 0xA900 data set does not match SOP class, 0xC210 cannot
understand.

Two stores of one SOP Instance UID (a PACS resending after a timeout on a
second association) are serialised by a claim on the UID: the second waits,
then finds the row and answers success as a duplicate without touching the
file. Across processes (several workers on one spool) the spool's
link-if-absent does the same job: a file in the spool is never replaced or
removed by a store, only a file this store itself created and no row points
to.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from pacs_bridge.errors import OutOfResources, RejectedInstance
from pacs_bridge.logsafe import redact
from pacs_bridge.receive.attributes import check_pixel_data, describe, uid_text
from pacs_bridge.receive.decode import dataset_from_part10
from pacs_bridge.receive.failed import FailedFolder
from pacs_bridge.store.db import Database
from pacs_bridge.store.index import Added, FastIndex, InstanceRecord, find_instance
from pacs_bridge.store.layout import relative_to_data
from pacs_bridge.store.models import Instance
from pacs_bridge.store.spool import Spool, valid_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "IngestOutcome",
    "Ingestor",
    "check_pixel_data",
]

LOGGER = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

# How long a store waits for another process that linked the same instance first to commit its row.
_ADOPT_WAIT_SECONDS = 2.0


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one instance."""

    status: int
    message: str = ""
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    size_bytes: int = 0
    duplicate: bool = False
    retryable: bool = False
    """True for a refusal that may succeed later unchanged (disk full, database busy)."""
    settle_queued: bool = False
    """True when this instance queued its study's settle job (the first of a study, or of a late batch)."""

    @property
    def ok(self) -> bool:
        """True if the instance is safely stored (new or duplicate)."""
        return self.status == STATUS_SUCCESS


class _Claims:
    """One lock per SOP Instance UID being stored, so that one instance is stored by one thread at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, uid: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._held.get(uid, (threading.Lock(), 0))
            self._held[uid] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, users = self._held[uid]
                if users <= 1:
                    del self._held[uid]
                else:
                    self._held[uid] = (lock, users - 1)


def _error_text(exc: BaseException) -> str:
    return redact(str(exc)) or type(exc).__name__


class Ingestor:
    """Validates, stores and indexes instances; safe to call from many threads."""

    def __init__(self, spool: Spool, db: Database, *, max_instance_bytes: int, settle_seconds: float = 0.0) -> None:
        self.spool = spool
        self.db = db
        self.max_instance_bytes = max_instance_bytes
        self.failed = FailedFolder(spool.failed)
        # One writer at a time keeps SQLite free of lock contention and makes the
        # duplicate check and the insert one step; file writes happen outside it.
        self._index_lock = threading.Lock()
        # The index transactions run on one held connection (under the lock): no pool checkout and
        # reset per instance. It is dropped after any error and opened again by the next commit.
        self._conn: Connection | None = None
        # A new study's settle job is due when its quiet period ([study] settle_seconds) could be over.
        self._index = FastIndex(settle_seconds=settle_seconds)
        self._claims = _Claims()

    def _identify(self, ds: Dataset, transfer_syntax: str | None) -> tuple[str, str, str, str]:
        uids = {}
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            text = uid_text(ds, keyword)
            if not text:
                raise RejectedInstance(f"missing {keyword}")
            if not valid_uid(text):
                raise RejectedInstance(f"{keyword} {text[:80]!r} is not a valid UID (PS3.5 9.1)")
            uids[keyword] = text
        if transfer_syntax is not None and not valid_uid(transfer_syntax):
            raise RejectedInstance(f"transfer syntax {transfer_syntax[:80]!r} is not a valid UID")
        return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"], uids["SOPClassUID"]

    def _read(
        self, ds: Dataset, transfer_syntax: str
    ) -> tuple[tuple[str, str, str, str], dict[str, Any]] | IngestOutcome:
        """The UIDs and attributes of ``ds``, or the refusal when something cannot be read."""
        try:
            uids = self._identify(ds, transfer_syntax)
        except RejectedInstance as exc:
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, str(exc))
        except Exception as exc:  # a malformed element can raise anything while being read
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: {_error_text(exc)}")
        try:
            attributes = describe(ds)
            check_pixel_data(ds, transfer_syntax)
        except RejectedInstance as exc:
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, str(exc), uids[0], uids[2])
        except Exception as exc:
            return IngestOutcome(
                STATUS_CANNOT_UNDERSTAND, f"unreadable attribute: {_error_text(exc)}", uids[0], uids[2]
            )
        return uids, attributes

    def ingest(
        self,
        ds: Dataset,
        chunks: Iterable[bytes],
        *,
        size: int,
        transfer_syntax: str,
        calling_aet: str | None,
        source: str,
        expected_sop_class: str | None = None,
        expected_sop_instance: str | None = None,
        staged: Path | None = None,
    ) -> IngestOutcome:
        """Store and index one instance; ``chunks`` are its bytes exactly as they will be kept.

        ``staged`` is the file that already holds those bytes, written while
        they arrived (``receive/streaming.py``); it is linked into the spool
        instead of writing ``chunks``.

        ``expected_sop_class`` and ``expected_sop_instance`` are what the
        C-STORE request names (its presentation context, its Affected SOP
        Instance UID); a data set that holds something else is refused.
        """
        started = time.perf_counter()
        read = self._read(ds, transfer_syntax)
        if isinstance(read, IngestOutcome):
            return read
        uids, attributes = read
        study_uid, _series_uid, sop_uid, sop_class = uids
        if expected_sop_class is not None and sop_class != expected_sop_class:
            return IngestOutcome(
                STATUS_MISMATCH,
                f"SOP Class UID {sop_class} does not match the presentation context {expected_sop_class}",
                study_uid,
                sop_uid,
            )
        if expected_sop_instance is not None and sop_uid != expected_sop_instance:
            # The request's value is not validated: it stays out of the message (and so out of the log).
            return IngestOutcome(
                STATUS_MISMATCH,
                "SOP Instance UID of the data set does not match the C-STORE request's Affected SOP Instance UID",
                study_uid,
                sop_uid,
            )
        if size > self.max_instance_bytes:
            return IngestOutcome(
                STATUS_OUT_OF_RESOURCES,
                f"instance of {size} bytes exceeds [dicom] max_instance_mb",
                study_uid,
                sop_uid,
            )
        with self._claims.hold(sop_uid):
            outcome = self._store(uids, attributes, chunks, size, transfer_syntax, calling_aet, source, staged)
        if outcome.ok:
            LOGGER.debug(
                "stored instance %s of study %s (%d bytes, %s, %s) in %.1f ms",
                sop_uid,
                study_uid,
                outcome.size_bytes,
                transfer_syntax,
                outcome.message,
                (time.perf_counter() - started) * 1000,
            )
        return outcome

    def _known(self, sop_uid: str) -> Instance | None:
        with self.db.sessions() as session:
            return find_instance(session, sop_uid)

    def _store(
        self,
        uids: tuple[str, str, str, str],
        attributes: dict[str, Any],
        chunks: Iterable[bytes],
        size: int,
        transfer_syntax: str,
        calling_aet: str | None,
        source: str,
        staged: Path | None = None,
    ) -> IngestOutcome:
        study_uid, series_uid, sop_uid, sop_class = uids
        path = self.spool.path_for(study_uid, sop_uid)
        if path.exists():
            known = self._known(sop_uid)
            if known is not None:
                return IngestOutcome(STATUS_SUCCESS, "duplicate", study_uid, sop_uid, known.size_bytes, True)
        try:
            if staged is not None:
                stored = self.spool.place(study_uid, sop_uid, staged)
            else:
                stored = self.spool.store(study_uid, sop_uid, chunks, size_hint=size)
        except OutOfResources as exc:
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, str(exc), study_uid, sop_uid, retryable=True)
        except RejectedInstance as exc:
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, str(exc), study_uid, sop_uid)
        if not stored.created:
            return self._adopt(path, study_uid, sop_uid, (study_uid, series_uid, sop_uid, sop_class), attributes)
        record = InstanceRecord(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=transfer_syntax,
            file_path=Path(relative_to_data(path, self.spool.data_dir)),
            size_bytes=stored.size,
            calling_aet=calling_aet,
            source=source,
            **attributes,
        )
        try:
            added = self._commit(record)
        except (SQLAlchemyError, OSError) as exc:  # any database failure, a broken connection included
            LOGGER.error("instance %s not indexed, refused: %s", sop_uid, _error_text(exc))
            self._discard(path)
            return IngestOutcome(
                STATUS_OUT_OF_RESOURCES, "database error; try again", study_uid, sop_uid, retryable=True
            )
        if not added.new:
            # Same SOP Instance UID already stored under another study: keep the first.
            LOGGER.warning("instance %s received again under study %s; the first copy is kept", sop_uid, study_uid)
            self._discard(path)
            return IngestOutcome(STATUS_SUCCESS, "duplicate", study_uid, sop_uid, stored.size, True)
        return IngestOutcome(
            STATUS_SUCCESS, "stored", study_uid, sop_uid, stored.size, settle_queued=added.settle_queued
        )

    def _discard(self, path: Path) -> None:
        """Remove a file this store created, unless a row points to it (then it is someone's acknowledged copy)."""
        with self.db.sessions() as session:
            # Rows hold the path relative to the data folder (older rows: absolute).
            names = [str(path), relative_to_data(path, self.spool.data_dir)]
            owner = session.scalar(select(Instance.id).where(Instance.file_path.in_(names)))
        if owner is None:
            path.unlink(missing_ok=True)

    def _adopt(
        self,
        path: Path,
        study_uid: str,
        sop_uid: str,
        uids: tuple[str, str, str, str],
        attributes: dict[str, Any],
    ) -> IngestOutcome:
        """A file already has this instance's name: answer from it, never touching it.

        Another process may be committing its row (wait briefly); a file left
        without a row (a crash between link and commit) is indexed from the
        file itself; one that cannot be read is moved to failed/ and the store
        is refused with 0xA700 so that the sender tries again.
        """
        deadline = time.monotonic() + _ADOPT_WAIT_SECONDS
        while True:
            known = self._known(sop_uid)
            if known is not None:
                return IngestOutcome(STATUS_SUCCESS, "duplicate", study_uid, sop_uid, known.size_bytes, True)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        try:
            indexed = self._index_file(path, "recovered")
        except Exception as exc:
            reason = f"spool file without a row could not be indexed: {_error_text(exc)}"
            self._quarantine(path, reason)
            return IngestOutcome(
                STATUS_OUT_OF_RESOURCES, "spool conflict; try again", study_uid, sop_uid, retryable=True
            )
        known = self._known(sop_uid)
        if known is None:
            return IngestOutcome(
                STATUS_OUT_OF_RESOURCES, "spool conflict; try again", study_uid, sop_uid, retryable=True
            )
        LOGGER.warning("instance %s: an unindexed spool file was found and indexed (%s)", sop_uid, indexed)
        return IngestOutcome(STATUS_SUCCESS, "duplicate", study_uid, sop_uid, known.size_bytes, True)

    def _commit(self, record: InstanceRecord) -> Added:
        attempts = 0
        while True:
            attempts += 1
            try:
                with self._index_lock:
                    try:
                        if self._conn is None:
                            self._conn = self.db.engine.connect()
                        with self._conn.begin():
                            return self._index.add(self._conn, record)
                    except BaseException:
                        self._index.clear()
                        self._drop_connection()
                        raise
            except IntegrityError:
                # Another worker (PostgreSQL) inserted the same UID first: it is a duplicate now.
                if attempts >= 3:
                    raise
            except OperationalError:
                if attempts >= 5:
                    raise
                time.sleep(0.05 * attempts)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception as exc:  # a broken connection may fail to close; it is gone either way
                LOGGER.debug("index connection closed with an error: %s", exc)

    def close(self) -> None:
        """Give the held index connection back (at shutdown, before the engine is disposed)."""
        with self._index_lock:
            self._drop_connection()

    def _index_file(self, path: Path, source: str) -> str:
        """Index one spool file from its own content; raises when it cannot (unreadable, wrong name)."""
        ds = dataset_from_part10(path.read_bytes(), self.max_instance_bytes)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        study_uid, series_uid, sop_uid, sop_class = self._identify(ds, ts or None)
        if sop_uid != path.stem or study_uid != path.parent.name:
            raise RejectedInstance(f"its UIDs do not match its name ({study_uid}/{sop_uid})")
        record = InstanceRecord(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=ts,
            file_path=Path(relative_to_data(path, self.spool.data_dir)),
            size_bytes=path.stat().st_size,
            calling_aet=None,
            source=source,
            **describe(ds),
        )
        return "indexed" if self._commit(record).new else "already indexed"

    def _quarantine(self, path: Path, reason: str) -> None:
        try:
            target = self.failed.keep(path, reason, origin="spool")
        except OSError as exc:
            LOGGER.error(
                "spool file %s: %s; it could not be moved to failed/ either: %s", path.name, redact(reason), exc
            )
            return
        LOGGER.warning("spool file %s: %s; moved to %s", path.name, redact(reason), target)

    def reconcile(self) -> int:
        """Index spool files that have no row (a crash between link and commit); return how many.

        A file that cannot be indexed (unreadable, UIDs that do not match its
        name) is moved to ``failed/`` with its reason and logged once; the
        start goes on. Nothing is deleted.
        """
        with self.db.sessions() as session:
            known = set(session.scalars(select(Instance.sop_instance_uid)))
        added = 0
        for path in list(self.spool.files()):
            if path.stem in known:
                continue
            try:
                if self._index_file(path, "recovered") == "indexed":
                    added += 1
            except Exception as exc:
                self._quarantine(path, f"left out of the index: {_error_text(exc)}")
        return added
