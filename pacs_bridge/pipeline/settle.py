"""Study completion and routing.

DICOM has no "study complete" message for C-STORE pushes, so a study is
considered complete after a quiet period with no new instance (as mercure's
study timers do). A settled study is routed once: queued for analysis when
its modality and SOP classes are ones the model reads, otherwise kept and
marked skipped with the reason. A late instance puts the study back to
``receiving`` (see :mod:`pacs_bridge.store.index`), so it settles again.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pacs_bridge.config import StudySettings
from pacs_bridge.store.models import Instance, Series, Study, StudyState, utcnow

__all__ = ["route", "settle_due"]

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


def settle_due(session: Session, settings: StudySettings, now: datetime | None = None) -> list[str]:
    """Settle every study quiet for ``settle_seconds``; return their UIDs."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.settle_seconds)
    due = session.scalars(
        select(Study).where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
    ).all()
    settled = []
    for study in due:
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
            .values(
                state=new_state,
                state_reason=None if queued else reason,
                settled_at=now,
                attempts=0,
                next_attempt_at=None,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        session.commit()
        settled.append(study.study_instance_uid)
        LOGGER.info(
            "study %s settled: %d instances, %d bytes, received over %.1f s; %s (%s)",
            study.study_instance_uid,
            study.instance_count,
            study.total_bytes,
            (study.last_received_at - study.first_received_at).total_seconds(),
            "queued for analysis" if queued else "skipped",
            reason,
        )
    return settled
