"""What the console and the API show of studies, instances, results, jobs and failures.

Plain dictionaries built from the index (:mod:`pacs_bridge.store.models`)
and the queue views of :mod:`pacs_bridge.pipeline.actions`, shared by the
JSON API and the HTML pages so that both say the same thing. Studies are
addressed by Study Instance UID (PS3.3 C.7.2.1), never by patient name or ID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_bridge.pipeline.actions import study_deliveries, study_jobs
from pacs_bridge.store.db import Database
from pacs_bridge.store.layout import resolve_stored
from pacs_bridge.store.models import (
    Instance,
    InstanceResult,
    InstanceState,
    Job,
    JobKind,
    JobState,
    OutputObject,
    Series,
    Study,
    StudyState,
)
from pacs_bridge.store.spool import valid_uid

__all__ = [
    "FINDINGS",
    "STATES",
    "StudyFilter",
    "failures",
    "instance_files",
    "list_studies",
    "study_detail",
]

LOGGER = logging.getLogger(__name__)

STATES = tuple(state.value for state in StudyState)
FINDINGS = ("fracture", "none", "unknown")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class StudyFilter:
    """Filters of the study list: state, finding, received-on date range (``YYYY-MM-DD``), page."""

    state: str | None = None
    finding: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    page: int = 1
    per_page: int = 50


def _study_row(study: Study) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "state": study.state.value,
        "reason": study.state_reason,
        "patient_name": study.patient_name,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "study_description": study.study_description,
        "modalities": study.modalities,
        "source": study.source,
        "calling_aet": study.calling_aet,
        "instances": study.instance_count,
        "received_at": _iso(study.last_received_at),
        "analysed_at": _iso(study.analysed_at),
        "model": {"name": study.model_name, "version": study.model_version} if study.model_name else None,
        "max_probability": study.max_probability,
        "positive_instances": study.positive_instances,
        "fracture": study.fracture,
    }


def _day(text: str | None) -> datetime | None:
    """Midnight UTC of a ``YYYY-MM-DD`` day."""
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"not a date (YYYY-MM-DD): {text[:20]!r}") from exc


def list_studies(db: Database, flt: StudyFilter) -> dict[str, Any]:
    """One page of studies, newest first, and the total that match; raises ValueError on a bad filter."""
    if flt.state and flt.state not in STATES:
        raise ValueError(f"unknown state {flt.state[:20]!r}; states are {', '.join(STATES)}")
    if flt.finding and flt.finding not in FINDINGS:
        raise ValueError(f"unknown finding {flt.finding[:20]!r}; findings are {', '.join(FINDINGS)}")
    query = select(Study)
    if flt.state:
        query = query.where(Study.state == StudyState(flt.state))
    if flt.finding == "fracture":
        query = query.where(Study.fracture.is_(True))
    elif flt.finding == "none":
        query = query.where(Study.fracture.is_(False))
    elif flt.finding == "unknown":
        query = query.where(Study.fracture.is_(None))
    start, end = _day(flt.date_from), _day(flt.date_to)
    if start is not None:
        query = query.where(Study.last_received_at >= start)
    if end is not None:
        query = query.where(Study.last_received_at < end + timedelta(days=1))
    per_page = max(1, min(flt.per_page, 500))
    page = max(1, flt.page)
    with db.sessions() as session:
        total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
        rows = session.scalars(
            query.order_by(Study.last_received_at.desc(), Study.id.desc()).offset((page - 1) * per_page).limit(per_page)
        ).all()
        studies = [_study_row(study) for study in rows]
    pages = max(1, (total + per_page - 1) // per_page)
    return {"studies": studies, "total": total, "page": page, "pages": pages, "per_page": per_page}


def _job_row(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": JobKind(job.kind).value,
        "state": JobState(job.state).value,
        "destination": job.destination,
        "attempts": job.attempts,
        "last_error": job.last_error,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
    }


def _result_row(result: InstanceResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "model": {"name": result.model_name, "version": result.model_version},
        "ok": result.ok,
        "error": result.error,
        "probability": result.probability,
        "fracture": result.fracture,
        "threshold": result.threshold,
        "body_part": result.body_part,
        "box": result.box,
        "boxes": result.boxes,
        "has_heatmap": bool(result.heatmap_path),
        "provider": result.provider,
        "created_at": _iso(result.created_at),
    }


def _latest_results(session: Session, study_id: int) -> dict[int, InstanceResult]:
    rows = session.scalars(
        select(InstanceResult)
        .join(Instance, InstanceResult.instance_id == Instance.id)
        .where(Instance.study_id == study_id)
        .order_by(InstanceResult.created_at, InstanceResult.id)
    ).all()
    return {row.instance_id: row for row in rows}  # the newest one per instance wins


def study_detail(db: Database, study_uid: str) -> dict[str, Any] | None:
    """A study with its instances and results, deliveries and jobs; None if unknown."""
    if not valid_uid(study_uid):
        return None
    with db.sessions() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            return None
        results = _latest_results(session, study.id)
        instances = session.execute(
            select(Instance, Series)
            .join(Series, Instance.series_id == Series.id)
            .where(Instance.study_id == study.id)
            .order_by(Series.series_number, Instance.instance_number, Instance.id)
        ).all()
        detail = _study_row(study)
        detail["instances_detail"] = [
            {
                "sop_instance_uid": instance.sop_instance_uid,
                "sop_class_uid": instance.sop_class_uid,
                "series_instance_uid": series.series_instance_uid,
                "modality": series.modality,
                "body_part_examined": series.body_part_examined,
                "instance_number": instance.instance_number,
                "state": InstanceState(instance.state).value,
                "result": _result_row(results.get(instance.id)),
            }
            for instance, series in instances
        ]
        detail["deliveries"] = study_deliveries(session, study.id)
        detail["jobs"] = [_job_row(job) for job in study_jobs(session, study.id)]
    return detail


def instance_files(db: Database, data_dir: Path, study_uid: str, sop_uid: str) -> tuple[Path, Path | None] | None:
    """The stored file of an instance of this study and its newest heatmap file; None if unknown."""
    if not (valid_uid(study_uid) and valid_uid(sop_uid)):
        return None
    with db.sessions() as session:
        row = session.execute(
            select(Instance)
            .join(Study, Instance.study_id == Study.id)
            .where(Study.study_instance_uid == study_uid, Instance.sop_instance_uid == sop_uid)
        ).scalar_one_or_none()
        if row is None:
            return None
        result = session.scalars(
            select(InstanceResult)
            .where(InstanceResult.instance_id == row.id)
            .order_by(InstanceResult.created_at.desc(), InstanceResult.id.desc())
            .limit(1)
        ).first()
        heatmap = resolve_stored(data_dir, result.heatmap_path) if result and result.heatmap_path else None
        return resolve_stored(data_dir, row.file_path), heatmap


def failures(db: Database, limit: int = 200) -> dict[str, Any]:
    """Failed instances, failed studies and dead jobs (deliveries and other stages), newest first."""
    with db.sessions() as session:
        failed_instances = session.execute(
            select(Instance, Study.study_instance_uid, InstanceResult.error)
            .join(Study, Instance.study_id == Study.id)
            .outerjoin(InstanceResult, InstanceResult.instance_id == Instance.id)
            .where(Instance.state == InstanceState.FAILED)
            .order_by(Instance.received_at.desc(), Instance.id.desc())
            .limit(limit)
        ).all()
        failed_studies = session.scalars(
            select(Study)
            .where(Study.state == StudyState.FAILED)
            .order_by(Study.last_received_at.desc(), Study.id.desc())
            .limit(limit)
        ).all()
        dead_jobs = session.execute(
            select(Job, Study.study_instance_uid)
            .outerjoin(Study, Job.study_id == Study.id)
            .where(Job.state == JobState.DEAD)
            .order_by(Job.finished_at.desc(), Job.id.desc())
            .limit(limit)
        ).all()
        out_studies: dict[int, str] = {}
        output_ids = [job.output_id for job, _ in dead_jobs if job.output_id is not None and job.study_id is None]
        if output_ids:
            for output_id, uid in session.execute(
                select(OutputObject.id, Study.study_instance_uid)
                .join(Study, OutputObject.study_id == Study.id)
                .where(OutputObject.id.in_(output_ids))
            ):
                out_studies[output_id] = uid
        return {
            "instances": [
                {
                    "study_instance_uid": study_uid,
                    "sop_instance_uid": instance.sop_instance_uid,
                    "received_at": _iso(instance.received_at),
                    "error": error,
                }
                for instance, study_uid, error in failed_instances
            ],
            "studies": [
                {
                    "study_instance_uid": study.study_instance_uid,
                    "reason": study.state_reason,
                    "received_at": _iso(study.last_received_at),
                }
                for study in failed_studies
            ],
            "jobs": [
                {
                    **_job_row(job),
                    "study_instance_uid": study_uid
                    or (out_studies.get(job.output_id) if job.output_id is not None else None),
                }
                for job, study_uid in dead_jobs
            ],
        }
