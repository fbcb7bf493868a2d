"""The one ingest path shared by the C-STORE SCP and the folder watcher.

Order of work, so that an acknowledgement means the instance is safe:
validate (UIDs, size, free disk) → write the received bytes durably into the
spool → commit the index rows → only then report success. The Storage
Service Class statuses used are those of PS3.4 B.2.3: 0x0000 success,
0xA700 refused: out of resources, 0xA900 data set does not match SOP class,
0xC210 cannot understand.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError

from pacs_bridge.errors import OutOfResources, RejectedInstance
from pacs_bridge.store.db import Database
from pacs_bridge.store.index import FastIndex, InstanceRecord, find_instance
from pacs_bridge.store.models import Instance
from pacs_bridge.store.spool import Spool, valid_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_SUCCESS",
    "IngestOutcome",
    "Ingestor",
]

LOGGER = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one instance."""

    status: int
    message: str = ""
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    size_bytes: int = 0
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        """True if the instance is safely stored (new or duplicate)."""
        return self.status == STATUS_SUCCESS


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _record(
    ds: Dataset,
    uids: tuple[str, str, str, str],
    transfer_syntax: str,
    path: Path,
    size: int,
    calling_aet: str | None,
    source: str,
) -> InstanceRecord:
    study_uid, series_uid, sop_uid, sop_class = uids
    return InstanceRecord(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax_uid=transfer_syntax,
        file_path=path,
        size_bytes=size,
        calling_aet=calling_aet,
        source=source,
        modality=_text(ds, "Modality", 16),
        body_part_examined=_text(ds, "BodyPartExamined", 64),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 64),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        instance_number=_int(ds, "InstanceNumber"),
    )


class Ingestor:
    """Validates, stores and indexes instances; safe to call from many threads."""

    def __init__(self, spool: Spool, db: Database, *, max_instance_bytes: int) -> None:
        self.spool = spool
        self.db = db
        self.max_instance_bytes = max_instance_bytes
        # One writer at a time keeps SQLite free of lock contention and makes the
        # duplicate check and the insert one step; file writes happen outside it.
        self._index_lock = threading.Lock()
        self._index = FastIndex()

    def _identify(self, ds: Dataset, transfer_syntax: str | None) -> tuple[str, str, str, str]:
        uids = {}
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            value = ds.get(keyword)
            text = str(value).strip("\x00 ") if value is not None else ""
            if not text:
                raise RejectedInstance(f"missing {keyword}")
            if not valid_uid(text):
                raise RejectedInstance(f"{keyword} {text[:80]!r} is not a valid UID ([0-9.]{{1,64}})")
            uids[keyword] = text
        if transfer_syntax is not None and not valid_uid(transfer_syntax):
            raise RejectedInstance(f"transfer syntax {transfer_syntax[:80]!r} is not a valid UID")
        return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"], uids["SOPClassUID"]

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
    ) -> IngestOutcome:
        """Store and index one instance; ``chunks`` are its bytes exactly as they will be kept."""
        started = time.perf_counter()
        try:
            study_uid, series_uid, sop_uid, sop_class = self._identify(ds, transfer_syntax)
        except RejectedInstance as exc:
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, str(exc))
        except Exception as exc:  # a malformed element can raise anything while being read
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, f"unreadable data set: {exc}")
        if expected_sop_class is not None and sop_class != expected_sop_class:
            return IngestOutcome(
                STATUS_MISMATCH,
                f"SOP Class UID {sop_class} does not match the presentation context {expected_sop_class}",
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
        # The spool path follows from the UIDs, and every spool file has a row once
        # start-up has reconciled them: an existing file is a duplicate, kept as stored.
        if self.spool.path_for(study_uid, sop_uid).exists():
            with self.db.sessions() as session:
                known = find_instance(session, sop_uid)
                if known is not None:
                    return IngestOutcome(STATUS_SUCCESS, "duplicate", study_uid, sop_uid, known.size_bytes, True)
        try:
            path, written = self.spool.store(study_uid, sop_uid, chunks, size_hint=size)
        except OutOfResources as exc:
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, str(exc), study_uid, sop_uid)
        except RejectedInstance as exc:
            return IngestOutcome(STATUS_CANNOT_UNDERSTAND, str(exc), study_uid, sop_uid)
        record = _record(
            ds, (study_uid, series_uid, sop_uid, sop_class), transfer_syntax, path, written, calling_aet, source
        )
        try:
            duplicate = not self._commit(record)
        except (OperationalError, IntegrityError, OSError) as exc:
            LOGGER.error("instance %s not indexed, refused: %s", sop_uid, exc)
            path.unlink(missing_ok=True)
            return IngestOutcome(STATUS_OUT_OF_RESOURCES, f"database error: {exc}", study_uid, sop_uid)
        if duplicate:
            # Same SOP Instance UID already stored under another study: keep the first.
            LOGGER.warning("instance %s received again under study %s; the first copy is kept", sop_uid, study_uid)
            path.unlink(missing_ok=True)
        LOGGER.debug(
            "stored instance %s of study %s (%d bytes, %s) in %.1f ms",
            sop_uid,
            study_uid,
            written,
            transfer_syntax,
            (time.perf_counter() - started) * 1000,
        )
        return IngestOutcome(
            STATUS_SUCCESS, "duplicate" if duplicate else "stored", study_uid, sop_uid, written, duplicate
        )

    def _commit(self, record: InstanceRecord) -> bool:
        attempts = 0
        while True:
            attempts += 1
            try:
                with self._index_lock:
                    try:
                        with self.db.engine.begin() as conn:
                            return self._index.add(conn, record)
                    except BaseException:
                        self._index.clear()
                        raise
            except IntegrityError:
                # Another worker (PostgreSQL) inserted the same UID first: it is a duplicate now.
                if attempts >= 3:
                    raise
            except OperationalError:
                if attempts >= 5:
                    raise
                time.sleep(0.05 * attempts)

    def reconcile(self) -> int:
        """Index spool files that have no row (a crash between rename and commit); return how many."""
        from pydicom import dcmread

        with self.db.sessions() as session:
            known = set(session.scalars(select(Instance.sop_instance_uid)))
        added = 0
        for path in self.spool.files():
            if path.stem in known:
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
                ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
                uids = self._identify(ds, ts or None)
            except Exception as exc:
                LOGGER.warning("spool file %s is unreadable and left out of the index: %s", path.name, exc)
                continue
            if uids[2] != path.stem:
                continue
            record = _record(ds, uids, ts, path, path.stat().st_size, None, "recovered")
            if self._commit(record):
                added += 1
        return added
