"""Delivery of output objects to a destination of any type: the one entry point the delivery job calls.

A destination's ``type`` picks the transport:

=========  ===========================================================  ================================
type       transport                                                    object kinds
=========  ===========================================================  ================================
dicom      C-STORE SCU (PS3.4 Annex B), :mod:`pacs_bridge.send.dimse`    sr, capture, gsps, summary
dicomweb   STOW-RS (PS3.18 §10.5), :mod:`pacs_bridge.send.stow`          sr, capture, gsps, summary
hl7        HL7 v2.5.1 ORU^R01 over MLLP, :mod:`pacs_bridge.send.hl7`     result
fhir       FHIR R4 transaction Bundle, :mod:`pacs_bridge.send.fhir`      result
webhook    JSON POST, :mod:`pacs_bridge.send.webhook`                    result
=========  ===========================================================  ================================

:func:`deliver` gives one :class:`~pacs_bridge.send.dimse.SendResult` per
item, in order, and never raises for what a destination or the network does.
Each failure carries its :class:`~pacs_bridge.send.dimse.Failure`: an item
the destination does not take, a file that is missing or unreadable, or a
refusal is permanent; no connection, no answer or an overloaded peer is
transient. Which studies reach a destination at all is
:func:`pacs_bridge.config.routes`; which objects, :func:`accepts`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pacs_bridge.config import DestinationSettings, Settings, routes
from pacs_bridge.send import fhir, hl7, webhook
from pacs_bridge.send.dimse import Failure, SendResult, send_files
from pacs_bridge.send.stow import stow_files

__all__ = ["OutgoingItem", "accepts", "deliver", "routes"]

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutgoingItem:
    """One output object to deliver: its file, its kind (``sr``, ``capture``, ``gsps``, ``summary``,
    ``result``), its SOP Instance UID (the result document's own UID for ``result``) and its study."""

    path: Path
    kind: str
    sop_instance_uid: str
    study_instance_uid: str


def accepts(destination: DestinationSettings, kind: str) -> bool:
    """True when ``destination`` receives objects of ``kind`` (its ``objects`` setting)."""
    return kind in destination.objects


_Sender = Callable[[DestinationSettings, Sequence[OutgoingItem], Settings], list[SendResult]]


def _dicom(destination: DestinationSettings, items: Sequence[OutgoingItem], settings: Settings) -> list[SendResult]:
    calling = destination.calling_ae_title or settings.dicom.ae_title
    return send_files(destination, calling, [item.path for item in items], settings.send.timeout)


def _dicomweb(destination: DestinationSettings, items: Sequence[OutgoingItem], settings: Settings) -> list[SendResult]:
    return stow_files(destination, [item.path for item in items], settings.send.timeout)


def _hl7(destination: DestinationSettings, items: Sequence[OutgoingItem], settings: Settings) -> list[SendResult]:
    disclaimer = settings.report.banner_disclaimer
    return [hl7.send_result(destination, item.path, disclaimer, settings.send.timeout) for item in items]


def _fhir(destination: DestinationSettings, items: Sequence[OutgoingItem], settings: Settings) -> list[SendResult]:
    disclaimer = settings.report.banner_disclaimer
    return [fhir.send_result(destination, item.path, disclaimer, settings.send.timeout) for item in items]


def _webhook(destination: DestinationSettings, items: Sequence[OutgoingItem], settings: Settings) -> list[SendResult]:
    return [webhook.send_result(destination, item.path, settings.send.timeout) for item in items]


_SENDERS: dict[str, _Sender] = {
    "dicom": _dicom,
    "dicomweb": _dicomweb,
    "hl7": _hl7,
    "fhir": _fhir,
    "webhook": _webhook,
}


def deliver(destination: DestinationSettings, items: Sequence[OutgoingItem], settings: Settings) -> list[SendResult]:
    """Send ``items`` to ``destination`` with the transport of its type; one result per item, in order."""
    results: list[SendResult | None] = [None] * len(items)
    pending: list[int] = []
    for index, item in enumerate(items):
        if not accepts(destination, item.kind):
            error = f"{destination.name} ({destination.type}) does not take {item.kind} objects"
            results[index] = SendResult(item.path, item.sop_instance_uid, False, error=error, failure=Failure.PERMANENT)
        elif not item.path.is_file():
            error = f"output file missing: {item.path}"
            results[index] = SendResult(item.path, item.sop_instance_uid, False, error=error, failure=Failure.PERMANENT)
        else:
            pending.append(index)
    if pending:
        batch = [items[i] for i in pending]
        try:
            sent = _SENDERS[destination.type](destination, batch, settings)
        except Exception as exc:  # each transport reports per item; this is a last resort
            LOGGER.exception("sending to %s (%s) failed unexpectedly", destination.name, destination.type)
            error = f"{type(exc).__name__}: {exc}"
            sent = [SendResult(item.path, item.sop_instance_uid, False, error=error) for item in batch]
        for index, result in zip(pending, sent, strict=True):
            results[index] = replace(result, path=items[index].path, sop_instance_uid=items[index].sop_instance_uid)
    done = [result for result in results if result is not None]
    assert len(done) == len(items)
    LOGGER.debug(
        "%s (%s): %d of %d item(s) delivered", destination.name, destination.type, sum(r.ok for r in done), len(done)
    )
    return done
