"""DIMSE event handlers: association policy, C-ECHO and C-STORE.

C-STORE (PS3.4 Annex B, Storage Service Class as SCP) keeps the bytes as
received (File Meta Information plus the data set in its transfer syntax,
PS3.10 §7), written into the spool's temp folder while they arrive
(``receive/streaming.py``; ``event.encoded_dataset()`` when that is off), and
answers only after the spool file and its index row are durable. A request whose command names another SOP class
or instance than its data set holds is refused with 0xA900 before any byte
is written (PS3.4 B.2.3), so a success always means "the instance you named
is safe". C-ECHO is the Verification Service Class (PS3.4
Annex A). Every handler answers with a status; none raises. A data set cut
short for its size while it arrived (``receive/network.py``) is answered
0xA700 without being decoded.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from pynetdicom import events as evt

from pacs_bridge.logsafe import redact
from pacs_bridge.receive.decode import InflatesTooLarge, dataset_from_c_store, dataset_from_received_file
from pacs_bridge.receive.ingest import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    Ingestor,
)
from pacs_bridge.receive.streaming import take_write_error

__all__ = ["AssociationPolicy", "AssociationStats", "Handlers", "ReceivedStore"]

LOGGER = logging.getLogger(__name__)


@dataclass
class AssociationStats:
    """Counters for one association, logged when it ends."""

    calling_aet: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    bytes: int = 0
    studies: set[str] = field(default_factory=set)


def _host_matches(peer: str, allowed: str) -> bool:
    if peer == allowed:
        return True
    try:
        if ipaddress.ip_address(peer) in ipaddress.ip_network(allowed, strict=False):
            return True
    except ValueError:
        pass
    try:
        return peer in {info[4][0] for info in socket.getaddrinfo(allowed, None)}
    except OSError:
        return False


@dataclass(frozen=True)
class AssociationPolicy:
    """Who may associate: calling AE titles (optionally bound to a host or network)."""

    allowed: tuple[str, ...]

    def permits(self, calling_aet: str, peer: str) -> bool:
        """True if ``calling_aet`` from ``peer`` may store here. An empty list permits all."""
        if not self.allowed:
            return True
        for entry in self.allowed:
            aet, _, host = entry.partition("@")
            if aet == calling_aet and (not host or _host_matches(peer, host)):
                return True
        return False


def _staged_file(event: Any) -> Path | None:
    """The file the data set was written to while it arrived (``receive/streaming.py``), if it was."""
    try:
        path = event.dataset_path
    except AttributeError:
        return None
    return Path(path) if path is not None else None


@dataclass(frozen=True)
class ReceivedStore:
    """One C-STORE request as received (PS3.7 9.3.1.1): its command's values and where its data set is."""

    message_id: int
    affected_sop_class: str
    affected_sop_instance: str
    context_class: str
    """The abstract syntax of the presentation context it came on."""
    transfer_syntax: str
    staged: Path | None
    """The PS3.10 file its data set was written to while it arrived; None when it is held in memory."""
    write_error: OSError | None = None
    cut_at: int | None = None
    """Bytes received when the data set was cut short for its size (``[dicom] max_instance_mb``)."""
    data_offset: int | None = None
    """Where the data set begins in ``staged`` when the receiver wrote its File Meta Information itself."""


def _from_event(event: Any, staged: Path | None) -> ReceivedStore:
    request = event.request
    take_refusal = getattr(event.assoc.dul, "take_refusal", None)
    return ReceivedStore(
        message_id=int(request.MessageID),
        affected_sop_class=str(request.AffectedSOPClassUID or "").strip("\x00 "),
        affected_sop_instance=str(request.AffectedSOPInstanceUID or "").strip("\x00 "),
        context_class=str(event.context.abstract_syntax),
        transfer_syntax=str(event.context.transfer_syntax),
        staged=staged,
        write_error=take_write_error(staged) if staged is not None else None,
        cut_at=take_refusal(int(request.MessageID)) if take_refusal is not None else None,
    )


class Handlers:
    """The SCP's event handlers, bound to one :class:`Ingestor`."""

    def __init__(self, ingestor: Ingestor, policy: AssociationPolicy, on_stored: Callable[[str], None]) -> None:
        self.ingestor = ingestor
        self.policy = policy
        self.on_stored = on_stored
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()
        self.in_flight = 0

    def bindings(self) -> list[Any]:
        """``evt_handlers`` for ``AE.start_server``."""
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_REJECTED, self.on_rejected),
        ]

    def on_requested(self, event: Any) -> None:
        """Reject callers outside the allow-list: A-ASSOCIATE-RJ, calling AE title not recognised (PS3.8 9.3.4)."""
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        peer = assoc.requestor.address
        if not self.policy.permits(calling, peer):
            LOGGER.warning(
                "association from %s at %s rejected: calling AE title not in [dicom] allowed_calling_aets",
                calling,
                peer,
            )
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            assoc.is_rejected = True
            # The A-ASSOCIATE-RJ is sent by the DUL thread; give it the moment it needs
            # before the acceptor closes the socket, or the peer sees an abort instead.
            deadline = time.monotonic() + 2.0
            while assoc.dul.state_machine.current_state not in ("Sta13", "Sta1") and time.monotonic() < deadline:
                time.sleep(0.005)

    def on_rejected(self, event: Any) -> None:
        """Log associations refused by negotiation (wrong called AE title, association limit)."""
        primitive = event.assoc.requestor.primitive
        if primitive is None:
            return
        LOGGER.warning(
            "association from %s at %s to called AE title %s rejected (called AE title not ours, "
            "or [dicom] max_associations reached)",
            str(primitive.calling_ae_title).strip(),
            event.assoc.requestor.address,
            str(primitive.called_ae_title).strip(),
        )

    def on_established(self, event: Any) -> None:
        """Start counting for the association."""
        assoc = event.assoc
        with self._lock:
            self._stats[id(assoc)] = AssociationStats(assoc.requestor.ae_title.strip(), assoc.requestor.address)

    def on_echo(self, event: Any) -> int:
        """C-ECHO: always success once associated."""
        LOGGER.info("C-ECHO from %s", event.assoc.requestor.ae_title.strip())
        return 0x0000

    def on_store(self, event: Any) -> int | tuple[int, str]:
        """C-STORE through pynetdicom's DIMSE layer: store durably, then answer."""
        return self.store(event.assoc, _from_event(event, _staged_file(event)), event)

    def store(self, assoc: Any, received: ReceivedStore, event: Any = None) -> int:
        """Store one received C-STORE durably and return its status (PS3.4 B.2.3); never raises.

        ``event`` (pynetdicom's) is needed only when the data set is held in memory (``staged`` None).
        """
        stats = self._stats.get(id(assoc))
        with self._lock:
            self.in_flight += 1
        try:
            return self._store(assoc, received, stats, event)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _store(self, assoc: Any, received: ReceivedStore, stats: AssociationStats | None, event: Any) -> int:
        calling = assoc.requestor.ae_title.strip()
        staged = received.staged
        instance = received.affected_sop_instance or "unknown instance"
        if received.cut_at is not None:
            # The data set grew past [dicom] max_instance_mb while it arrived and was dropped (receive/network.py).
            LOGGER.warning(
                "C-STORE of %s from %s refused (0xA700): larger than [dicom] max_instance_mb (cut at %d bytes)",
                instance,
                calling,
                received.cut_at,
            )
            if stats:
                stats.failed += 1
            return STATUS_OUT_OF_RESOURCES
        if received.write_error is not None:
            LOGGER.warning(
                "C-STORE of %s from %s refused (0xA700): it could not be written while it arrived: %s",
                instance,
                calling,
                received.write_error.strerror or received.write_error,
            )
            if stats:
                stats.failed += 1
            return STATUS_OUT_OF_RESOURCES
        limit = self.ingestor.max_instance_bytes
        transfer_syntax = received.transfer_syntax
        try:
            if staged is not None:
                # The PS3.10 file written while the data set arrived: the bytes to keep, already on disk.
                ds = dataset_from_received_file(staged, transfer_syntax, limit, received.data_offset)
                size = staged.stat().st_size
                chunks: tuple[bytes, ...] = ()
            else:
                data = event.encoded_dataset()
                size = len(data)
                chunks = (data,)
                if UID(transfer_syntax).is_deflated:
                    # pynetdicom would inflate without a limit (a deflate bomb): inflate within the instance limit.
                    ds = dataset_from_c_store(event.encoded_dataset(include_meta=False), transfer_syntax, limit)
                else:
                    ds = event.dataset
        except InflatesTooLarge as exc:
            LOGGER.warning("C-STORE from %s refused (0xA700): %s", calling, exc)
            if stats:
                stats.failed += 1
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:
            LOGGER.warning("C-STORE from %s refused, data set cannot be decoded: %s", calling, redact(str(exc)))
            if stats:
                stats.failed += 1
            return STATUS_CANNOT_UNDERSTAND
        command_class = received.affected_sop_class
        context_class = received.context_class
        if command_class != context_class:
            # pynetdicom serves a request by its command's SOP class, whatever the context says.
            LOGGER.warning(
                "C-STORE from %s refused (0x%04X): the request's Affected SOP Class UID is not the "
                "presentation context's (%s)",
                calling,
                STATUS_MISMATCH,
                context_class,
            )
            if stats:
                stats.failed += 1
            return STATUS_MISMATCH
        try:
            outcome = self.ingestor.ingest(
                ds,
                chunks,
                size=size,
                transfer_syntax=transfer_syntax,
                calling_aet=calling,
                source="dicom",
                expected_sop_class=context_class,
                expected_sop_instance=received.affected_sop_instance,
                staged=staged,
            )
        except Exception:
            LOGGER.exception("C-STORE from %s failed unexpectedly; refused, nothing stored", calling)
            if stats:
                stats.failed += 1
            return STATUS_OUT_OF_RESOURCES
        if not outcome.ok:
            LOGGER.warning(
                "C-STORE of %s from %s refused (0x%04X): %s",
                outcome.sop_instance_uid or "unknown instance",
                calling,
                outcome.status,
                redact(outcome.message),
            )
            if stats:
                stats.failed += 1
            return outcome.status
        if stats:
            stats.bytes += outcome.size_bytes
            if outcome.study_instance_uid:
                stats.studies.add(outcome.study_instance_uid)
            if outcome.duplicate:
                stats.duplicates += 1
            else:
                stats.stored += 1
        if outcome.settle_queued and outcome.study_instance_uid:
            # Wake the settle stage only for a job it has not seen: later instances of the study only
            # move its quiet period, which the settle job reads when it comes due.
            self.on_stored(outcome.study_instance_uid)
        return 0x0000

    def on_closed(self, event: Any) -> None:
        """Log one line per association."""
        stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        how = "aborted" if event.event is evt.EVT_ABORTED else "released"
        LOGGER.info(
            "association from %s at %s %s: %d stored, %d duplicates, %d refused, %d bytes, %d studies%s, %.2f s",
            stats.calling_aet,
            stats.peer,
            how,
            stats.stored,
            stats.duplicates,
            stats.failed,
            stats.bytes,
            len(stats.studies),
            (" " + ",".join(sorted(stats.studies)[:5])) if stats.studies else "",
            time.monotonic() - stats.started,
        )

    def on_conn_close(self, event: Any) -> None:
        """A connection closed without release or abort (peer vanished): log it once."""
        stats = self._stats.pop(id(event.assoc), None)
        if stats is not None:
            LOGGER.info(
                "connection from %s at %s closed without release: %d stored, %d refused, %.2f s",
                stats.calling_aet,
                stats.peer,
                stats.stored,
                stats.failed,
                time.monotonic() - stats.started,
            )
