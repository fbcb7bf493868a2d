"""Deterministic UIDs for the objects pacs-bridge produces.

A result object's UID is derived from what the object *says*: a digest of
its content (:mod:`pacs_bridge.report.revision`: the findings, the model and
its threshold, the analysed and failed images, the revision it replaces),
the kind of object and, for per-image objects, the source SOP Instance UID
(:func:`content_uid`, :func:`content_series_uid`). Building the same content
again (a resend, a retry after a crash) gives the same UIDs, so a receiving
PACS keeps one copy; changed content gives new UIDs, because a UID names one
content only (PS3.5 §9.1), and a PACS that keeps the first copy of a UID
would otherwise keep the stale result. :func:`instance_uid` and
:func:`series_uid` derive a UID from the study, the model and the kind alone,
for objects whose content follows from those (FHIR resources);
:func:`tracking_uid` names one finding across revisions and
:func:`device_uid` the algorithm.

The UIDs are of the ``2.25.<integer>`` form from a name-based UUID (ISO/IEC
9834-8, DICOM PS3.5 §B.2), which needs no registered organisation root; a
site with its own root may pass ``root``.
"""

from __future__ import annotations

import hashlib
import re
import uuid

__all__ = [
    "UID_RE",
    "content_series_uid",
    "content_uid",
    "device_uid",
    "instance_uid",
    "is_valid_uid",
    "series_uid",
    "tracking_uid",
]

UID_RE = re.compile(r"^[0-9.]{1,64}$")
"""What a UID must look like before it is used in a file name (PS3.5 §9.1, simplified)."""

# Name space of pacs-bridge's name-based UUIDs (a fixed, random UUID).
_NAMESPACE = uuid.UUID("5b0f3a6e-8d3c-4f7e-9a51-0c2f1d7be4a9")


def is_valid_uid(value: str) -> bool:
    """True for ``[0-9.]{1,64}`` without empty components or leading zeros (PS3.5 §9.1)."""
    if not UID_RE.match(value):
        return False
    return all(part and (part == "0" or not part.startswith("0")) for part in value.split("."))


def _derive(parts: tuple[str, ...], root: str | None) -> str:
    # A unit separator keeps ("ab", "c") and ("a", "bc") apart.
    name = "\x1f".join(parts)
    if root is None:
        return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
    if not is_valid_uid(root.rstrip(".")):
        raise ValueError(f"invalid UID root {root!r}")
    prefix = root.rstrip(".") + "."
    digits = str(int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16))
    return (prefix + digits.lstrip("0"))[:64].rstrip(".")


def series_uid(study_uid: str, model_name: str, model_version: str, kind: str, *, root: str | None = None) -> str:
    """Series Instance UID of the ``kind`` objects (``"sr"``, ``"capture"``) a model produced for a study."""
    return _derive(("series", study_uid, model_name, model_version, kind), root)


def instance_uid(
    study_uid: str,
    model_name: str,
    model_version: str,
    kind: str,
    source_sop_instance_uid: str | None = None,
    *,
    root: str | None = None,
) -> str:
    """SOP Instance UID of one object; per-image objects also name their source image."""
    return _derive(("instance", study_uid, model_name, model_version, kind, source_sop_instance_uid or ""), root)


def tracking_uid(study_uid: str, model_name: str, model_version: str, source_sop_instance_uid: str) -> str:
    """Tracking Unique Identifier (112040, DCM) of the finding on one source image (TID 1501)."""
    return _derive(("tracking", study_uid, model_name, model_version, source_sop_instance_uid), None)


def device_uid(model_name: str, model_version: str) -> str:
    """Device Observer UID of the algorithm: changes whenever the model (name or version) changes."""
    return _derive(("device", model_name, model_version), None)


def content_uid(digest: str, kind: str, source_sop_instance_uid: str | None = None, *, root: str | None = None) -> str:
    """SOP Instance UID of one result object with content ``digest``; per-image objects also name their source."""
    return _derive(("content-instance", digest, kind, source_sop_instance_uid or ""), root)


def content_series_uid(digest: str, kind: str, *, root: str | None = None) -> str:
    """Series Instance UID of the ``kind`` objects of one revision of a study's result (content ``digest``)."""
    return _derive(("content-series", digest, kind), root)
