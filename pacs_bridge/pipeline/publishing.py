"""The publish stage: build an analysed study's result objects and queue their deliveries.

The objects are built and written durably by
:func:`pacs_bridge.report.publish.publish_study` (their UIDs follow from
their content, so a rebuild after a crash writes the same files); their rows,
the revision they are (an earlier revision's rows marked superseded), one
deliver job per object and destination, and the study's ``done`` state are
committed in the transaction that completes the publish job. A rebuild of
unchanged content queues no delivery of an object already sent to that
destination, so a PACS that keeps the first copy of a SOP Instance receives
nothing twice. Which
destination receives which object follows each destination's ``objects``,
``from_aets`` and ``return_to_sender`` settings.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_bridge.config import DestinationSettings, Settings
from pacs_bridge.errors import PermanentError
from pacs_bridge.pipeline.analysis import mark_study_failed
from pacs_bridge.pipeline.queue import ClaimedJob, RetryPolicy, enqueue
from pacs_bridge.pipeline.runner import describe, fatal, record_failure, run_job
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import Job, JobKind, JobState, OutputObject, Study, StudyState

__all__ = ["PublishStage", "destination_accepts", "destination_routes", "queue_deliveries"]

LOGGER = logging.getLogger(__name__)

_DICOM_KINDS = ("sr", "capture", "gsps", "summary", "rejection")


def destination_accepts(destination: DestinationSettings, kind: str) -> bool:
    """True if ``destination`` receives result objects of ``kind``."""
    try:
        from pacs_bridge.send.transport import accepts
    except ImportError:
        objects: Any = getattr(destination, "objects", None)
        if objects:
            return kind in objects
        return kind in _DICOM_KINDS
    return bool(accepts(destination, kind))


def destination_routes(destination: DestinationSettings, calling_aet: str | None) -> bool:
    """True if ``destination`` receives the results of a study sent by ``calling_aet``."""
    try:
        from pacs_bridge.send.transport import routes
    except ImportError:
        return True
    return bool(routes(destination, calling_aet))


def _sent(session: Session, output_id: int, destination: str) -> bool:
    found = session.scalar(
        select(Job.id).where(
            Job.kind == JobKind.DELIVER,
            Job.output_id == output_id,
            Job.destination == destination,
            Job.state == JobState.DONE,
        )
    )
    return found is not None


def queue_deliveries(
    session: Session,
    outputs: list[OutputObject],
    settings: Settings,
    calling_aet: str | None,
    *,
    unsent_only: bool = False,
) -> int:
    """Create one deliver job per output object and destination that takes it; returns how many.

    With ``unsent_only``, an object already delivered to a destination is not
    queued for it again (an unchanged rebuild); an explicit resend passes false.
    """
    count = 0
    for destination in settings.destinations:
        if not destination_routes(destination, calling_aet):
            continue
        for output in outputs:
            if output.superseded or not destination_accepts(destination, output.kind):
                continue
            if unsent_only and _sent(session, output.id, destination.name):
                continue
            enqueue(session, JobKind.DELIVER, output_id=output.id, destination=destination.name)
            count += 1
    return count


class PublishStage:
    """Builds and records result objects (see :mod:`pacs_bridge.pipeline.runner`)."""

    role = "publish"
    kinds: tuple[JobKind, ...] = (JobKind.PUBLISH,)
    batch = 1

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def policy(self, kind: JobKind) -> RetryPolicy:
        """Publishing retries like analysis."""
        return RetryPolicy(
            initial=self.settings.analysis.retry_seconds,
            maximum=max(self.settings.analysis.retry_seconds, 3600.0),
            max_attempts=self.settings.analysis.max_attempts,
        )

    def on_dead(self, job: ClaimedJob, error: BaseException) -> None:
        """The study is failed: its results could not be built."""
        mark_study_failed(self.db, job.study_id, f"results could not be built: {describe(error)}")

    def run(self, jobs: list[ClaimedJob]) -> int:
        """Build, write and record each study's result objects."""
        from pacs_bridge.report.publish import publish_study, record_outputs

        done = 0
        for job in jobs:
            if job.study_id is None:
                record_failure(self.db, self, job, PermanentError("publish job without a study"))
                continue
            try:
                written = publish_study(self.db, job.study_id, self.settings)
            except BaseException as exc:
                if fatal(exc):
                    raise
                record_failure(self.db, self, job, exc)
                continue
            study_id = job.study_id

            def record(session: Session, written: Any = written, study_id: int = study_id) -> None:
                study = session.get(Study, study_id)
                if study is None:
                    raise PermanentError(f"study id {study_id} does not exist")
                outputs = record_outputs(session, study_id, written, self.settings.storage.data_dir)
                queued = queue_deliveries(session, outputs, self.settings, study.calling_aet, unsent_only=True)
                if not written:
                    state, reason = StudyState.FAILED, "analysed, but no result object could be built"
                else:
                    state, reason = StudyState.DONE, None
                session.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.state == StudyState.ANALYSING)
                    .values(state=state, state_reason=reason)
                    .execution_options(synchronize_session=False)
                )
                LOGGER.info(
                    "study %s: %d result object(s) recorded, %d deliveries queued",
                    study.study_instance_uid,
                    len(outputs),
                    queued,
                )

            if run_job(self.db, self, job, record):
                done += 1
        return done
