"""What an administrator can do to the pipeline, and what they can see of it.

Shared by the command line (``reanalyse``, ``resend``, ``results``) and the
web console: every action is a change of study state plus a job in the
queue, committed together.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from pacs_bridge.config import Settings
from pacs_bridge.pipeline.publishing import queue_deliveries
from pacs_bridge.pipeline.queue import aware, enqueue
from pacs_bridge.pipeline.settle import settle_study
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import (
    DeliveryState,
    Instance,
    InstanceResult,
    InstanceState,
    Job,
    JobKind,
    JobState,
    OutputObject,
    Study,
    StudyState,
    utcnow,
)

__all__ = [
    "force_settle",
    "queue_stats",
    "reanalyse",
    "resend",
    "retry_job",
    "study_deliveries",
    "study_jobs",
]


def _study(session: Session, study_uid: str) -> Study | None:
    return session.scalar(select(Study).where(Study.study_instance_uid == study_uid))


def reanalyse(db: Database, study_uid: str) -> bool:
    """Forget a study's results and queue it for analysis again; False if there is no such study."""
    with db.session() as session:
        study = _study(session, study_uid)
        if study is None:
            return False
        instance_ids = select(Instance.id).where(Instance.study_id == study.id)
        session.execute(delete(InstanceResult).where(InstanceResult.instance_id.in_(instance_ids)))
        session.execute(update(Instance).where(Instance.study_id == study.id).values(state=InstanceState.PENDING))
        study.state = StudyState.QUEUED
        study.state_reason = "re-analysis requested"
        enqueue(session, JobKind.ANALYSE, study_id=study.id)
    return True


def resend(db: Database, settings: Settings, study_uid: str) -> int:
    """Queue every current result object of a study again for every destination that takes it.

    Returns the deliveries queued; raises :class:`LookupError` for an unknown study.
    """
    with db.session() as session:
        study = _study(session, study_uid)
        if study is None:
            raise LookupError(f"no study {study_uid}")
        outputs = list(
            session.scalars(
                select(OutputObject).where(OutputObject.study_id == study.id, OutputObject.superseded.is_(False))
            )
        )
        count = queue_deliveries(session, outputs, settings, study.calling_aet)
        if count and study.state == StudyState.FAILED and (study.state_reason or "").find("delivered") >= 0:
            study.state = StudyState.DONE
            study.state_reason = "resend requested"
    return count


def force_settle(db: Database, settings: Settings, study_uid: str) -> bool:
    """Settle a receiving study now, without waiting for the quiet period; False if unknown or not receiving."""
    with db.session() as session:
        study = _study(session, study_uid)
        if study is None or study.state != StudyState.RECEIVING:
            return False
        settle_study(session, study, settings.study, force=True)
        return True


def retry_job(db: Database, job_id: int) -> bool:
    """Queue a dead job's work again (a new pending job for the same subject); False if not dead."""
    with db.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state != JobState.DEAD:
            return False
        enqueue(session, job.kind, study_id=job.study_id, output_id=job.output_id, destination=job.destination)
        if job.study_id is not None and job.kind in (JobKind.ANALYSE, JobKind.PUBLISH):
            session.execute(
                update(Study)
                .where(Study.id == job.study_id, Study.state == StudyState.FAILED)
                .values(
                    state=StudyState.QUEUED if job.kind is JobKind.ANALYSE else StudyState.ANALYSING,
                    state_reason="retry requested",
                )
            )
        return True


def queue_stats(session: Session, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Per job kind: pending, running and dead counts, and the age of the oldest due pending job."""
    now = now or utcnow()
    stats: dict[str, dict[str, Any]] = {
        kind.value: {"pending": 0, "running": 0, "dead": 0, "oldest_pending_seconds": 0.0} for kind in JobKind
    }
    for kind, state, count in session.execute(
        select(Job.kind, Job.state, func.count())
        .where(Job.state.in_([JobState.PENDING, JobState.RUNNING, JobState.DEAD]))
        .group_by(Job.kind, Job.state)
    ):
        stats[JobKind(kind).value][JobState(state).value] = int(count)
    for kind, oldest in session.execute(
        select(Job.kind, func.min(Job.created_at))
        .where(Job.state == JobState.PENDING, Job.not_before <= now)
        .group_by(Job.kind)
    ):
        created = aware(oldest)
        if created is not None:
            stats[JobKind(kind).value]["oldest_pending_seconds"] = max(0.0, (now - created).total_seconds())
    return stats


def study_jobs(session: Session, study_id: int) -> list[Job]:
    """Every job of a study and of its result objects, newest first."""
    outputs = select(OutputObject.id).where(OutputObject.study_id == study_id)
    return list(
        session.scalars(
            select(Job)
            .where(or_(Job.study_id == study_id, Job.output_id.in_(outputs)))
            .order_by(Job.created_at.desc(), Job.id.desc())
        )
    )


_DELIVERY_STATE = {
    JobState.PENDING: DeliveryState.PENDING,
    JobState.RUNNING: DeliveryState.PENDING,
    JobState.DONE: DeliveryState.SENT,
    JobState.DEAD: DeliveryState.DEAD,
}


def study_deliveries(session: Session, study_id: int) -> list[dict[str, Any]]:
    """Each result object's state with each destination (from its newest deliver job)."""
    rows = session.execute(
        select(Job, OutputObject)
        .join(OutputObject, Job.output_id == OutputObject.id)
        .where(OutputObject.study_id == study_id, Job.kind == JobKind.DELIVER)
        .order_by(Job.id.desc())
    ).all()
    seen: set[tuple[int, str]] = set()
    out: list[dict[str, Any]] = []
    for job, output in rows:
        key = (output.id, job.destination or "")
        if key in seen:
            continue
        seen.add(key)
        finished = aware(job.finished_at)
        out.append(
            {
                "output_id": output.id,
                "kind": output.kind,
                "sop_instance_uid": output.sop_instance_uid,
                "superseded": output.superseded,
                "destination": job.destination,
                "state": _DELIVERY_STATE[JobState(job.state)].value,
                "job_state": JobState(job.state).value,
                "attempts": job.attempts,
                "last_error": job.last_error,
                "finished_at": finished.isoformat() if finished else None,
            }
        )
    return sorted(out, key=lambda d: (d["output_id"], d["destination"] or ""))
