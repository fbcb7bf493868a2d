"""The deliver stage: send result objects to their destinations, through the job queue.

Each deliver job is one output object for one destination. A round takes the
due jobs, groups them by destination and sends each group over one
association (or one HTTP/MLLP exchange per object for the other destination
types, :mod:`pacs_bridge.send.transport`), destinations in parallel so that
one that hangs does not hold up another. Outcomes:

- stored (DIMSE 0x0000 or a warning, HTTP 2xx, HL7 AA): the job is done;
- a transient failure (destination down, timeout): retried after
  ``retry_initial_seconds`` doubling up to ``retry_max_seconds``;
- a permanent failure (refused object, missing file), or still failing
  ``retry_for_hours`` after the first attempt: a dead letter, shown by
  ``results`` and the console; ``pacs-bridge resend STUDY_UID`` queues again.

An object superseded by a newer revision before it was sent is not sent.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pacs_bridge import failpoints
from pacs_bridge.config import DestinationSettings, Settings
from pacs_bridge.errors import PermanentError, TransientError
from pacs_bridge.pipeline.analysis import mark_study_failed
from pacs_bridge.pipeline.queue import ClaimedJob, RetryPolicy, complete
from pacs_bridge.pipeline.runner import describe, record_failure, run_job
from pacs_bridge.send.dimse import SendResult, send_files
from pacs_bridge.store.db import Database
from pacs_bridge.store.layout import resolve_stored
from pacs_bridge.store.models import JobKind, OutputObject, Study

__all__ = ["DeliverStage", "send_to"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Item:
    job: ClaimedJob
    path: Path
    kind: str
    sop_instance_uid: str
    study_uid: str
    superseded: bool


def send_to(destination: DestinationSettings, items: Sequence[_Item], settings: Settings) -> list[SendResult]:
    """Send ``items`` to ``destination`` with its transport; one result per item, in order."""
    try:
        from pacs_bridge.send import transport
    except ImportError:
        calling = destination.calling_ae_title or settings.dicom.ae_title
        return send_files(destination, calling, [item.path for item in items], settings.send.timeout)
    outgoing = [
        transport.OutgoingItem(
            path=item.path, kind=item.kind, sop_instance_uid=item.sop_instance_uid, study_instance_uid=item.study_uid
        )
        for item in items
    ]
    return list(transport.deliver(destination, outgoing, settings))


def _permanent(result: SendResult) -> bool:
    value: Any = getattr(result, "permanent", None)
    if value is None:
        return bool(result.error and result.error.startswith(("output file missing", "unreadable file")))
    return bool(value)


class DeliverStage:
    """Delivers result objects (see :mod:`pacs_bridge.pipeline.runner`)."""

    role = "send"
    kinds: tuple[JobKind, ...] = (JobKind.DELIVER,)
    batch = 200

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db

    def policy(self, kind: JobKind) -> RetryPolicy:
        """[send] retry_initial_seconds doubling to retry_max_seconds; dead after retry_for_hours."""
        send = self.settings.send
        return RetryPolicy(
            initial=send.retry_initial_seconds,
            maximum=send.retry_max_seconds,
            give_up_after=timedelta(hours=send.retry_for_hours),
        )

    def on_dead(self, job: ClaimedJob, error: BaseException) -> None:
        """The study is failed: a result object could not be delivered."""
        with self.db.sessions() as session:
            output = session.get(OutputObject, job.output_id) if job.output_id is not None else None
            study_id = output.study_id if output is not None else None
            kind = output.kind if output is not None else "object"
        mark_study_failed(
            self.db,
            study_id,
            f"{kind} could not be delivered to {job.destination}: {describe(error)}; "
            "`pacs-bridge resend` queues it again",
        )

    def _items(self, jobs: list[ClaimedJob]) -> list[_Item]:
        data_dir = self.settings.storage.data_dir
        items: list[_Item] = []
        with self.db.sessions() as session:
            rows = {
                output.id: (output, study_uid)
                for output, study_uid in session.execute(
                    select(OutputObject, Study.study_instance_uid)
                    .join(Study, OutputObject.study_id == Study.id)
                    .where(OutputObject.id.in_([job.output_id for job in jobs]))
                )
            }
        for job in jobs:
            found = rows.get(job.output_id or -1)
            if found is None:
                record_failure(self.db, self, job, PermanentError(f"output object {job.output_id} no longer exists"))
                continue
            output, study_uid = found
            items.append(
                _Item(
                    job,
                    resolve_stored(data_dir, output.file_path),
                    output.kind,
                    output.sop_instance_uid,
                    study_uid,
                    output.superseded,
                )
            )
        return items

    def run(self, jobs: list[ClaimedJob]) -> int:
        """Send the claimed deliveries, one group per destination, groups in parallel."""
        items = self._items(jobs)
        groups: dict[str, list[_Item]] = {}
        done = 0
        for item in items:
            if item.superseded:
                if run_job(self.db, self, item.job, lambda _session: None):
                    done += 1
                continue
            groups.setdefault(item.job.destination or "", []).append(item)
        if not groups:
            return done
        configured = {d.name: d for d in self.settings.destinations}
        with ThreadPoolExecutor(max_workers=min(8, len(groups)), thread_name_prefix="send") as pool:
            futures = [
                pool.submit(self._send_group, configured.get(name), name, group) for name, group in groups.items()
            ]
            for future in futures:
                done += future.result()
        return done

    def _send_group(self, destination: DestinationSettings | None, name: str, items: list[_Item]) -> int:
        if destination is None:
            missing = PermanentError(f"destination {name!r} is not configured any more")
            for item in items:
                record_failure(self.db, self, item.job, missing)
            return 0
        present = [item for item in items if item.path.is_file()]
        for item in items:
            if not item.path.is_file():
                record_failure(self.db, self, item.job, PermanentError(f"output file missing: {item.path}"))
        if not present:
            return 0
        try:
            results = send_to(destination, present, self.settings)
        except Exception as exc:  # transports report per item; this is a last resort
            LOGGER.exception("sending to %s failed unexpectedly", name)
            for item in present:
                record_failure(self.db, self, item.job, TransientError(describe(exc)))
            return 0
        done = 0
        for item, result in zip(present, results, strict=True):
            what = f"{item.kind} {item.sop_instance_uid} of study {item.study_uid} to {name}"
            if result.ok:
                try:
                    with self.db.session() as session:
                        complete(session, item.job, note=None)
                        failpoints.hit("deliver.before-commit")
                except Exception as exc:
                    LOGGER.warning("delivered %s, but: %s", what, describe(exc))
                    continue
                failpoints.hit("deliver.after-commit")
                done += 1
                LOGGER.info("delivered %s (%s)", what, result.describe())
                continue
            error: Exception = (
                PermanentError(result.describe()) if _permanent(result) else TransientError(result.describe())
            )
            record_failure(self.db, self, item.job, error)
        return done
