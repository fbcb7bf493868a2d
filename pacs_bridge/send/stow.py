"""STOW-RS: store DICOM files on a DICOMweb server (PS3.18 §10.5 Store Transaction).

One request per call: ``POST {url}/studies`` with a ``multipart/related;
type="application/dicom"`` body, one part per DICOM Part 10 file (PS3.18
§8.6.1.2), asking for the PS3.18 Annex F JSON response
(``application/dicom+json``). The answer is read per instance:

- listed in the Referenced SOP Sequence (0008,1199): stored, with the
  Warning Reason (0008,1196) as status where present;
- listed in the Failed SOP Sequence (0008,1198): not stored; its Failure
  Reason (0008,1197) is a C-STORE status, classified as for DIMSE
  (0xA7xx, 0xA9xx, 0xCxxx permanent);
- in neither: stored when the answer was 200 without a response body,
  otherwise a transient failure.

An answer other than 200, 202 or 409 fails every instance: 401, 403, 404,
400, ... permanently; 5xx and 429 transiently. No connection or no answer
in time is transient.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pydicom

from pacs_bridge.config import DestinationSettings
from pacs_bridge.send.dimse import Failure, SendResult, dimse_failure
from pacs_bridge.send.http import describe_response, http_client, http_failure, transport_error

__all__ = ["parse_stow_response", "stow_files"]

LOGGER = logging.getLogger(__name__)

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
# PS3.18 §10.5.3: 200 all stored, 202 some stored or with warnings, 409 none stored (reasons per instance).
_ANSWERED_PER_INSTANCE = frozenset({200, 202, 409})


def _first(item: dict[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def parse_stow_response(body: Any) -> tuple[dict[str, int], dict[str, int]]:
    """``(stored, failed)`` from a PS3.18 JSON Store Instances Response: SOP Instance UID -> status.

    ``stored`` maps to the Warning Reason (0 without one), ``failed`` to the
    Failure Reason (0xC000, "cannot understand", when the server gives none).
    """
    stored: dict[str, int] = {}
    failed: dict[str, int] = {}
    if isinstance(body, list):  # some servers wrap the data set in a list
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return stored, failed
    for item in (body.get(_REFERENCED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = _first(item, _REFERENCED_SOP_INSTANCE_UID)
        if uid:
            stored[str(uid)] = int(_first(item, _WARNING_REASON) or 0)
    for item in (body.get(_FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        uid = _first(item, _REFERENCED_SOP_INSTANCE_UID)
        if uid:
            failed[str(uid)] = int(_first(item, _FAILURE_REASON) or 0xC000)
    return stored, failed


def _multipart(parts: Sequence[bytes], boundary: str) -> Iterator[bytes]:
    for data in parts:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
        yield data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def stow_files(destination: DestinationSettings, paths: Sequence[Path], timeout: float) -> list[SendResult]:
    """Store each DICOM file on ``destination`` (a ``dicomweb`` destination) in one STOW-RS request.

    One :class:`~pacs_bridge.send.dimse.SendResult` per path, in order;
    never raises for what the server or the network does.
    """
    paths = [Path(p) for p in paths]
    results: dict[Path, SendResult] = {}
    payload: dict[Path, tuple[str, bytes]] = {}
    for path in paths:
        try:
            data = path.read_bytes()
            with open(path, "rb") as stream:
                uid = str(pydicom.dcmread(stream, stop_before_pixels=True).SOPInstanceUID)
        except Exception as exc:  # a file that is gone or not DICOM fails alone, for good
            error = f"unreadable file: {type(exc).__name__}: {exc}"
            results[path] = SendResult(path, None, False, error=error, failure=Failure.PERMANENT)
            continue
        payload[path] = (uid, data)
    if payload:
        results.update(_post(destination, payload, timeout))
    return [results[p] for p in paths]


def _post(
    destination: DestinationSettings, payload: dict[Path, tuple[str, bytes]], timeout: float
) -> dict[Path, SendResult]:
    boundary = uuid.uuid4().hex
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    body = b"".join(_multipart([data for _, data in payload.values()], boundary))
    url = f"{destination.url}/studies"
    try:
        with http_client(destination, timeout) as client:
            response = client.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        error = transport_error(destination, exc)
        return {path: SendResult(path, uid, False, error=error) for path, (uid, _) in payload.items()}
    except (OSError, ValueError) as exc:  # TLS files that cannot be read, a URL httpx refuses
        error = f"cannot send to {destination.name}: {type(exc).__name__}: {exc}"
        return {
            path: SendResult(path, uid, False, error=error, failure=Failure.PERMANENT)
            for path, (uid, _) in payload.items()
        }

    if response.status_code not in _ANSWERED_PER_INSTANCE:
        error = describe_response(response)
        failure = http_failure(response.status_code)
        return {
            path: SendResult(path, uid, False, status=None, error=error, failure=failure)
            for path, (uid, _) in payload.items()
        }
    try:
        answer = response.json() if response.content.strip() else None
    except ValueError:
        answer = None
    stored, failed = parse_stow_response(answer)
    listed = bool(stored or failed)
    out: dict[Path, SendResult] = {}
    for path, (uid, _) in payload.items():
        if uid in failed:
            code = failed[uid]
            error = f"refused by {destination.name} (STOW-RS failure reason 0x{code:04X})"
            out[path] = SendResult(path, uid, False, status=code, error=error, failure=dimse_failure(code))
        elif uid in stored:
            out[path] = SendResult(path, uid, True, status=stored[uid])
        elif response.status_code == 200 and not listed:
            out[path] = SendResult(path, uid, True, status=0)
        else:
            error = f"{describe_response(response)}: instance not acknowledged"
            failure = Failure.PERMANENT if response.status_code == 409 else Failure.TRANSIENT
            out[path] = SendResult(path, uid, False, error=error, failure=failure)
    return out
