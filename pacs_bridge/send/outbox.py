"""The outbox: deliver result objects to every destination, retry with backoff, keep dead letters.

Each ``Delivery`` row is one output object for one destination. A round
(:func:`deliver_due`) takes the pending rows that are due, sends them with one
association per destination (:func:`pacs_bridge.send.dimse.send_files`, PS3.4
Annex B), destinations in parallel so that one that hangs does not hold up
another, and records each outcome:

- stored (status 0x0000 or a warning): ``sent`` with ``sent_at``;
- failed: ``attempts`` + 1, ``last_error``, next attempt after
  ``retry_initial_seconds`` doubling per attempt up to ``retry_max_seconds``;
- still failing ``retry_for_hours`` after the first attempt: ``dead``
  (kept, shown in the console; ``pacs-bridge resend STUDY_UID`` queues again).

Output files are kept after delivery (this version deletes nothing), so a
resend can always be served. :class:`Outbox` runs rounds in a thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from pacs_bridge.config import DestinationSettings, Settings
from pacs_bridge.send.dimse import SendResult, send_files
from pacs_bridge.store.db import Database
from pacs_bridge.store.models import Delivery, DeliveryState, OutputObject, Study, utcnow

__all__ = ["Outbox", "backoff_seconds", "deliver_due", "resend_study"]

LOGGER = logging.getLogger(__name__)

_BATCH = 500
"""Deliveries taken per round; the rest wait for the next round."""


@dataclass(frozen=True)
class _Due:
    delivery_id: int
    destination: str
    path: Path
    sop_instance_uid: str
    kind: str
    study_uid: str
    attempts: int
    first_attempt_at: datetime | None


def _aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay before the next attempt after ``attempts`` failed ones: ``initial`` doubling, capped at ``maximum``."""
    exponent = max(0, attempts - 1)
    if exponent > 60:
        return maximum
    return float(min(maximum, initial * (2**exponent)))


def _claim(db: Database, now: datetime, lease: timedelta) -> list[_Due]:
    """Take the due deliveries and push their next attempt past the lease, so another worker skips them."""
    with db.session() as session:
        rows = session.execute(
            select(Delivery, OutputObject, Study.study_instance_uid)
            .join(OutputObject, Delivery.output_id == OutputObject.id)
            .join(Study, OutputObject.study_id == Study.id)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(_BATCH)
            .with_for_update(skip_locked=True, of=Delivery)
        ).all()
        due: list[_Due] = []
        for delivery, output, study_uid in rows:
            due.append(
                _Due(
                    delivery_id=delivery.id,
                    destination=delivery.destination,
                    path=Path(output.file_path),
                    sop_instance_uid=output.sop_instance_uid,
                    kind=output.kind,
                    study_uid=study_uid,
                    attempts=delivery.attempts,
                    first_attempt_at=_aware(delivery.first_attempt_at),
                )
            )
            delivery.next_attempt_at = now + lease
        return due


def _send_group(
    destination: DestinationSettings | None, name: str, items: list[_Due], settings: Settings
) -> list[tuple[_Due, SendResult]]:
    if destination is None:
        error = f"destination {name!r} is not configured any more"
        return [(item, SendResult(item.path, item.sop_instance_uid, False, error=error)) for item in items]
    present = [item for item in items if item.path.is_file()]
    outcomes = [
        (item, SendResult(item.path, item.sop_instance_uid, False, error=f"output file missing: {item.path}"))
        for item in items
        if not item.path.is_file()
    ]
    if present:
        calling = destination.calling_ae_title or settings.dicom.ae_title
        try:
            results = send_files(destination, calling, [item.path for item in present], settings.send.timeout)
        except Exception as exc:  # send_files reports per file; this is a last resort
            LOGGER.exception("sending to %s failed unexpectedly", name)
            error = f"{type(exc).__name__}: {exc}"
            results = [SendResult(item.path, item.sop_instance_uid, False, error=error) for item in present]
        outcomes.extend(zip(present, results, strict=True))
    return outcomes


def _record(db: Database, outcomes: list[tuple[_Due, SendResult]], settings: Settings, now: datetime) -> dict[str, int]:
    counts = {"sent": 0, "retry": 0, "dead": 0}
    give_up_after = timedelta(hours=settings.send.retry_for_hours)
    with db.session() as session:
        for item, result in outcomes:
            delivery = session.get(Delivery, item.delivery_id)
            if delivery is None or delivery.state != DeliveryState.PENDING:
                continue  # deleted or reset meanwhile
            delivery.attempts = item.attempts + 1
            first = item.first_attempt_at or now
            delivery.first_attempt_at = first
            what = f"{item.kind} {item.sop_instance_uid} of study {item.study_uid} to {item.destination}"
            if result.ok:
                delivery.state = DeliveryState.SENT
                delivery.sent_at = now
                delivery.last_error = None
                counts["sent"] += 1
                LOGGER.info("delivered %s (%s)", what, result.describe())
                continue
            error = result.describe()
            delivery.last_error = error[:2000]
            permanent = error.startswith(("output file missing", "unreadable file"))
            if permanent or now - first >= give_up_after:
                delivery.state = DeliveryState.DEAD
                counts["dead"] += 1
                LOGGER.error(
                    "gave up delivering %s after %d attempt(s): %s; `pacs-bridge resend %s` queues it again",
                    what,
                    delivery.attempts,
                    error,
                    item.study_uid,
                )
                continue
            delay = backoff_seconds(
                delivery.attempts, settings.send.retry_initial_seconds, settings.send.retry_max_seconds
            )
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            counts["retry"] += 1
            LOGGER.warning(
                "delivery of %s failed (attempt %d), retry in %.0f s: %s", what, delivery.attempts, delay, error
            )
    return counts


def deliver_due(db: Database, settings: Settings, now: datetime | None = None) -> dict[str, int]:
    """Run one delivery round; returns counts ``{"sent", "retry", "dead"}``.

    Deliveries with ``next_attempt_at <= now`` are sent, one association per
    destination, destinations in parallel.
    """
    given = _aware(now)
    now = given or utcnow()
    lease = timedelta(seconds=max(60.0, 4 * settings.send.timeout))
    due = _claim(db, now, lease)
    if not due:
        return {"sent": 0, "retry": 0, "dead": 0}
    groups: dict[str, list[_Due]] = {}
    for item in due:
        groups.setdefault(item.destination, []).append(item)
    configured = {d.name: d for d in settings.destinations}
    outcomes: list[tuple[_Due, SendResult]] = []
    with ThreadPoolExecutor(max_workers=min(8, len(groups)), thread_name_prefix="outbox-send") as pool:
        futures = [
            pool.submit(_send_group, configured.get(name), name, items, settings) for name, items in groups.items()
        ]
        for future in futures:
            outcomes.extend(future.result())
    # Outcomes are recorded at the time the round finished, so backoff counts from the failure.
    return _record(db, outcomes, settings, given or utcnow())


def resend_study(db: Database, study_uid: str, destinations: Sequence[str] | None = None) -> int:
    """Queue every output object of a study again (sent and dead ones included); returns the deliveries queued.

    ``destinations`` (names) also adds deliveries for destinations that have
    none yet, e.g. one configured after the study was published. Used by
    ``pacs-bridge resend STUDY_UID``.
    """
    now = utcnow()
    count = 0
    with db.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).first()
        if study is None:
            raise LookupError(f"no study {study_uid}")
        outputs = session.scalars(select(OutputObject).where(OutputObject.study_id == study.id)).all()
        for output in outputs:
            existing = {d.destination: d for d in output.deliveries}
            for name in destinations or ():
                if name not in existing:
                    delivery = Delivery(output_id=output.id, destination=name)
                    session.add(delivery)
                    existing[name] = delivery
            for delivery in existing.values():
                delivery.reset(now)
                count += 1
    LOGGER.info("study %s: %d deliver%s queued again", study_uid, count, "y" if count == 1 else "ies")
    return count


class Outbox:
    """Runs :func:`deliver_due` every ``interval`` seconds in a thread until :meth:`stop`.

    :meth:`wake` starts a round at once (after a study was published).
    """

    def __init__(self, db: Database, settings: Settings, interval: float = 1.0) -> None:
        self.db = db
        self.settings = settings
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.totals = {"sent": 0, "retry": 0, "dead": 0}

    def start(self) -> None:
        """Start the delivery thread (no-op if running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()
        LOGGER.info("outbox started: %d destination(s)", len(self.settings.destinations))

    def wake(self) -> None:
        """Run the next round now rather than at the next tick."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the round in progress, start no new one, and wait for the thread."""
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout if timeout is not None else self.settings.send.timeout * 3 + 5)
        LOGGER.info(
            "outbox stopped: %d sent, %d retries, %d dead",
            self.totals["sent"],
            self.totals["retry"],
            self.totals["dead"],
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                counts = deliver_due(self.db, self.settings)
                for key, value in counts.items():
                    self.totals[key] = self.totals.get(key, 0) + value
            except Exception:
                LOGGER.exception("outbox round failed; trying again in %.0f s", self.interval)
            self._wake.wait(self.interval)
            self._wake.clear()
