"""Index received instances in the database: study, series and instance rows.

Upserts keyed by UID. A new instance puts its study back to ``receiving`` and
restarts the quiet period (a late instance re-settles a study). A known SOP
Instance UID is a duplicate: nothing changes and the stored file is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pacs_bridge.store.models import Instance, InstanceState, Job, JobKind, JobState, Series, Study, StudyState, utcnow

__all__ = ["Added", "FastIndex", "InstanceRecord", "find_instance"]


@dataclass(frozen=True)
class InstanceRecord:
    """What the index keeps of one instance; UIDs already validated."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    file_path: Path
    size_bytes: int
    calling_aet: str | None
    source: str
    modality: str | None = None
    body_part_examined: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    instance_number: int | None = None


@dataclass(frozen=True)
class Added:
    """What :meth:`FastIndex.add` did."""

    new: bool
    """False when the SOP Instance UID was already indexed (nothing changed)."""
    settle_queued: bool = False
    """True when the study had no pending settle job and this instance queued one."""


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """The instance row for a SOP Instance UID, if stored."""
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def _merge_modalities(current: str | None, modality: str | None) -> str | None:
    if not modality:
        return current
    values = set(filter(None, (current or "").split("\\")))
    values.add(modality)
    return "\\".join(sorted(values))


def _insert_or_select(conn: Connection, add: dict[str, Any], find: Any, uid: str, values: dict[str, Any]) -> int:
    """The id of the row whose UID is ``uid``: inserted from ``values`` (``add``, by dialect), or found by ``find``.

    The insert does nothing where the UID is taken (``ON CONFLICT DO NOTHING ... RETURNING``): a new
    row costs one statement, a known one two, and another writer's row is found, not an error.
    """
    added = conn.execute(add[conn.dialect.name], values).scalar()
    if added is not None:
        return int(added)
    return int(conn.execute(find, {"uid": uid}).scalar_one())


def _add_if_absent(model: Any, uid_column: Any, id_column: Any) -> dict[str, Any]:
    """``INSERT ... ON CONFLICT (uid) DO NOTHING RETURNING id`` for each dialect the index runs on."""
    return {
        name: dialect.insert(model).on_conflict_do_nothing(index_elements=[uid_column]).returning(id_column)
        for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
    }


# Statements built once: each instance only binds its values, so SQLAlchemy finds the compiled
# form in its cache without rebuilding and re-keying a statement per instance.
_FIND_INSTANCE = select(Instance.id).where(Instance.sop_instance_uid == bindparam("sop"))
_STUDY_RECEIVED = (
    update(Study)
    .where(Study.id == bindparam("sid"))
    .values(
        state=StudyState.RECEIVING,
        state_reason=None,
        settled_at=None,
        last_received_at=bindparam("now"),
        instance_count=Study.instance_count + 1,
        total_bytes=Study.total_bytes + bindparam("size"),
    )
)
_INSERT_INSTANCE = insert(Instance)
_FIND_STUDY = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
_ADD_STUDY = _add_if_absent(Study, Study.study_instance_uid, Study.id)
_FIND_SERIES = select(Series.id).where(Series.series_instance_uid == bindparam("uid"))
_ADD_SERIES = _add_if_absent(Series, Series.series_instance_uid, Series.id)
_STUDY_MODALITIES = select(Study.modalities).where(Study.id == bindparam("sid"))
_SET_MODALITIES = update(Study).where(Study.id == bindparam("sid")).values(modalities=bindparam("modalities"))
_QUEUE_SETTLE_SQLITE = sqlite.insert(Job).on_conflict_do_nothing()
_QUEUE_SETTLE_PG = postgresql.insert(Job).on_conflict_do_nothing()


def _queue_settle(conn: Connection, study_id: int, now: datetime, due: datetime) -> bool:
    """Make sure a settle job is pending for the study (PS3.4 has no "study complete" for C-STORE).

    The job is due at ``due``, the end of the quiet period that this instance starts: a study still
    receiving is not looked at before it could be quiet (each look would find it busy, defer the job,
    and let the next instance queue another). True if this call queued it (none was pending): only
    then is there news for the settle stage.
    """
    values: dict[str, Any] = {
        "kind": JobKind.SETTLE,
        "state": JobState.PENDING,
        "dedup_key": f"settle:{study_id}",
        "study_id": study_id,
        "not_before": due,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
    statement = _QUEUE_SETTLE_PG if conn.dialect.name == "postgresql" else _QUEUE_SETTLE_SQLITE
    return bool(conn.execute(statement, values).rowcount)


class FastIndex:
    """Adds instances to the index in a few Core statements.

    Study and series ids are cached by UID (a UID's row id never changes), so a
    new instance of a known study costs one duplicate check, one update and two
    inserts at most. The caller serialises calls (the ingest lock).
    """

    def __init__(self, max_cached: int = 10_000, settle_seconds: float = 0.0) -> None:
        self._settle = timedelta(seconds=max(settle_seconds, 0.0))
        self._studies: dict[str, int] = {}
        self._series: dict[str, int] = {}
        self._modalities: dict[int, set[str]] = {}
        self._max = max_cached

    def clear(self) -> None:
        """Forget cached ids (after a rolled-back transaction they may name no row)."""
        self._studies.clear()
        self._series.clear()
        self._modalities.clear()

    def _trim(self) -> None:
        if len(self._studies) > self._max or len(self._series) > self._max:
            self.clear()

    def add(self, conn: Connection, record: InstanceRecord, now: datetime | None = None) -> Added:
        """Insert ``record`` unless its SOP Instance UID is known."""
        now = now or utcnow()
        if conn.execute(_FIND_INSTANCE, {"sop": record.sop_instance_uid}).first() is not None:
            return Added(new=False)
        self._trim()
        study_id = self._studies.get(record.study_instance_uid)
        if study_id is None:
            study_id = _insert_or_select(
                conn,
                _ADD_STUDY,
                _FIND_STUDY,
                record.study_instance_uid,
                dict(
                    study_instance_uid=record.study_instance_uid,
                    patient_id=record.patient_id,
                    patient_name=record.patient_name,
                    accession_number=record.accession_number,
                    study_date=record.study_date,
                    study_description=record.study_description,
                    calling_aet=record.calling_aet,
                    source=record.source,
                    state=StudyState.RECEIVING,
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=0,
                    total_bytes=0,
                    attempts=0,
                ),
            )
            self._studies[record.study_instance_uid] = study_id
        seen = self._modalities.get(study_id)
        if record.modality and (seen is None or record.modality not in seen):
            current = conn.execute(_STUDY_MODALITIES, {"sid": study_id}).scalar()
            merged = _merge_modalities(current, record.modality)
            conn.execute(_SET_MODALITIES, {"sid": study_id, "modalities": merged})
            self._modalities[study_id] = set(filter(None, (merged or "").split("\\")))
        conn.execute(_STUDY_RECEIVED, {"sid": study_id, "now": now, "size": record.size_bytes})
        series_id = self._series.get(record.series_instance_uid)
        if series_id is None:
            series_id = _insert_or_select(
                conn,
                _ADD_SERIES,
                _FIND_SERIES,
                record.series_instance_uid,
                dict(
                    series_instance_uid=record.series_instance_uid,
                    study_id=study_id,
                    modality=record.modality,
                    body_part_examined=record.body_part_examined,
                    series_number=record.series_number,
                    series_description=record.series_description,
                ),
            )
            self._series[record.series_instance_uid] = series_id
        # The study's settle job (one pending per study): it runs once the study is quiet.
        settle_queued = _queue_settle(conn, study_id, now, now + self._settle)
        conn.execute(
            _INSERT_INSTANCE,
            {
                "sop_instance_uid": record.sop_instance_uid,
                "sop_class_uid": record.sop_class_uid,
                "study_id": study_id,
                "series_id": series_id,
                "instance_number": record.instance_number,
                "transfer_syntax_uid": record.transfer_syntax_uid,
                "file_path": str(record.file_path),
                "size_bytes": record.size_bytes,
                "calling_aet": record.calling_aet,
                "received_at": now,
                "state": InstanceState.PENDING,
            },
        )
        return Added(new=True, settle_queued=settle_queued)
