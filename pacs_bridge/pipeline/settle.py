"""Study completion and routing: the settle stage.

DICOM has no "study complete" message for C-STORE pushes, so a study is
considered complete after a quiet period with no new instance (as mercure's
study timers do). Every stored instance makes sure a settle job is pending
for its study (see :mod:`pacs_bridge.store.index`); the job runs once the
study has been quiet for ``settle_seconds`` (earlier, it defers itself to the
end of the quiet period). A settled study is routed once: queued for analysis
(an analyse job, created in the same transaction) when its modality and SOP
classes are ones the model reads, otherwise kept and marked skipped with the
reason. A late instance puts the study back to ``receiving``, so it settles
again and only the new instance is analysed.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_bridge.config import StudySettings
from pacs_bridge.errors import Defer, PermanentError
from pacs_bridge.pipeline.queue import ClaimedJob, RetryPolicy, aware, enqueue
from pacs_bridge.pipeline.runner import run_job
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import Instance, JobKind, Series, Study, StudyState, utcnow

__all__ = ["SettleStage", "route", "settle_job", "settle_study"]

LOGGER = logging.getLogger(__name__)


def route(session: Session, study: Study, settings: StudySettings) -> tuple[bool, str]:
    """Decide whether ``study`` is analysed; return (queued, reason)."""
    rows = session.execute(
        select(Series.modality, Instance.sop_class_uid)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
    ).all()
    modalities = {m for m, _ in rows if m}
    wanted = {m.upper() for m in settings.modalities}
    analysable = [1 for m, c in rows if (m or "").upper() in wanted and c in settings.sop_classes]
    if analysable:
        return True, f"{len(analysable)} of {len(rows)} instances analysable"
    if not modalities & wanted:
        return False, f"modality {'/'.join(sorted(modalities)) or 'unknown'} is not routed ([study] modalities)"
    return False, "no instance of an analysed SOP class ([study] sop_classes)"


def settle_study(
    session: Session, study: Study, settings: StudySettings, *, now: datetime | None = None, force: bool = False
) -> float | None:
    """Settle ``study`` if it is quiet (or ``force``); returns seconds to wait if it is not quiet yet.

    In the caller's transaction: the study becomes ``queued`` (and an analyse
    job is created) or ``skipped``. A study that is not ``receiving`` is left
    as it is.
    """
    now = now or utcnow()
    if study.state != StudyState.RECEIVING:
        return None
    last = aware(study.last_received_at) or now
    quiet_at = last + timedelta(seconds=settings.settle_seconds)
    if not force and quiet_at > now:
        return max((quiet_at - now).total_seconds(), 0.05)
    queued, reason = route(session, study, settings)
    new_state = StudyState.QUEUED if queued else StudyState.SKIPPED
    # Compare-and-set: a late instance committed meanwhile keeps the study receiving.
    result = session.execute(
        update(Study)
        .where(
            Study.id == study.id,
            Study.state == StudyState.RECEIVING,
            Study.last_received_at == study.last_received_at,
        )
        .values(state=new_state, state_reason=None if queued else reason, settled_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return max(settings.settle_seconds, 0.05)
    if queued:
        enqueue(session, JobKind.ANALYSE, study_id=study.id, now=now)
    LOGGER.info(
        "study %s settled: %d instances, %d bytes, received over %.1f s; %s (%s)",
        study.study_instance_uid,
        study.instance_count,
        study.total_bytes,
        (last - (aware(study.first_received_at) or last)).total_seconds(),
        "queued for analysis" if queued else "skipped",
        reason,
    )
    return None


def settle_job(session: Session, job: ClaimedJob, settings: StudySettings, *, now: datetime | None = None) -> None:
    """Run one settle job in the caller's transaction (which completes it), or raise :class:`Defer`."""
    now = now or utcnow()
    study = session.get(Study, job.study_id) if job.study_id is not None else None
    if study is None:
        raise PermanentError(f"study id {job.study_id} does not exist")
    wait = settle_study(session, study, settings, now=now)
    if wait is not None:
        raise Defer(wait, "study not quiet yet")


class SettleStage:
    """Settles quiet studies (see :mod:`pacs_bridge.pipeline.runner`)."""

    role = "settle"
    kinds: tuple[JobKind, ...] = (JobKind.SETTLE,)
    batch = 50

    def __init__(self, settings: StudySettings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def policy(self, kind: JobKind) -> RetryPolicy:
        """Settling only fails on database errors: retry soon, for long."""
        return RetryPolicy(initial=1.0, maximum=60.0, max_attempts=50)

    def on_dead(self, job: ClaimedJob, error: BaseException) -> None:
        """Nothing to mark: the study stays ``receiving`` and the next instance queues a settle job again."""

    def run(self, jobs: list[ClaimedJob]) -> int:
        """Settle each study whose quiet period is over; defer the others."""
        done = 0
        for job in jobs:
            if run_job(self.db, self, job, lambda session, j=job: settle_job(session, j, self.settings)):  # type: ignore[misc]
                done += 1
        return done
