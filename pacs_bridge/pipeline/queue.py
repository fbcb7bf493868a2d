"""The one durable job queue of every pipeline stage, in the service's database.

A job (:class:`~pacs_bridge.store.models.Job`) is one piece of work of one
stage for one subject (a study; an output object and a destination). Life of
a job::

    pending ──claim──▶ running (lease: owner + expiry, renewed while working)
       ▲                  │ complete()      ──▶ done   (same transaction as the
       │                  │                          stage's outcome and the next job)
       └── backoff ◀──────┤ TransientError / any unexpected error, attempts left
                          │ PermanentError, or attempts / time used up ──▶ dead
                          └ lease expired (worker died) ──▶ claimable again

Claiming uses ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several
processes on several machines share the queue, and an atomic compare-and-set
``UPDATE`` on SQLite. At most one pending job exists per subject (a partial
unique index on ``dedup_key``), and a subject's job is not claimed while
another job of the same subject runs under a live lease, so the same study is
never analysed by two workers at once. Every function takes ``now`` so that
tests drive the clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from pacs_bridge.errors import Defer, PermanentError
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import Job, JobKind, JobState, utcnow

__all__ = [
    "ClaimedJob",
    "LeaseLost",
    "RetryPolicy",
    "any_due",
    "claim",
    "complete",
    "dedup_key",
    "enqueue",
    "fail",
    "next_due",
    "renew",
]

LOGGER = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """The job is no longer ours (its lease expired and another worker took it); roll back."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a kind of job is retried: backoff doubling from ``initial`` to ``maximum`` seconds.

    A job is dead after ``max_attempts`` attempts, or once ``give_up_after``
    has passed since its first attempt (whichever comes first; ``None`` = no
    such limit).
    """

    initial: float
    maximum: float
    max_attempts: int | None = None
    give_up_after: timedelta | None = None

    def delay(self, attempts: int) -> float:
        """Seconds before the attempt after ``attempts`` failed ones."""
        exponent = max(0, attempts - 1)
        if exponent > 60:
            return self.maximum
        return float(min(self.maximum, self.initial * math.pow(2, exponent)))

    def exhausted(self, attempts: int, first_attempt_at: datetime | None, now: datetime) -> bool:
        """True if no further attempt is allowed."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return True
        return bool(
            self.give_up_after is not None
            and first_attempt_at is not None
            and now - first_attempt_at >= self.give_up_after
        )


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker holds of a claimed job."""

    id: int
    kind: JobKind
    owner: str
    attempts: int
    study_id: int | None
    output_id: int | None
    destination: str | None
    first_attempt_at: datetime | None
    last_error: str | None


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def dedup_key(
    kind: JobKind, *, study_id: int | None = None, output_id: int | None = None, destination: str | None = None
) -> str:
    """The subject of a job, as stored in ``jobs.dedup_key``."""
    if kind is JobKind.DELIVER:
        return f"deliver:{output_id}:{destination}"
    return f"{kind.value}:{study_id}"


def enqueue(
    session: Session,
    kind: JobKind,
    *,
    study_id: int | None = None,
    output_id: int | None = None,
    destination: str | None = None,
    not_before: datetime | None = None,
    now: datetime | None = None,
) -> None:
    """Add a pending job unless one is already pending for the same subject (in the caller's transaction)."""
    now = now or utcnow()
    values: dict[str, Any] = {
        "kind": kind,
        "state": JobState.PENDING,
        "dedup_key": dedup_key(kind, study_id=study_id, output_id=output_id, destination=destination),
        "study_id": study_id,
        "output_id": output_id,
        "destination": destination,
        "not_before": not_before or now,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(postgresql.insert(Job).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        session.execute(sqlite.insert(Job).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - other engines: check first (the unique index still guards)
        pending = session.scalar(
            select(Job.id).where(Job.dedup_key == values["dedup_key"], Job.state == JobState.PENDING)
        )
        if pending is None:
            session.execute(insert(Job).values(**values))


def _claimable(kinds: Sequence[JobKind], now: datetime) -> Any:
    sibling = aliased(Job)
    busy = exists().where(
        sibling.dedup_key == Job.dedup_key,
        sibling.id != Job.id,
        sibling.state == JobState.RUNNING,
        sibling.lease_expires >= now,
    )
    due = or_(
        and_(Job.state == JobState.PENDING, Job.not_before <= now),
        and_(Job.state == JobState.RUNNING, Job.lease_expires < now),
    )
    return and_(Job.kind.in_(list(kinds)), due, ~busy)


def _retire_superseded(session: Session, kinds: Sequence[JobKind], now: datetime) -> None:
    """An expired running job with a newer pending job for the same subject is finished by that one."""
    sibling = aliased(Job)
    newer = exists().where(sibling.dedup_key == Job.dedup_key, sibling.state == JobState.PENDING)
    session.execute(
        update(Job)
        .where(Job.kind.in_(list(kinds)), Job.state == JobState.RUNNING, Job.lease_expires < now, newer)
        .values(
            state=JobState.DONE,
            finished_at=now,
            updated_at=now,
            lease_owner=None,
            last_error="worker lost its lease; a newer job of the same subject takes over",
        )
        .execution_options(synchronize_session=False)
    )


# Built once, bound per call: an idle stage looks for work twice a second, and one read of the
# due index is all it costs while nothing is due (no ORM session, no write lock on SQLite).
_KINDS: Any = bindparam("kinds", expanding=True)
_ANY_DUE = (
    select(Job.id)
    .where(
        Job.kind.in_(_KINDS),
        or_(
            and_(Job.state == JobState.PENDING, Job.not_before <= bindparam("now")),
            and_(Job.state == JobState.RUNNING, Job.lease_expires < bindparam("now")),
        ),
    )
    .limit(1)
)
_NEXT_PENDING = (
    select(func.min(Job.not_before))
    .where(Job.kind.in_(_KINDS), Job.state == JobState.PENDING, Job.not_before > bindparam("now"))
    .scalar_subquery()
)
_NEXT_LEASE = (
    select(func.min(Job.lease_expires))
    .where(Job.kind.in_(_KINDS), Job.state == JobState.RUNNING, Job.lease_expires > bindparam("now"))
    .scalar_subquery()
)
_NEXT_DUE = select(_NEXT_PENDING, _NEXT_LEASE)


def any_due(db: Database, kinds: Sequence[JobKind], *, now: datetime | None = None) -> bool:
    """True if a job of ``kinds`` may be claimable now (pending and due, or running with an expired lease).

    A read of the due index only; :func:`claim` still decides (another worker may take the job first).
    """
    now = now or utcnow()
    with db.engine.connect() as conn:
        return conn.execute(_ANY_DUE, {"kinds": list(kinds), "now": now}).first() is not None


def claim(
    db: Database,
    kinds: Sequence[JobKind],
    owner: str,
    *,
    limit: int = 1,
    lease_seconds: float = 60.0,
    now: datetime | None = None,
    destination: str | None = None,
) -> list[ClaimedJob]:
    """Lease up to ``limit`` due jobs of ``kinds`` to ``owner``, oldest first.

    ``destination`` restricts deliver jobs to one destination (a batch per association).
    """
    now = now or utcnow()
    if not any_due(db, kinds, now=now):
        return []
    expires = now + timedelta(seconds=lease_seconds)
    with db.session() as session:
        _retire_superseded(session, kinds, now)
        query = select(Job).where(_claimable(kinds, now))
        if destination is not None:
            query = query.where(Job.destination == destination)
        query = query.order_by(Job.not_before, Job.id).limit(limit)
        if session.get_bind().dialect.name == "postgresql":
            candidates = list(session.scalars(query.with_for_update(skip_locked=True, of=Job)))
        else:
            candidates = list(session.scalars(query))
        claimed: list[ClaimedJob] = []
        seen_keys: set[str] = set()
        for job in candidates:
            if job.dedup_key in seen_keys:
                continue
            # Compare-and-set: only if nobody changed the job since we read it.
            result = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == job.state, Job.updated_at == job.updated_at)
                .values(
                    state=JobState.RUNNING,
                    lease_owner=owner,
                    lease_expires=expires,
                    attempts=Job.attempts + 1,
                    first_attempt_at=job.first_attempt_at or now,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                continue
            seen_keys.add(job.dedup_key)
            if job.state == JobState.RUNNING:
                LOGGER.warning(
                    "%s job %d taken over from %s, whose lease expired", job.kind.value, job.id, job.lease_owner
                )
            claimed.append(
                ClaimedJob(
                    id=job.id,
                    kind=JobKind(job.kind),
                    owner=owner,
                    attempts=job.attempts + 1,
                    study_id=job.study_id,
                    output_id=job.output_id,
                    destination=job.destination,
                    first_attempt_at=aware(job.first_attempt_at) or now,
                    last_error=job.last_error,
                )
            )
        return claimed


def next_due(db: Database, kinds: Sequence[JobKind], *, now: datetime | None = None) -> float | None:
    """Seconds until a job of ``kinds`` next becomes due; None if no job waits for a later time.

    A pending job becomes due at its ``not_before`` (a deferred settle job at
    the end of its study's quiet period), a running job at its lease's expiry.
    Jobs already due are left out: if they could not be claimed just now
    (another worker holds them or their subject), looking again at once would
    only spin.
    """
    now = now or utcnow()
    with db.engine.connect() as conn:
        row = conn.execute(_NEXT_DUE, {"kinds": list(kinds), "now": now}).one()
    pending, leased = row[0], row[1]
    times = [t for t in (aware(pending), aware(leased)) if t is not None]
    if not times:
        return None
    return max(0.0, (min(times) - now).total_seconds())


def renew(db: Database, jobs: Iterable[ClaimedJob], *, lease_seconds: float, now: datetime | None = None) -> int:
    """Extend the leases of ``jobs`` still held by their owner; returns how many were renewed."""
    now = now or utcnow()
    renewed = 0
    with db.session() as session:
        for job in jobs:
            result = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.state == JobState.RUNNING, Job.lease_owner == job.owner)
                .values(lease_expires=now + timedelta(seconds=lease_seconds))
                .execution_options(synchronize_session=False)
            )
            renewed += int(result.rowcount or 0)  # type: ignore[attr-defined]
    return renewed


def complete(session: Session, job: ClaimedJob, *, now: datetime | None = None, note: str | None = None) -> None:
    """Mark ``job`` done in the caller's transaction (with the stage's outcome and next job).

    Raises :class:`LeaseLost` if the job is no longer ours; the caller's
    transaction must then roll back so that nothing is recorded twice.
    """
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == JobState.RUNNING, Job.lease_owner == job.owner)
        .values(
            state=JobState.DONE,
            finished_at=now,
            updated_at=now,
            lease_owner=None,
            lease_expires=None,
            last_error=note,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"{job.kind.value} job {job.id} is no longer held by {job.owner}")


def fail(
    db: Database, job: ClaimedJob, error: BaseException, policy: RetryPolicy, *, now: datetime | None = None
) -> JobState:
    """Record a failed attempt: back off and retry, defer, or dead-letter; returns the job's new state.

    :class:`~pacs_bridge.errors.Defer` reschedules without counting an attempt;
    :class:`~pacs_bridge.errors.PermanentError` is dead at once; anything else
    is retried until the policy is exhausted.
    """
    now = now or utcnow()
    message = f"{type(error).__name__}: {error}"[:2000]
    values: dict[str, Any] = {"updated_at": now, "lease_owner": None, "lease_expires": None}
    if isinstance(error, Defer):
        state = JobState.PENDING
        values.update(
            state=state,
            attempts=Job.attempts - 1,
            not_before=now + timedelta(seconds=max(error.seconds, 0.0)),
        )
    elif isinstance(error, PermanentError) or policy.exhausted(job.attempts, job.first_attempt_at, now):
        state = JobState.DEAD
        values.update(state=state, last_error=message, finished_at=now)
    else:
        state = JobState.PENDING
        values.update(state=state, last_error=message, not_before=now + timedelta(seconds=policy.delay(job.attempts)))

    def superseded(newer: int) -> dict[str, Any]:
        return {
            "updated_at": now,
            "lease_owner": None,
            "lease_expires": None,
            "state": JobState.DONE,
            "finished_at": now,
            "last_error": f"superseded by job {newer}: {message}",
        }

    def pending_sibling(session: Session) -> int | None:
        key = select(Job.dedup_key).where(Job.id == job.id).scalar_subquery()
        found: int | None = session.scalar(
            select(Job.id).where(Job.dedup_key == key, Job.state == JobState.PENDING, Job.id != job.id)
        )
        return found

    def record(session: Session, new_values: dict[str, Any]) -> bool:
        result = session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.RUNNING, Job.lease_owner == job.owner)
            .values(**new_values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    try:
        with db.session() as session:
            if state is JobState.PENDING:
                # A newer pending job of the same subject makes this one redundant (and the
                # partial unique index allows only one pending job per subject).
                newer = pending_sibling(session)
                if newer is not None:
                    state, values = JobState.DONE, superseded(newer)
            recorded = record(session, values)
    except IntegrityError:
        # A pending job of the same subject was queued between the check and the update: it supersedes this one.
        with db.session() as session:
            newer = pending_sibling(session)
            state = JobState.DONE
            recorded = record(session, superseded(newer or 0))
    if not recorded:
        LOGGER.warning("%s job %d: lease lost before its failure was recorded", job.kind.value, job.id)
        return JobState.RUNNING
    return state
