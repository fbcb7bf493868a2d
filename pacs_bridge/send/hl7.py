"""HL7 v2.5.1 ORU^R01 (unsolicited observation result) to a RIS, over MLLP.

The message (HL7 v2.5.1 chapter 7, built and escaped with ``hl7apy``)::

    MSH  sending/receiving application and facility, ORU^R01^ORU_R01, control id, P, 2.5.1, UNICODE UTF-8
    PID  PID-3 Patient ID, PID-5 Patient Name (DICOM PN Family^Given^Middle^Prefix^Suffix as XPN)
    ORC  RE; placer and filler order number = Accession Number; CM
    OBR  placer/filler = Accession Number; OBR-4 18748-4^Diagnostic imaging study^LN; OBR-7 study date;
         OBR-25 result status
    NTE  the disclaimer ("AI result, not a diagnosis")
    OBX  113014^Study^DCM (HD) = Study Instance UID, as IHE Radiology carries it
    OBX  72704001^Fracture^SCT (CWE) = 52101004^Present^SCT or 272519000^Absent^SCT, OBX-8 A/N
    OBX  111012^Certainty of Finding^DCM (NM) = highest probability, %^percent^UCUM
    OBX  111001^Algorithm Name^DCM, 111003^Algorithm Version^DCM, 111002^Algorithm Parameters^DCM (ST)
    OBX  SRUID^AI report SOP Instance UID^99PBR (HD) = the TID 1500 SR, when one was produced
    OBX  per analysed image, OBX-4 sub-ID n: IMGUID (HD), Fracture (CWE), Certainty (NM), 363698007^Finding Site^SCT
    OBX  per image not analysed, OBX-4 sub-ID: NOTANALYSED^Image not analysed^99PBR (ST) = reason

OBX-11 and OBR-25 are ``F`` (final) or ``P`` (preliminary) as the destination's
``result_status`` says, ``C`` (corrected) for a result published again
(revision above 1). Patient identifiers go into the message, never into logs.

MLLP (HL7 v2 Minimal Lower Layer Protocol, release 2): the message is framed
as ``0x0B`` message ``0x1C 0x0D``; the RIS answers with an ACK framed the same
way. MSA-1 ``AA``/``CA`` is success; ``AE``/``CE`` a transient failure (the
receiver had a problem, send again); ``AR``/``CR`` a permanent one (the
receiver refuses this message). No answer within the send timeout, or a lost
connection, is transient.
"""

from __future__ import annotations

import logging
import socket
import ssl
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hl7apy.core import Message
from hl7apy.parser import parse_segment
from hl7apy.v2_5_1 import BASE_DATATYPES, ST

from pacs_bridge.config import DestinationSettings
from pacs_bridge.report.sr import ABSENT, FRACTURE, PRESENT, finding_site_code
from pacs_bridge.report.study_result import StudyResult
from pacs_bridge.send.dimse import Failure, SendResult, tls_context

__all__ = [
    "MLLP_END",
    "MLLP_START",
    "AckResult",
    "build_oru",
    "frame",
    "read_frame",
    "send_message",
    "send_result",
]

LOGGER = logging.getLogger(__name__)

MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"
_LOCAL = "99PBR"
"""Local coding system (HL7 table 0396: ``99zzz``) for the identifiers that have no standard code."""
_UNIVERSAL_SERVICE = ("18748-4", "Diagnostic imaging study", "LN")
_STUDY = ("113014", "Study", "DCM")
_CERTAINTY = ("111012", "Certainty of Finding", "DCM")
_ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
_ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")
_ALGORITHM_PARAMETERS = ("111002", "Algorithm Parameters", "DCM")
_FINDING_SITE = ("363698007", "Finding Site", "SCT")
_SR_UID = ("SRUID", "AI report SOP Instance UID", _LOCAL)
_IMAGE_UID = ("IMGUID", "Image SOP Instance UID", _LOCAL)
_NOT_ANALYSED = ("NOTANALYSED", "Image not analysed", _LOCAL)
_PERCENT = ("%", "percent", "UCUM")
_MAX_FRAME = 1 << 20
"""Largest ACK read (bytes); an answer that long is not an ACK."""


def _text(component: Any, value: str) -> None:
    """Set a primitive component to ``value``, escaped (HL7 v2.5.1 §2.7.4), in the component's own data type."""
    kind = BASE_DATATYPES.get(getattr(component, "datatype", "ST"), ST)
    component.value = kind(value)


def _coded(field: Any, code: tuple[str, str, str]) -> None:
    """Set a CE or CWE field: identifier, text, name of coding system (components 1-3)."""
    prefix = str(field.datatype).lower()
    for index, part in enumerate(code, start=1):
        _text(getattr(field, f"{prefix}_{index}"), part)


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S")


def result_status_code(result: StudyResult, destination: DestinationSettings) -> str:
    """OBR-25/OBX-11 (HL7 table 0123/0085): ``C`` for a revision, else ``F`` or ``P``."""
    if result.revision > 1:
        return "C"
    return "P" if destination.result_status == "preliminary" else "F"


class _OruBuilder:
    def __init__(self, message: Message, group: object, status: str, observed: str) -> None:
        self.message = message
        self.group = group
        self.status = status
        self.observed = observed
        self.set_id = 0

    def obx(
        self,
        value_type: str,
        code: tuple[str, str, str],
        value: str | tuple[str, str, str],
        *,
        sub_id: str | None = None,
        units: tuple[str, str, str] | None = None,
        abnormal: str | None = None,
    ) -> None:
        self.set_id += 1
        observation = self.group.add_group("ORU_R01_OBSERVATION")  # type: ignore[attr-defined]
        obx = observation.obx
        obx.obx_1 = str(self.set_id)
        obx.obx_2 = value_type
        _coded(obx.obx_3, code)
        if sub_id is not None:
            obx.obx_4 = sub_id
        # OBX-5 "varies": given as ER7 text, so an ST value is escaped here; codes, numbers and UIDs
        # hold no delimiter.
        if isinstance(value, tuple):
            obx.obx_5 = "^".join(value)
        elif value_type == "ST":
            obx.obx_5 = ST(value).to_er7(self.message.encoding_chars)
        else:
            obx.obx_5 = value
        if units is not None:
            _coded(obx.obx_6, units)
        if abnormal is not None:
            obx.obx_8 = abnormal
        obx.obx_11 = self.status
        obx.obx_14 = self.observed


def _code(code: object) -> tuple[str, str, str]:
    return (str(code.value), str(code.meaning), str(code.scheme_designator))  # type: ignore[attr-defined]


def _person_name(pid: object, dicom_name: str) -> None:
    # PS3.5 §6.2 PN: Family^Given^Middle^Prefix^Suffix (first component group only);
    # HL7 XPN: 1 family name, 2 given, 3 further given names, 4 suffix, 5 prefix.
    parts = (dicom_name.split("=", maxsplit=1)[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    xpn = pid.pid_5  # type: ignore[attr-defined]
    if family:
        _text(xpn.xpn_1.fn_1, family)
    for index, value in ((2, given), (3, middle), (4, suffix), (5, prefix)):
        if value:
            _text(getattr(xpn, f"xpn_{index}"), value)


def build_oru(
    result: StudyResult,
    destination: DestinationSettings,
    disclaimer: str,
    *,
    control_id: str | None = None,
    now: datetime | None = None,
) -> Message:
    """The ORU^R01 message of a study result (see the module docstring for the segments)."""
    now = now or datetime.now(UTC)
    status = result_status_code(result, destination)
    observed = _ts(datetime.fromisoformat(result.created_at))
    message = Message("ORU_R01", version="2.5.1")
    msh = message.msh
    for name, value in (
        ("msh_3", destination.sending_application),
        ("msh_4", destination.sending_facility),
        ("msh_5", destination.receiving_application),
        ("msh_6", destination.receiving_facility),
    ):
        if value:
            _text(getattr(msh, name).hd_1, value)
    msh.msh_7 = _ts(now)
    msh.msh_9 = "ORU^R01^ORU_R01"
    _text(msh.msh_10, control_id or uuid.uuid4().hex[:20])
    msh.msh_11 = "P"
    msh.msh_18 = "UNICODE UTF-8"

    patient_result = message.add_group("ORU_R01_PATIENT_RESULT")
    patient = patient_result.add_group("ORU_R01_PATIENT")
    pid = patient.pid
    pid.pid_1 = "1"
    _text(pid.pid_3.cx_1, result.patient_id or "")
    if result.patient_name:
        _person_name(pid, result.patient_name)

    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = order.orc
    orc.orc_1 = "RE"
    obr = order.obr
    obr.obr_1 = "1"
    if result.accession_number:
        for segment_field in (orc.orc_2, orc.orc_3, obr.obr_2, obr.obr_3):
            _text(segment_field.ei_1, result.accession_number)
    orc.orc_5 = "CM"
    _coded(obr.obr_4, _UNIVERSAL_SERVICE)
    if result.study_date:
        obr.obr_7 = result.study_date
    obr.obr_22 = observed
    obr.obr_25 = status
    nte = order.add_segment("NTE")
    nte.nte_1 = "1"
    _text(nte.nte_3, f"{disclaimer} ({result.model_label})")

    out = _OruBuilder(message, order, status, observed)
    present = _code(PRESENT)
    absent = _code(ABSENT)
    out.obx("HD", _STUDY, result.study_instance_uid)
    out.obx(
        "CWE",
        _code(FRACTURE),
        present if result.fracture else absent,
        abnormal="A" if result.fracture else "N",
    )
    out.obx("NM", _CERTAINTY, f"{result.max_percent:.1f}", units=_PERCENT)
    out.obx("ST", _ALGORITHM_NAME, result.model_name)
    out.obx("ST", _ALGORITHM_VERSION, result.model_version)
    out.obx("ST", _ALGORITHM_PARAMETERS, f"threshold={result.threshold:g}")
    if result.sr_sop_instance_uid:
        out.obx("HD", _SR_UID, result.sr_sop_instance_uid)
    index = 0
    for index, finding in enumerate(result.findings, start=1):
        sub = str(index)
        out.obx("HD", _IMAGE_UID, finding.sop_instance_uid, sub_id=sub)
        out.obx(
            "CWE",
            _code(FRACTURE),
            present if finding.fracture else absent,
            sub_id=sub,
            abnormal="A" if finding.fracture else "N",
        )
        out.obx("NM", _CERTAINTY, f"{finding.percent:.1f}", sub_id=sub, units=_PERCENT)
        site = finding_site_code(finding.body_part)
        if site is not None:
            out.obx("CWE", _FINDING_SITE, _code(site), sub_id=sub)
    for offset, skipped in enumerate(result.not_analysed, start=index + 1):
        reason = f"{skipped.sop_instance_uid}: {skipped.reason}"
        out.obx("ST", _NOT_ANALYSED, reason[:199], sub_id=str(offset))
    return message


def frame(message: str) -> bytes:
    """The MLLP block of an ER7 message (segments separated by carriage returns), UTF-8."""
    return MLLP_START + message.encode("utf-8") + MLLP_END


def read_frame(sock: socket.socket) -> bytes:
    """Read one MLLP block from ``sock`` and return its content; raises ``TimeoutError``/``ConnectionError``."""
    buffer = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the end of the MLLP block")
        buffer += chunk
        end = buffer.find(MLLP_END)
        if end >= 0:
            start = buffer.find(MLLP_START)
            return bytes(buffer[start + 1 if start >= 0 else 0 : end])
        if len(buffer) > _MAX_FRAME:
            raise ConnectionError("MLLP block too long")


@dataclass(frozen=True)
class AckResult:
    """What the receiver answered: ``ok``, else the reason and whether retrying may help."""

    ok: bool
    code: str | None
    error: str | None = None
    failure: Failure | None = None


def parse_ack(data: bytes, control_id: str) -> AckResult:
    """Read MSA-1 (acknowledgment code) and MSA-2 (the acknowledged control id) of an ACK (HL7 v2.5.1 §2.15.8)."""
    text = data.decode("utf-8", errors="replace")
    segments = [s for s in text.replace("\n", "\r").split("\r") if s.strip()]
    msa_text = next((s for s in segments if s.startswith("MSA")), None)
    if msa_text is None:
        return AckResult(False, None, "answer without an MSA segment", Failure.TRANSIENT)
    try:
        msa = parse_segment(msa_text, version="2.5.1")
        code = msa.msa_1.value.strip().upper()
        acknowledged = msa.msa_2.value.strip()
        detail = msa.msa_3.value.strip() if msa.msa_3 else ""
    except Exception as exc:  # a malformed MSA
        return AckResult(False, None, f"unreadable ACK: {type(exc).__name__}: {exc}", Failure.TRANSIENT)
    if acknowledged and acknowledged != control_id:
        return AckResult(False, code, f"ACK for message {acknowledged!r}, not {control_id!r}", Failure.TRANSIENT)
    err = next((s for s in segments if s.startswith("ERR")), None)
    if detail == "" and err:
        detail = err
    if code in ("AA", "CA"):
        return AckResult(True, code)
    reason = f"ACK {code}" + (f": {detail}" if detail else "")
    if code in ("AR", "CR"):
        return AckResult(False, code, reason, Failure.PERMANENT)
    return AckResult(False, code, reason, Failure.TRANSIENT)


def send_message(destination: DestinationSettings, message: str, control_id: str, timeout: float) -> AckResult:
    """Send one ER7 message over MLLP to ``destination`` (an ``hl7`` destination) and read its ACK."""
    host, port = destination.host, destination.port
    if host is None or port is None:
        return AckResult(False, None, f"{destination.name} has no host and port", Failure.PERMANENT)
    where = f"{destination.name} ({host}:{port})"
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            sock: socket.socket = raw
            if destination.tls:
                sock = tls_context(destination).wrap_socket(raw, server_hostname=host)
            sock.settimeout(timeout)
            sock.sendall(frame(message))
            answer = read_frame(sock)
    except TimeoutError:
        return AckResult(False, None, f"no ACK from {where} within {timeout:g} s", Failure.TRANSIENT)
    except ssl.SSLError as exc:
        return AckResult(False, None, f"TLS with {where} failed: {exc}", Failure.TRANSIENT)
    except OSError as exc:  # refused, reset, unreachable, closed early
        return AckResult(False, None, f"cannot deliver to {where}: {type(exc).__name__}: {exc}", Failure.TRANSIENT)
    return parse_ack(answer, control_id)


def send_result(destination: DestinationSettings, path: Path, disclaimer: str, timeout: float) -> SendResult:
    """Send the study result document at ``path`` as an ORU^R01 to ``destination``."""
    try:
        result = StudyResult.from_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        error = f"unreadable study result: {type(exc).__name__}: {exc}"
        return SendResult(path, None, False, error=error, failure=Failure.PERMANENT)
    control_id = uuid.uuid4().hex[:20]
    try:
        message = build_oru(result, destination, disclaimer, control_id=control_id).to_er7()
    except Exception as exc:  # a value hl7apy refuses (too long, ...): sending again cannot help
        error = f"cannot build the ORU^R01: {type(exc).__name__}: {exc}"
        return SendResult(path, result.sr_sop_instance_uid, False, error=error, failure=Failure.PERMANENT)
    ack = send_message(destination, message, control_id, timeout)
    LOGGER.debug("ORU^R01 %s for study %s to %s: %s", control_id, result.study_instance_uid, destination.name, ack)
    if ack.ok:
        return SendResult(path, result.sr_sop_instance_uid, True)
    return SendResult(path, result.sr_sop_instance_uid, False, error=ack.error, failure=ack.failure)
