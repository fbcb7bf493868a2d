"""The result of one analysed study as plain data: what RIS messages (HL7 v2, FHIR) and webhooks are built from.

A :class:`StudyResult` is written by publishing as the output object of kind
``"result"`` (``<data_dir>/outputs/<StudyInstanceUID>/<uid>.json``) beside the
DICOM objects (the TID 1500 SR, PS3.16, and the annotated secondary captures),
and read back by the senders in :mod:`pacs_bridge.send`. It holds the patient
and order identifiers of the source study (PS3.3 C.7.1.1 Patient Module,
C.7.2.1 General Study Module) because a RIS files results by them; they are
never written to logs.

The JSON form is versioned by its ``"schema"`` key (:data:`SCHEMA`); a reader
refuses a schema it does not know rather than guessing. ``revision`` counts
the times a study's result was published (1 for the first); a revision above
1 is sent as a corrected result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pacs_bridge.report.uids import is_valid_uid

__all__ = [
    "SCHEMA",
    "ImageFinding",
    "NotAnalysed",
    "StudyResult",
    "build_study_result",
]

SCHEMA = "pacs-bridge/study-result/1"
"""Value of the ``"schema"`` key of the JSON form; changes whenever a reader would misread the document."""

Box = tuple[float, float, float, float]


def _box(value: Sequence[float]) -> Box:
    if len(value) != 4:
        raise ValueError(f"box {list(value)!r} is not [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {list(value)!r} is empty or not finite")
    return (x0, y0, x1, y1)


def _probability(value: float, what: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{what} {value!r} is not a probability in [0, 1]")
    return number


def _uid(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise ValueError(f"{what} {value!r} is not a valid UID")
    return value


@dataclass(frozen=True)
class ImageFinding:
    """The outcome for one analysed image.

    ``probability`` is the model's fracture probability in [0, 1], ``fracture``
    the decision against the threshold, ``boxes`` the suspected regions as
    ``(x0, y0, x1, y1)`` in source pixel coordinates (columns, rows), and
    ``body_part`` a region name (``hand``, ``leg``, ...) or a Body Part
    Examined value (PS3.3 C.7.3.1), where known.
    """

    sop_instance_uid: str
    series_instance_uid: str
    probability: float
    fracture: bool
    body_part: str | None = None
    boxes: tuple[Box, ...] = ()

    def __post_init__(self) -> None:
        _uid(self.sop_instance_uid, "SOP Instance UID")
        _uid(self.series_instance_uid, "Series Instance UID")
        object.__setattr__(self, "probability", _probability(self.probability, "probability"))
        object.__setattr__(self, "fracture", bool(self.fracture))
        object.__setattr__(self, "boxes", tuple(_box(b) for b in self.boxes))

    @property
    def percent(self) -> float:
        """The probability in percent, one decimal."""
        return round(self.probability * 100.0, 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "body_part": self.body_part,
            "probability": self.probability,
            "fracture": self.fracture,
            "boxes": [list(b) for b in self.boxes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageFinding:
        """The inverse of :meth:`to_dict`."""
        return cls(
            sop_instance_uid=str(data["sop_instance_uid"]),
            series_instance_uid=str(data["series_instance_uid"]),
            probability=float(data["probability"]),
            fracture=bool(data["fracture"]),
            body_part=data.get("body_part"),
            boxes=tuple(_box(b) for b in data.get("boxes") or ()),
        )


@dataclass(frozen=True)
class NotAnalysed:
    """An image of the study that could not be analysed, and why (for the administrator and the RIS)."""

    sop_instance_uid: str
    reason: str

    def __post_init__(self) -> None:
        _uid(self.sop_instance_uid, "SOP Instance UID")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"sop_instance_uid": self.sop_instance_uid, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NotAnalysed:
        """The inverse of :meth:`to_dict`."""
        return cls(sop_instance_uid=str(data["sop_instance_uid"]), reason=str(data["reason"]))


@dataclass(frozen=True)
class StudyResult:
    """What a RIS needs to know about one analysed study.

    Identifiers of the source study: ``study_instance_uid``, ``accession_number``,
    ``patient_id``, ``patient_name`` (a DICOM PN value, ``Family^Given``),
    ``study_date`` (``YYYYMMDD``), ``study_description``, ``modalities``, and
    ``calling_aet`` (the AE title that sent it; ``None`` for the watched folder).
    The algorithm: ``model_name``, ``model_version``, ``threshold``. The outcome:
    ``fracture`` (any image positive), ``max_probability``, ``positive_instances``,
    ``findings`` per analysed image and ``not_analysed``. The SR that carries
    the same result in DICOM: ``sr_sop_instance_uid``, ``sr_series_instance_uid``
    (``None`` when no SR is produced). ``created_at`` is an ISO 8601 UTC time.
    """

    study_instance_uid: str
    model_name: str
    model_version: str
    threshold: float
    fracture: bool
    max_probability: float
    positive_instances: int
    created_at: str
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    modalities: tuple[str, ...] = ()
    calling_aet: str | None = None
    findings: tuple[ImageFinding, ...] = ()
    not_analysed: tuple[NotAnalysed, ...] = ()
    sr_sop_instance_uid: str | None = None
    sr_series_instance_uid: str | None = None
    revision: int = 1

    def __post_init__(self) -> None:
        _uid(self.study_instance_uid, "Study Instance UID")
        for name in ("sr_sop_instance_uid", "sr_series_instance_uid"):
            value = getattr(self, name)
            if value is not None:
                _uid(value, name)
        object.__setattr__(self, "threshold", _probability(self.threshold, "threshold"))
        object.__setattr__(self, "max_probability", _probability(self.max_probability, "max_probability"))
        object.__setattr__(self, "modalities", tuple(self.modalities))
        object.__setattr__(self, "findings", tuple(self.findings))
        object.__setattr__(self, "not_analysed", tuple(self.not_analysed))
        if self.revision < 1:
            raise ValueError(f"revision {self.revision} is not 1 or more")
        if self.positive_instances < 0:
            raise ValueError("positive_instances is negative")
        datetime.fromisoformat(self.created_at)  # raises ValueError when it is not ISO 8601

    @property
    def max_percent(self) -> float:
        """The highest probability in percent, one decimal."""
        return round(self.max_probability * 100.0, 1)

    @property
    def model_label(self) -> str:
        """``name version`` as shown to people."""
        return f"{self.model_name} {self.model_version}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form as plain data, ``"schema"`` first."""
        return {
            "schema": SCHEMA,
            "revision": self.revision,
            "created_at": self.created_at,
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "patient_id": self.patient_id,
            "patient_name": self.patient_name,
            "study_date": self.study_date,
            "study_description": self.study_description,
            "modalities": list(self.modalities),
            "calling_aet": self.calling_aet,
            "model": {"name": self.model_name, "version": self.model_version, "threshold": self.threshold},
            "fracture": self.fracture,
            "max_probability": self.max_probability,
            "positive_instances": self.positive_instances,
            "findings": [f.to_dict() for f in self.findings],
            "not_analysed": [n.to_dict() for n in self.not_analysed],
            "sr": {"sop_instance_uid": self.sr_sop_instance_uid, "series_instance_uid": self.sr_series_instance_uid},
        }

    def to_json(self) -> str:
        """The JSON document (UTF-8 text, keys in a stable order)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyResult:
        """Read the JSON form; raises ``ValueError`` for another schema or a missing key."""
        schema = data.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"not a study result of schema {SCHEMA!r}: {schema!r}")
        try:
            model = data["model"]
            sr = data.get("sr") or {}
            return cls(
                study_instance_uid=str(data["study_instance_uid"]),
                model_name=str(model["name"]),
                model_version=str(model["version"]),
                threshold=float(model["threshold"]),
                fracture=bool(data["fracture"]),
                max_probability=float(data["max_probability"]),
                positive_instances=int(data["positive_instances"]),
                created_at=str(data["created_at"]),
                accession_number=data.get("accession_number"),
                patient_id=data.get("patient_id"),
                patient_name=data.get("patient_name"),
                study_date=data.get("study_date"),
                study_description=data.get("study_description"),
                modalities=tuple(str(m) for m in data.get("modalities") or ()),
                calling_aet=data.get("calling_aet"),
                findings=tuple(ImageFinding.from_dict(f) for f in data.get("findings") or ()),
                not_analysed=tuple(NotAnalysed.from_dict(n) for n in data.get("not_analysed") or ()),
                sr_sop_instance_uid=sr.get("sop_instance_uid"),
                sr_series_instance_uid=sr.get("series_instance_uid"),
                revision=int(data.get("revision", 1)),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"incomplete study result: {type(exc).__name__}: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> StudyResult:
        """The inverse of :meth:`to_json`; raises ``ValueError`` for text that is not a study result."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a study result is a JSON object")
        return cls.from_dict(data)


def _utc_iso(moment: datetime | None) -> str:
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # stored times are UTC
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_study_result(
    *,
    study_instance_uid: str,
    model_name: str,
    model_version: str,
    threshold: float,
    findings: Iterable[ImageFinding],
    not_analysed: Iterable[NotAnalysed] = (),
    accession_number: str | None = None,
    patient_id: str | None = None,
    patient_name: str | None = None,
    study_date: str | None = None,
    study_description: str | None = None,
    modalities: Iterable[str] | str | None = None,
    calling_aet: str | None = None,
    sr_sop_instance_uid: str | None = None,
    sr_series_instance_uid: str | None = None,
    created_at: datetime | None = None,
    revision: int = 1,
) -> StudyResult:
    """A :class:`StudyResult` from plain values; the study-level outcome is derived from ``findings``.

    ``fracture`` is true when any image is positive, ``max_probability`` is the
    highest image probability (0 when nothing was analysed), and
    ``positive_instances`` counts the positive images. ``modalities`` may be
    a list or a backslash-separated DICOM value (``"DX\\\\CR"``, as Modalities
    in Study holds it). Empty strings become ``None``; ``created_at`` defaults
    to now.
    """
    items = tuple(findings)
    if isinstance(modalities, str):
        modality_list = tuple(m.strip() for m in modalities.split("\\") if m.strip())
    else:
        modality_list = tuple(m.strip() for m in modalities or () if m and m.strip())

    def blank(value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    return StudyResult(
        study_instance_uid=study_instance_uid,
        model_name=model_name,
        model_version=model_version,
        threshold=threshold,
        fracture=any(f.fracture for f in items),
        max_probability=max((f.probability for f in items), default=0.0),
        positive_instances=sum(1 for f in items if f.fracture),
        created_at=_utc_iso(created_at),
        accession_number=blank(accession_number),
        patient_id=blank(patient_id),
        patient_name=blank(patient_name),
        study_date=blank(study_date),
        study_description=blank(study_description),
        modalities=modality_list,
        calling_aet=blank(calling_aet),
        findings=items,
        not_analysed=tuple(not_analysed),
        sr_sop_instance_uid=sr_sop_instance_uid,
        sr_series_instance_uid=sr_series_instance_uid,
        revision=revision,
    )
