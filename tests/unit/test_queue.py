"""The job queue with an injected clock: leases, renewal, retries, dead letters, concurrent claimers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_bridge.errors import Defer, PermanentError, TransientError
from pacs_bridge.pipeline.queue import LeaseLost, RetryPolicy, claim, complete, enqueue, fail, next_due, renew
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.models import Job, JobKind, JobState, Study

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(initial=10, maximum=60, max_attempts=3)


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'queue.db'}")
    yield database
    database.dispose()


def _study(db: Database, uid: str = "1.2.3") -> int:
    with db.session() as session:
        study = Study(study_instance_uid=uid)
        session.add(study)
        session.flush()
        return study.id


def _enqueue(db: Database, kind: JobKind, now: datetime = T0, **subject: object) -> None:
    with db.session() as session:
        enqueue(session, kind, now=now, **subject)  # type: ignore[arg-type]


def _job(db: Database, job_id: int) -> Job:
    with db.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_one_pending_job_per_subject(db: Database) -> None:
    study = _study(db)
    for _ in range(3):
        _enqueue(db, JobKind.SETTLE, study_id=study)
    _enqueue(db, JobKind.ANALYSE, study_id=study)
    with db.sessions() as session:
        kinds = sorted(job.kind.value for job in session.scalars(select(Job)))
    assert kinds == ["analyse", "settle"]


def test_claim_complete_and_lease_lost(db: Database) -> None:
    study = _study(db)
    _enqueue(db, JobKind.ANALYSE, study_id=study)
    [job] = claim(db, [JobKind.ANALYSE], "a", lease_seconds=30, now=T0)
    assert job.attempts == 1 and job.study_id == study
    # Nobody else gets it while the lease lives.
    assert claim(db, [JobKind.ANALYSE], "b", now=T0 + timedelta(seconds=29)) == []
    # Renewed, it outlives its first expiry.
    assert renew(db, [job], lease_seconds=30, now=T0 + timedelta(seconds=20)) == 1
    assert claim(db, [JobKind.ANALYSE], "b", now=T0 + timedelta(seconds=45)) == []
    # Expired: another worker takes it over, and the first one can no longer complete it.
    [taken] = claim(db, [JobKind.ANALYSE], "b", now=T0 + timedelta(seconds=51))
    assert taken.id == job.id and taken.attempts == 2
    with pytest.raises(LeaseLost), db.session() as session:
        complete(session, job)
    with db.session() as session:
        complete(session, taken)
    assert _job(db, job.id).state == JobState.DONE


def test_transient_failures_back_off_then_dead_letter(db: Database) -> None:
    _enqueue(db, JobKind.PUBLISH, study_id=_study(db))
    now = T0
    delays = []
    for attempt in range(1, 4):
        [job] = claim(db, [JobKind.PUBLISH], "w", now=now)
        assert job.attempts == attempt
        state = fail(db, job, TransientError("disk full"), POLICY, now=now)
        row = _job(db, job.id)
        if attempt < 3:
            assert state == JobState.PENDING
            delay = (row.not_before.replace(tzinfo=UTC) - now).total_seconds()
            delays.append(delay)
            assert claim(db, [JobKind.PUBLISH], "w", now=now + timedelta(seconds=delay - 1)) == []
            now = now + timedelta(seconds=delay)
        else:
            assert state == JobState.DEAD
            assert row.last_error == "TransientError: disk full"
    assert delays == [10.0, 20.0]
    assert claim(db, [JobKind.PUBLISH], "w", now=now + timedelta(days=1)) == []


def test_permanent_failure_is_dead_at_once_and_defer_costs_no_attempt(db: Database) -> None:
    study = _study(db)
    _enqueue(db, JobKind.PUBLISH, study_id=study)
    [job] = claim(db, [JobKind.PUBLISH], "w", now=T0)
    assert fail(db, job, PermanentError("no such study"), POLICY, now=T0) == JobState.DEAD

    _enqueue(db, JobKind.SETTLE, study_id=study)
    for _ in range(5):
        [settle] = claim(db, [JobKind.SETTLE], "w", now=T0 + timedelta(hours=1))
        assert settle.attempts == 1
        fail(db, settle, Defer(0), POLICY, now=T0 + timedelta(hours=1))
    assert _job(db, settle.id).state == JobState.PENDING


def test_give_up_after_a_time(db: Database) -> None:
    _enqueue(db, JobKind.DELIVER, output_id=None, destination="pacs")
    policy = RetryPolicy(initial=1, maximum=1, give_up_after=timedelta(hours=1))
    [job] = claim(db, [JobKind.DELIVER], "w", now=T0)
    assert fail(db, job, TransientError("down"), policy, now=T0) == JobState.PENDING
    [job] = claim(db, [JobKind.DELIVER], "w", now=T0 + timedelta(hours=2))
    assert fail(db, job, TransientError("down"), policy, now=T0 + timedelta(hours=2)) == JobState.DEAD


def test_a_subject_is_not_worked_on_twice_at_once(db: Database) -> None:
    study = _study(db)
    _enqueue(db, JobKind.ANALYSE, study_id=study)
    [first] = claim(db, [JobKind.ANALYSE], "a", now=T0)
    # A late instance queues a new analysis while the first runs: it waits for the first to end.
    _enqueue(db, JobKind.ANALYSE, study_id=study)
    assert claim(db, [JobKind.ANALYSE], "b", now=T0 + timedelta(seconds=1)) == []
    with db.session() as session:
        complete(session, first)
    [second] = claim(db, [JobKind.ANALYSE], "b", now=T0 + timedelta(seconds=2))
    assert second.id != first.id

    # A worker that died with a newer job pending: the newer job takes over, the old one is retired.
    _enqueue(db, JobKind.ANALYSE, study_id=study, now=T0 + timedelta(seconds=3))
    claimed = claim(db, [JobKind.ANALYSE], "c", now=T0 + timedelta(minutes=5))
    assert [job.id for job in claimed] != [second.id] and len(claimed) == 1
    assert _job(db, second.id).state == JobState.DONE


def test_concurrent_claimers_never_share_a_job(db: Database) -> None:
    for index in range(60):
        _enqueue(db, JobKind.ANALYSE, study_id=_study(db, f"1.2.3.{index}"))
    taken: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            jobs = claim(db, [JobKind.ANALYSE], name, limit=3)
            if not jobs:
                return
            with lock:
                taken.extend(job.id for job in jobs)
            for job in jobs:
                with db.session() as session:
                    complete(session, job)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 60


def test_next_due_names_the_next_deferred_job_or_lease_expiry(db: Database) -> None:
    study = _study(db)
    assert next_due(db, [JobKind.SETTLE], now=T0) is None
    _enqueue(db, JobKind.SETTLE, study_id=study, now=T0)
    # Due already (and claimable or held elsewhere): not a reason to look again at once.
    assert next_due(db, [JobKind.SETTLE], now=T0) is None
    (job,) = claim(db, [JobKind.SETTLE], "a", lease_seconds=30, now=T0)
    fail(db, job, Defer(4.0, "study not quiet yet"), POLICY, now=T0)
    assert next_due(db, [JobKind.SETTLE], now=T0 + timedelta(seconds=1)) == pytest.approx(3.0)
    assert next_due(db, [JobKind.ANALYSE], now=T0) is None
    (job,) = claim(db, [JobKind.SETTLE], "a", lease_seconds=30, now=T0 + timedelta(seconds=4))
    # A running job becomes due again when its lease expires.
    assert next_due(db, [JobKind.SETTLE], now=T0 + timedelta(seconds=10)) == pytest.approx(24.0)


def test_a_job_queued_while_a_failure_is_recorded_supersedes_it(db: Database) -> None:
    """Check-then-update race: another writer queues the same subject's pending job just before the update."""
    from sqlalchemy import event

    study = _study(db)
    _enqueue(db, JobKind.SETTLE, study_id=study)
    [job] = claim(db, [JobKind.SETTLE], "a", now=T0)
    raced = {"done": False}

    def queue_sibling(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if not raced["done"] and statement.lstrip().upper().startswith("UPDATE JOBS"):
            raced["done"] = True
            other = open_database(str(db.engine.url))
            try:
                _enqueue(other, JobKind.SETTLE, study_id=study)  # committed by another connection
            finally:
                other.dispose()

    event.listen(db.engine, "before_cursor_execute", queue_sibling)
    try:
        state = fail(db, job, Defer(5.0), POLICY, now=T0)
    finally:
        event.remove(db.engine, "before_cursor_execute", queue_sibling)
    assert raced["done"]
    assert state == JobState.DONE
    mine = _job(db, job.id)
    assert mine.state == JobState.DONE and (mine.last_error or "").startswith("superseded by job")
    with db.session() as session:
        pending = session.scalars(select(Job).where(Job.kind == JobKind.SETTLE, Job.state == JobState.PENDING)).all()
    assert len(pending) == 1
