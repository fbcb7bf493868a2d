"""DICOMweb STOW-RS: ``POST /dicomweb/studies[/{study}]`` (PS3.18 10.5), a third way in besides C-STORE and the folder.

The request is ``multipart/related; type="application/dicom"`` (PS3.18
8.6.1.2), each part one PS3.10 file. Every part goes through the same
durable ingest path as C-STORE (:meth:`pacs_bridge.receive.ingest.Ingestor.ingest`,
``source="dicomweb"``): a part is reported stored only once its file is
fsynced into the spool and its row committed. The response is the Store
Instances Response Module (PS3.18 10.5.3, Table 10.5.3-3) as
``application/dicom+json``: ReferencedSOPSequence for the stored instances,
FailedSOPSequence with a FailureReason for the others, and the HTTP status
of PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored, 400 not
``multipart/related``, 415 a ``type`` other than ``application/dicom``.

FailureReason values (PS3.4 B.2.3 and PS3.18 10.5.3): 0xC000 the part is
not a DICOM file or cannot be parsed, 0xC210 the ingest could not
understand it, 0xA700 out of resources (too large, disk full), 0xA900 data
set does not match SOP class, 0xC409 Study Instance UID does not match the
one in the URL, 0xC122 the part's media type is not ``application/dicom``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pacs_bridge.logsafe import redact
from pacs_bridge.receive.decode import InflatesTooLarge, NotDicom, dataset_from_part10

__all__ = [
    "FAILURE_CANNOT_UNDERSTAND",
    "FAILURE_OUT_OF_RESOURCES",
    "FAILURE_STUDY_MISMATCH",
    "FAILURE_UNSUPPORTED_TYPE",
    "Part",
    "StowError",
    "StowResult",
    "parse_multipart_related",
    "store_parts",
]

LOGGER = logging.getLogger(__name__)

FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_STUDY_MISMATCH = 0xC409
FAILURE_UNSUPPORTED_TYPE = 0xC122

_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')


class StowError(ValueError):
    """The request as a whole cannot be taken: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Part:
    """One body part of a multipart/related request."""

    content_type: str
    data: bytes


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` in lower case and the parameters (names lower case, quotes removed)."""
    main, _, _rest = value.partition(";")
    params = {
        name.lower(): (raw[1:-1].replace('\\"', '"') if raw.startswith('"') else raw)
        for name, raw in _PARAM_RE.findall(value)
    }
    return main.strip().lower(), params


def parse_multipart_related(content_type: str, body: bytes) -> list[Part]:
    """The parts of a ``multipart/related`` body (RFC 2387); raises :class:`StowError` 400 or 415.

    A part without a Content-Type takes the ``type`` parameter of the request
    (PS3.18 8.6.1.2). Broken parts (no header end) are returned with an empty
    content type so that they are reported failed, not dropped.
    """
    media, params = _media_type(content_type or "")
    if media != "multipart/related":
        raise StowError(400, f"expected multipart/related, got {media or 'no content type'}")
    root_type = params.get("type", "application/dicom").lower()
    if root_type != "application/dicom":
        raise StowError(415, f"only type=application/dicom is accepted here, not {root_type[:60]}")
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 200:
        raise StowError(400, "multipart/related without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise StowError(400, "no body part found between the multipart boundaries")
    parts: list[Part] = []
    for raw in chunks[1:]:
        if raw.startswith(b"--"):
            break  # the close delimiter
        chunk = raw.removeprefix(b"\r\n").removesuffix(b"\r\n")
        if chunk.startswith(b"\r\n"):  # no header fields: the request's type applies
            parts.append(Part(root_type, chunk[2:]))
            continue
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            parts.append(Part("", b""))
            continue
        part_type = root_type
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon and name.strip().lower() == "content-type":
                part_type = _media_type(value.strip())[0]
        parts.append(Part(part_type, data))
    if not parts:
        raise StowError(400, "no body part found between the multipart boundaries")
    return parts


@dataclass
class StowResult:
    """The outcome of a STOW-RS request: the response data set and its HTTP status."""

    stored: list[tuple[str, str]]
    failed: list[tuple[str, str, int, str]]
    retrieve_base: str

    @property
    def status(self) -> int:
        """200 all stored, 202 some failed, 409 none stored (PS3.18 10.5.3)."""
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def dataset(self) -> Dataset:
        """The Store Instances Response Module (PS3.18 Table 10.5.3-3)."""
        ds = Dataset()
        referenced = []
        for sop_class, sop_instance in self.stored:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            referenced.append(item)
        failures = []
        for sop_class, sop_instance, reason, _message in self.failed:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            item.FailureReason = reason
            failures.append(item)
        if referenced:
            ds.ReferencedSOPSequence = referenced
        if failures:
            ds.FailedSOPSequence = failures
        return ds

    def to_json(self) -> dict[str, Any]:
        """The response body, ``application/dicom+json`` (PS3.18 F.2)."""
        data: dict[str, Any] = self.dataset().to_json_dict()
        return data


def _uids(ds: Dataset | None) -> tuple[str, str]:
    if ds is None:
        return "", ""
    try:
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:
        return "", ""


def _with_preamble(data: bytes) -> bytes:
    """A part that starts with its File Meta Information but no preamble gets the PS3.10 7.1 preamble and prefix.

    Some clients send the meta group and data set without the 128-byte
    preamble; the spool keeps PS3.10 files only.
    """
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
        return bytes(128) + b"DICM" + data
    return data


def store_parts(ingestor: Any, parts: list[Part], *, study_uid: str | None, max_bytes: int) -> StowResult:
    """Ingest every part; never raises for a bad part (it is reported failed)."""
    result = StowResult(stored=[], failed=[], retrieve_base="")
    for index, part in enumerate(parts, start=1):
        ds: Dataset | None = None
        if part.content_type != "application/dicom":
            shown = part.content_type or "a broken part (no headers)"
            result.failed.append(("", "", FAILURE_UNSUPPORTED_TYPE, f"part {index}: {shown} is not application/dicom"))
            continue
        if len(part.data) > max_bytes:
            result.failed.append(("", "", FAILURE_OUT_OF_RESOURCES, f"part {index}: larger than [web] max_upload_mb"))
            continue
        data = _with_preamble(part.data)
        try:
            # Deflated parts inflate within [dicom] max_instance_mb, as over C-STORE (no deflate bomb).
            ds = dataset_from_part10(data, int(getattr(ingestor, "max_instance_bytes", max_bytes)))
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        except InflatesTooLarge as exc:
            result.failed.append(("", "", FAILURE_OUT_OF_RESOURCES, f"part {index}: {exc}"))
            continue
        except (InvalidDicomError, NotDicom, AttributeError) as exc:
            result.failed.append(("", "", FAILURE_CANNOT_UNDERSTAND, f"part {index}: not a PS3.10 file ({exc})"))
            continue
        except Exception as exc:
            result.failed.append(
                (*_uids(ds), FAILURE_CANNOT_UNDERSTAND, f"part {index}: cannot be parsed ({redact(str(exc))})")
            )
            continue
        sop_class, sop_instance = _uids(ds)
        if study_uid is not None and str(ds.get("StudyInstanceUID", "")) != study_uid:
            result.failed.append(
                (
                    sop_class,
                    sop_instance,
                    FAILURE_STUDY_MISMATCH,
                    f"part {index}: Study Instance UID is not {study_uid}",
                )
            )
            continue
        try:
            outcome = ingestor.ingest(
                ds,
                (data,),
                size=len(data),
                transfer_syntax=transfer_syntax,
                calling_aet=None,
                source="dicomweb",
            )
        except Exception:
            LOGGER.exception("STOW-RS part %d failed unexpectedly; refused, nothing stored", index)
            result.failed.append((sop_class, sop_instance, FAILURE_OUT_OF_RESOURCES, f"part {index}: internal error"))
            continue
        if outcome.ok:
            result.stored.append((sop_class, outcome.sop_instance_uid or sop_instance))
        else:
            result.failed.append((sop_class, sop_instance, int(outcome.status), f"part {index}: {outcome.message}"))
    for _cls, sop, reason, message in result.failed:
        LOGGER.warning("STOW-RS instance %s refused (0x%04X): %s", sop or "unknown", reason, message)
    if result.stored:
        LOGGER.info("STOW-RS stored %d instance(s), refused %d", len(result.stored), len(result.failed))
    return result
