"""Drive pipeline stages by hand in tests: enqueue, claim and run one round, read the jobs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select

from pacs_bridge.pipeline.queue import claim, enqueue
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import Job, JobKind

__all__ = ["jobs_of_kind", "queue_job", "run_round"]


def queue_job(db: Database, kind: JobKind, **subject: Any) -> None:
    """Add a pending job (as the previous stage would)."""
    with db.session() as session:
        enqueue(session, kind, **subject)


def run_round(stage: Any, db: Database, *, owner: str = "test-node", now: datetime | None = None) -> int:
    """Claim one batch of the stage's due jobs and run it; returns the jobs completed."""
    jobs = claim(db, stage.kinds, owner, limit=stage.batch, lease_seconds=60, now=now)
    return int(stage.run(jobs)) if jobs else 0


def jobs_of_kind(db: Database, kind: JobKind) -> list[Job]:
    """Every job of ``kind``, oldest first."""
    with db.sessions() as session:
        return list(session.scalars(select(Job).where(Job.kind == kind).order_by(Job.id)))
