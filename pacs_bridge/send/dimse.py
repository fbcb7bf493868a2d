"""C-STORE SCU: send DICOM files to one destination over one association.

PS3.4 Annex B Storage Service Class (SCU role), PS3.7 §9.1.1 C-STORE, PS3.8
association negotiation, with pynetdicom. Only the SOP classes of the files
being sent are proposed, each with Explicit VR Little Endian and Implicit VR
Little Endian (plus the file's own transfer syntax when it is another one).
DICOM TLS follows PS3.15 B.1 (the "BCP 195" secure transport profile as
offered by Python's :mod:`ssl`).

:func:`send_files` never raises for a destination that is down, refuses the
association, refuses a SOP class, answers with a failure status or times out:
each file gets a :class:`SendResult` with the status or the error, and a
failed one says whether retrying may help (:class:`Failure`): a refusal
status (0xA7xx, 0xA9xx, 0xCxxx and the 0x01xx/0x02xx failures the peer
will repeat) or an unreadable file is permanent; no association, a lost
association or no response is transient.
"""

from __future__ import annotations

import enum
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from pacs_bridge.config import DestinationSettings

__all__ = ["Failure", "SendResult", "dimse_failure", "keep_responses", "send_files", "tls_context"]

LOGGER = logging.getLogger(__name__)

# PS3.7 C.4.2.1.4: 0xB000, 0xB006, 0xB007 are warnings; the instance is stored.
_WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})


# PS3.7 C.4.2.1.4 / Annex C: failures that a peer answers again for the same object.
_PERMANENT_FAILURES = frozenset({0x0117, 0x0122, 0x0124, 0x0211})


class Failure(enum.StrEnum):
    """Whether a failed delivery may succeed when tried again."""

    TRANSIENT = "transient"
    """Try again later: the destination is down, slow, overloaded or answered 5xx/429/AE."""
    PERMANENT = "permanent"
    """Trying again cannot help: the destination refuses the object or the credentials, or the file is gone."""


def dimse_failure(status: int) -> Failure:
    """Classify a failed C-STORE status (PS3.4 B.2.3, PS3.7 Annex C).

    0xA9xx (data set does not match the SOP class), 0xCxxx (cannot
    understand) and the general failures 0x0117 (invalid SOP instance),
    0x0122 (SOP class not supported), 0x0124 (not authorised), 0x0211
    (unrecognised operation) are permanent; the rest transient: 0xA7xx
    (refused: out of resources, e.g. the PACS's disk is full, which its
    administrator fixes), 0x0110 processing failure, 0x0213 resource
    limitation, ...
    """
    if status & 0xFF00 == 0xA900 or status & 0xF000 == 0xC000 or status in _PERMANENT_FAILURES:
        return Failure.PERMANENT
    return Failure.TRANSIENT


def keep_responses(assoc: Association) -> Association:
    """Let only the ``send_*`` calls of this requestor association read its DIMSE messages (PS3.7 §9.1).

    pynetdicom's association thread pauses for ``send_c_store`` through a flag
    that can be stale: a response that arrives in that moment is taken by the
    thread, logged as "Received unexpected C-STORE service message", and the
    request ends in a DIMSE timeout (seen with several associations at once;
    pynetdicom issues 842 and 850). An association we request serves no
    request from the peer (no C-GET or C-MOVE here), so the thread's
    non-blocking reads of the message queue return nothing; the ``send_*``
    methods read it blocking, as before. Call before the first request.
    """
    dimse = assoc.dimse
    read = dimse.get_msg

    def responses_only(block: bool = False) -> Any:
        return read(block=True) if block else (None, None)

    dimse.get_msg = responses_only  # type: ignore[method-assign]
    return assoc


@dataclass(frozen=True)
class SendResult:
    """What happened to one file: ``ok`` with the status, or the reason it was not delivered.

    ``status`` is the DIMSE status for C-STORE (or the per-instance status a
    STOW-RS response gives); ``failure`` says whether a failed delivery is
    worth retrying (``None`` when ``ok``). A failure built without a
    classification counts as transient.
    """

    path: Path
    sop_instance_uid: str | None
    ok: bool
    status: int | None = None
    error: str | None = None
    failure: Failure | None = None

    def __post_init__(self) -> None:
        if self.ok:
            object.__setattr__(self, "failure", None)
        elif self.failure is None:
            object.__setattr__(self, "failure", Failure.TRANSIENT)

    @property
    def permanent(self) -> bool:
        """True for a failure that retrying cannot fix."""
        return self.failure is Failure.PERMANENT

    def describe(self) -> str:
        """``0x0000`` or the error, for logs and ``Delivery.last_error``."""
        if self.ok:
            return f"status 0x{self.status or 0:04X}"
        if self.status is not None:
            return f"status 0x{self.status:04X}: {self.error}" if self.error else f"status 0x{self.status:04X}"
        return self.error or "failed"


def tls_context(destination: DestinationSettings) -> ssl.SSLContext:
    """A client TLS context for ``destination`` (PS3.15 B.1): verifies the peer with ``tls_ca``
    (or the system's CAs), presents ``tls_cert``/``tls_key`` when set, TLS 1.2 or newer."""
    cafile = str(destination.tls_ca) if destination.tls_ca else None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.tls_cert is not None:
        context.load_cert_chain(
            str(destination.tls_cert), str(destination.tls_key) if destination.tls_key is not None else None
        )
    return context


def _failed(paths: Sequence[Path], uids: dict[Path, str | None], error: str) -> list[SendResult]:
    return [SendResult(path=p, sop_instance_uid=uids.get(p), ok=False, error=error) for p in paths]


def _association_error(assoc: Association, destination: DestinationSettings) -> str:
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if assoc.is_rejected:
        return f"association rejected by {where} (check its AE title and its list of allowed callers)"
    if assoc.is_aborted:
        return f"no association with {where} (connection refused, or aborted by the peer)"
    return f"no association with {where} (connection refused or timed out)"


def send_files(
    destination: DestinationSettings,
    calling_aet: str,
    paths: Sequence[Path],
    timeout: float,
) -> list[SendResult]:
    """C-STORE each file in ``paths`` to ``destination`` over one association; one result per file, in order.

    ``timeout`` (seconds) bounds the TCP connection, the association
    negotiation (ACSE) and each C-STORE response (DIMSE).
    """
    paths = [Path(p) for p in paths]
    if not paths:
        return []
    datasets: dict[Path, Dataset] = {}
    uids: dict[Path, str | None] = {}
    results: dict[Path, SendResult] = {}
    for path in paths:
        try:
            dataset = pydicom.dcmread(path)
            datasets[path] = dataset
            uids[path] = str(dataset.SOPInstanceUID)
        except Exception as exc:  # unreadable file: a failure of that file only
            uids[path] = None
            results[path] = SendResult(
                path, None, False, error=f"unreadable file: {type(exc).__name__}: {exc}", failure=Failure.PERMANENT
            )

    ae = AE(ae_title=calling_aet)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    proposed: dict[str, list[str]] = {}
    for item in datasets.values():
        syntaxes = proposed.setdefault(str(item.SOPClassUID), [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        own = str(item.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
        if own not in syntaxes:
            syntaxes.append(own)
    if len(proposed) > 128:  # PS3.8: at most 128 presentation contexts
        LOGGER.warning("%d SOP classes for %s; only the first 128 are proposed", len(proposed), destination.name)
    for sop_class, syntaxes in list(proposed.items())[:128]:
        ae.add_requested_context(sop_class, syntaxes)

    host, port, called = destination.host, destination.port, destination.ae_title
    if host is None or port is None or called is None:  # settings validation makes this a programming error
        error = f"{destination.name} is a {destination.type} destination, not a DICOM node"
        for path in datasets:
            results[path] = SendResult(path, uids[path], False, error=error, failure=Failure.PERMANENT)
    elif datasets:
        try:
            tls_args = (tls_context(destination), host) if destination.tls else None
            assoc = keep_responses(ae.associate(host, port, ae_title=called, tls_args=tls_args))
        except Exception as exc:  # bad TLS files, name resolution, ...
            error = f"cannot connect to {destination.name}: {type(exc).__name__}: {exc}"
            for path in datasets:
                results[path] = SendResult(path, uids[path], False, error=error)
        else:
            try:
                if not assoc.is_established:
                    error = _association_error(assoc, destination)
                    for path in datasets:
                        results[path] = SendResult(path, uids[path], False, error=error)
                else:
                    _store_all(assoc, datasets, results, destination)
            finally:
                if assoc.is_established:
                    assoc.release()
    return [results[p] for p in paths]


def _store_all(
    assoc: Association,
    datasets: dict[Path, Dataset],
    results: dict[Path, SendResult],
    destination: DestinationSettings,
) -> None:
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    for path, dataset in datasets.items():
        uid = str(dataset.SOPInstanceUID)
        sop_class = str(dataset.SOPClassUID)
        if not assoc.is_established:
            results[path] = SendResult(path, uid, False, error=f"association with {destination.name} ended early")
            continue
        if sop_class not in accepted:
            error = f"SOP class {sop_class} refused by {destination.name}"
            results[path] = SendResult(path, uid, False, error=error, failure=Failure.PERMANENT)
            continue
        try:
            status = assoc.send_c_store(dataset)
        except Exception as exc:  # encoding problems, transfer syntax mismatch
            # The object itself cannot be sent unless the association broke meanwhile.
            failure = Failure.PERMANENT if assoc.is_established else Failure.TRANSIENT
            error = f"C-STORE not sent: {type(exc).__name__}: {exc}"
            results[path] = SendResult(path, uid, False, error=error, failure=failure)
            continue
        if "Status" not in status:
            results[path] = SendResult(
                path, uid, False, error=f"no C-STORE response from {destination.name} (timeout or abort)"
            )
            continue
        code = int(status.Status)
        if code == 0x0000 or code in _WARNING_STATUSES:
            results[path] = SendResult(path, uid, True, status=code)
        else:
            comment = str(status.get("ErrorComment", "")) or None
            results[path] = SendResult(
                path, uid, False, status=code, error=comment or "C-STORE failed", failure=dimse_failure(code)
            )
