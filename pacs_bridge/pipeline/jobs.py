"""The analysis queue, kept in the ``studies`` table.

A queued study is claimed with a compare-and-set update, so several workers
(on PostgreSQL, on several machines) never take the same study. Studies left
``analysing`` by a crash are put back in the queue at start-up. Retries back
off exponentially; after ``max_attempts`` the study is ``failed``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from pacs_bridge.store.models import Instance, InstanceResult, InstanceState, Study, StudyState, utcnow

__all__ = ["claim_next", "recover_interrupted", "request_reanalysis", "retry_later"]

LOGGER = logging.getLogger(__name__)


def recover_interrupted(session: Session) -> int:
    """Queue again the studies a crash left ``analysing``; return how many."""
    result = session.execute(
        update(Study)
        .where(Study.state.in_([StudyState.ANALYSING, StudyState.SETTLED]))
        .values(state=StudyState.QUEUED, claimed_by=None, claimed_at=None)
        .execution_options(synchronize_session=False)
    )
    count = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if count:
        LOGGER.info("%d interrupted studies queued again", count)
    return count


def claim_next(session: Session, worker: str, now: datetime | None = None) -> Study | None:
    """Claim the oldest due queued study for ``worker``, or None."""
    now = now or utcnow()
    candidates = session.scalars(
        select(Study)
        .where(
            Study.state == StudyState.QUEUED,
            or_(Study.next_attempt_at.is_(None), Study.next_attempt_at <= now),
        )
        .order_by(Study.settled_at, Study.id)
        .limit(5)
    ).all()
    for study in candidates:
        result = session.execute(
            update(Study)
            .where(Study.id == study.id, Study.state == StudyState.QUEUED)
            .values(state=StudyState.ANALYSING, claimed_by=worker, claimed_at=now, attempts=Study.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            session.commit()
            session.refresh(study)
            return study
    return None


def retry_later(session: Session, study_id: int, reason: str, *, max_attempts: int, base_seconds: float) -> bool:
    """Back off a transient failure; fail the study after ``max_attempts``. True if it will retry."""
    study = session.get(Study, study_id)
    if study is None:
        return False
    if study.attempts >= max_attempts:
        study.state = StudyState.FAILED
        study.state_reason = f"gave up after {study.attempts} attempts: {reason}"
        LOGGER.error("study %s failed: %s", study.study_instance_uid, study.state_reason)
        return False
    delay = base_seconds * (2 ** max(study.attempts - 1, 0))
    study.state = StudyState.QUEUED
    study.state_reason = f"retry {study.attempts + 1} in {delay:.0f} s: {reason}"
    study.next_attempt_at = utcnow() + timedelta(seconds=delay)
    study.claimed_by = None
    LOGGER.warning("study %s will be retried in %.0f s: %s", study.study_instance_uid, delay, reason)
    return True


def request_reanalysis(session: Session, study_uid: str) -> bool:
    """Forget a study's results and queue it again (``pacs-bridge reanalyse``)."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        return False
    instance_ids = select(Instance.id).where(Instance.study_id == study.id)
    session.execute(delete(InstanceResult).where(InstanceResult.instance_id.in_(instance_ids)))
    session.execute(update(Instance).where(Instance.study_id == study.id).values(state=InstanceState.PENDING))
    study.state = StudyState.QUEUED
    study.state_reason = "re-analysis requested"
    study.attempts = 0
    study.next_attempt_at = None
    study.claimed_by = None
    return True
