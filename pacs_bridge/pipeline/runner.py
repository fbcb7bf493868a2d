"""Runs one stage of the pipeline in a thread: claim jobs, renew their leases, do the work.

A :class:`Stage` says which job kinds it takes, how many at once and how
failures are retried; :class:`StageRunner` runs it until stopped. Every job's
outcome goes through :func:`run_job` (or the stage's own batch logic), so that
a job is completed in the same transaction as its outcome, and any failure,
native-extension panics included, fails that job only, with its reason. The
runner beats the node's :class:`~pacs_bridge.health.Health` every round; a
runner whose loop cannot go on marks its role dead (logged at ERROR and shown
by ``results`` and ``/healthz``) instead of vanishing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from sqlalchemy.orm import Session

from pacs_bridge import failpoints
from pacs_bridge.health import Health
from pacs_bridge.pipeline.queue import ClaimedJob, LeaseLost, RetryPolicy, claim, complete, fail, next_due, renew
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import JobKind, JobState

__all__ = ["Stage", "StageRunner", "describe", "fatal", "run_job"]

LOGGER = logging.getLogger(__name__)


def fatal(exc: BaseException) -> bool:
    """Exceptions that must stop the process rather than fail one job."""
    return isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit)


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, for job errors and logs."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Stage(Protocol):
    """One stage: the kinds it takes and how it does them."""

    role: str
    kinds: tuple[JobKind, ...]
    batch: int

    def policy(self, kind: JobKind) -> RetryPolicy:
        """How jobs of ``kind`` are retried."""
        ...

    def run(self, jobs: list[ClaimedJob]) -> int:
        """Do ``jobs`` (each completed or failed through the queue); returns how many completed."""
        ...

    def on_dead(self, job: ClaimedJob, error: BaseException) -> None:
        """A job became a dead letter: make it visible on its subject."""
        ...


def run_job(
    db: Database,
    stage: Stage,
    job: ClaimedJob,
    work: Callable[[Session], None],
) -> bool:
    """Run ``work`` and complete ``job`` in one transaction; on failure record it. True if completed."""
    try:
        with db.session() as session:
            work(session)
            complete(session, job)
            failpoints.hit(f"{job.kind.value}.before-commit")
        failpoints.hit(f"{job.kind.value}.after-commit")
        return True
    except LeaseLost as exc:
        LOGGER.warning("%s; its outcome was not recorded (another worker owns it now)", exc)
        return False
    except BaseException as exc:
        if fatal(exc):
            raise
        record_failure(db, stage, job, exc)
        return False


def record_failure(db: Database, stage: Stage, job: ClaimedJob, exc: BaseException) -> JobState:
    """Record a job's failure (retry, defer or dead letter) and log it for the administrator."""
    from pacs_bridge.errors import Defer

    state = fail(db, job, exc, stage.policy(job.kind))
    if isinstance(exc, Defer):
        return state
    subject = f"study id {job.study_id}" if job.study_id is not None else f"output {job.output_id}"
    if state is JobState.DEAD:
        LOGGER.error(
            "%s job %d (%s) failed for good after %d attempt(s): %s",
            job.kind.value,
            job.id,
            subject,
            job.attempts,
            describe(exc),
        )
        try:
            stage.on_dead(job, exc)
        except Exception:
            LOGGER.exception("could not mark the subject of dead %s job %d", job.kind.value, job.id)
    elif state is JobState.PENDING:
        LOGGER.warning(
            "%s job %d (%s) failed (attempt %d), will retry: %s",
            job.kind.value,
            job.id,
            subject,
            job.attempts,
            describe(exc),
        )
    return state


class _LeaseKeeper:
    """Renews the leases of the jobs in hand while the stage works on them."""

    def __init__(self, db: Database, jobs: list[ClaimedJob], lease_seconds: float) -> None:
        self.db = db
        self.jobs = jobs
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = max(self.lease_seconds / 3, 0.2)
        while not self._stop.wait(interval):
            try:
                renew(self.db, self.jobs, lease_seconds=self.lease_seconds)
            except Exception as exc:
                LOGGER.warning("could not renew %d job lease(s): %s", len(self.jobs), describe(exc))


class StageRunner:
    """Claims and runs one stage's jobs in a thread until :meth:`stop`."""

    def __init__(
        self,
        stage: Stage,
        db: Database,
        health: Health,
        *,
        owner: str,
        lease_seconds: float,
        poll_seconds: float,
    ) -> None:
        self.stage = stage
        self.db = db
        self.health = health
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.completed = 0
        self.on_progress: Callable[[], None] | None = None
        health.register(stage.role)

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._main, name=f"stage-{self.stage.role}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Look for work now."""
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Finish the jobs in hand, take no new ones."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self.health.stopped(self.stage.role)
        LOGGER.info("%s stage stopped after %d job(s)", self.stage.role, self.completed)

    def alive(self) -> bool:
        """True while the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the loop itself must never vanish silently
            self.health.dead(self.stage.role, describe(exc))
            if fatal(exc):
                raise

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self.health.beat(self.stage.role)
            try:
                busy = self.run_once()
                failures = 0
            except Exception as exc:
                failures += 1
                delay = min(30.0, self.poll_seconds * (2 ** min(failures, 6)))
                LOGGER.error(
                    "%s stage round failed (%s); trying again in %.1f s", self.stage.role, describe(exc), delay
                )
                self.health.failing(self.stage.role, describe(exc))
                self._stop.wait(delay)
                continue
            if not busy:
                self._wake.wait(self._idle_seconds())
                self._wake.clear()

    def _idle_seconds(self) -> float:
        """How long to wait for work: until the next job is due (a deferred settle job), at most one poll."""
        try:
            due = next_due(self.db, self.stage.kinds)
        except Exception as exc:
            LOGGER.debug("%s: could not read the next due job: %s", self.stage.role, describe(exc))
            return self.poll_seconds
        if due is None:
            return self.poll_seconds
        # A little after the due time, so that the job is claimable when we look.
        return min(self.poll_seconds, due + 0.005)

    def run_once(self) -> bool:
        """Claim and run one batch; True if there was work."""
        jobs = claim(self.db, self.stage.kinds, self.owner, limit=self.stage.batch, lease_seconds=self.lease_seconds)
        if not jobs:
            return False
        started = time.monotonic()
        with _LeaseKeeper(self.db, jobs, self.lease_seconds):
            try:
                done = self.stage.run(jobs)
            except BaseException as exc:
                if fatal(exc):
                    raise
                # The stage could not even report per job: every job in hand fails with the reason.
                LOGGER.error("%s stage failed on %d job(s): %s", self.stage.role, len(jobs), describe(exc))
                for job in jobs:
                    record_failure(self.db, self.stage, job, exc)
                done = 0
        self.completed += done
        if done:
            self.health.progress(self.stage.role, done)
            if self.on_progress is not None:
                self.on_progress()
        LOGGER.debug("%s: %d of %d job(s) done in %.2f s", self.stage.role, done, len(jobs), time.monotonic() - started)
        return True
