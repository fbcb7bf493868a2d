"""Index received instances in the database: study, series and instance rows.

Upserts keyed by UID. A new instance puts its study back to ``receiving`` and
restarts the quiet period (a late instance re-settles a study). A known SOP
Instance UID is a duplicate: nothing changes and the stored file is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_bridge.store.models import Instance, Series, Study, StudyState, utcnow

__all__ = ["InstanceRecord", "add_instance", "find_instance"]


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


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    """The instance row for a SOP Instance UID, if stored."""
    return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))


def _merge_modalities(current: str | None, modality: str | None) -> str | None:
    if not modality:
        return current
    values = set(filter(None, (current or "").split("\\")))
    values.add(modality)
    return "\\".join(sorted(values))


def add_instance(session: Session, record: InstanceRecord, now: datetime | None = None) -> tuple[Instance, bool]:
    """Add ``record`` unless its SOP Instance UID is known; return the row and whether it is new."""
    existing = find_instance(session, record.sop_instance_uid)
    if existing is not None:
        return existing, False
    with session.no_autoflush:
        return _add_new(session, record, now or utcnow()), True


def _add_new(session: Session, record: InstanceRecord, now: datetime) -> Instance:
    study = session.scalar(select(Study).where(Study.study_instance_uid == record.study_instance_uid))
    if study is None:
        study = Study(
            study_instance_uid=record.study_instance_uid,
            patient_id=record.patient_id,
            patient_name=record.patient_name,
            accession_number=record.accession_number,
            study_date=record.study_date,
            study_description=record.study_description,
            calling_aet=record.calling_aet,
            source=record.source,
            first_received_at=now,
            instance_count=0,
            total_bytes=0,
        )
        session.add(study)
    study.state = StudyState.RECEIVING
    study.state_reason = None
    study.settled_at = None
    study.last_received_at = now
    study.instance_count = (study.instance_count or 0) + 1
    study.total_bytes = (study.total_bytes or 0) + record.size_bytes
    study.modalities = _merge_modalities(study.modalities, record.modality)
    series = session.scalar(select(Series).where(Series.series_instance_uid == record.series_instance_uid))
    if series is None:
        series = Series(
            series_instance_uid=record.series_instance_uid,
            study=study,
            modality=record.modality,
            body_part_examined=record.body_part_examined,
            series_number=record.series_number,
            series_description=record.series_description,
        )
        session.add(series)
    instance = Instance(
        sop_instance_uid=record.sop_instance_uid,
        sop_class_uid=record.sop_class_uid,
        study=study,
        series=series,
        instance_number=record.instance_number,
        transfer_syntax_uid=record.transfer_syntax_uid,
        file_path=str(record.file_path),
        size_bytes=record.size_bytes,
        calling_aet=record.calling_aet,
        received_at=now,
    )
    session.add(instance)
    return instance
