"""Revisions of a study's result: what makes two results the same, and how a newer one replaces an older one.

A study's result objects (SR, annotated captures, presentation states,
summary) are one *revision*. Its identity is a digest of the content that
matters to the radiologist (:func:`content_digest`): per source SOP Instance
UID the fracture probability rounded to 0.1 % (:data:`PROBABILITY_DECIMALS`),
the decision, the body part and the boxes in whole pixels; the model name,
version and threshold; the images that could not be analysed and why; the
report settings that change what is drawn or written; and the UID of the
revision it replaces. Every UID of the revision is derived from that digest
(:mod:`pacs_bridge.report.uids`), so:

- the same content gives the same UIDs: a resend or a rebuild after a crash
  creates no duplicate in the PACS;
- changed content (a late instance, a new model, a changed probability)
  gives new SOP Instance UIDs *and new Series Instance UIDs*: each revision
  is its own set of series, so a viewer never mixes stale and current
  images in one series (PS3.5 §9.1: a UID names one content);
- content that returns to an earlier state still gets new UIDs, because the
  predecessor is part of the digest.

A newer revision shows as newer in every viewer: its Series Numbers are those
of the first revision plus :data:`SERIES_STEP` per revision (9901, 9911,
9921, ... for the SR), its SR's Instance Number is the revision number, its
Content Date/Time is later, its Series Description says "revision N", and
its SR lists the SR it replaces in the Predecessor Documents Sequence
(PS3.3 C.17.2.3).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset

from pacs_bridge.config import ReportSettings
from pacs_bridge.report.findings import FailedImage, FindingInput, ModelInfo
from pacs_bridge.report.uids import content_series_uid, content_uid

__all__ = [
    "PROBABILITY_DECIMALS",
    "SERIES_STEP",
    "PriorObject",
    "Revision",
    "content_digest",
    "first_revision",
    "revision_digest",
]

PROBABILITY_DECIMALS = 3
"""Probabilities are compared (and written in the SR) to 0.1 %: model noise below that is not a new result."""
SERIES_STEP = 10
"""Each revision's Series Numbers are the previous revision's plus this, so the newest series sort last."""


@dataclass(frozen=True)
class PriorObject:
    """An object of an earlier revision, as its Hierarchical SOP Instance Reference needs it (PS3.3 C.17.2.1)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str

    def as_dataset(self) -> Dataset:
        """A header with the four UIDs, as highdicom's ``previous_versions`` and evidence lists take it."""
        ds = Dataset()
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.StudyInstanceUID = self.study_instance_uid
        return ds


def _finding_key(finding: FindingInput) -> dict[str, Any]:
    return {
        "sop": finding.sop_instance_uid,
        "p": round(float(finding.probability), PROBABILITY_DECIMALS),
        "fracture": bool(finding.fracture),
        "threshold": round(float(finding.threshold), 4),
        "body_part": (finding.body_part or "").strip().lower(),
        "boxes": [[round(v) for v in box] for box in finding.boxes],
    }


def _appearance(settings: ReportSettings) -> dict[str, Any]:
    """The settings that change what the objects show; a change makes a new revision."""
    return {
        "disclaimer": settings.banner_disclaimer,
        "heatmap_min": round(float(settings.heatmap_min), 4),
        "heatmap_opacity": round(float(settings.heatmap_opacity), 4),
        "annotate_negatives": settings.annotate_negatives,
        "manufacturer": settings.manufacturer,
        "institution": settings.institution_name or "",
    }


def content_digest(
    study_uid: str,
    model: ModelInfo,
    findings: Sequence[FindingInput],
    failed: Sequence[FailedImage],
    settings: ReportSettings,
) -> str:
    """SHA-256 (hex) of the content of a study's result, without its predecessor; independent of order and time."""
    document = {
        "study": study_uid,
        "model": [model.name, model.version, round(float(model.threshold), 4)],
        "findings": sorted((_finding_key(f) for f in findings), key=lambda item: str(item["sop"])),
        "failed": sorted([f.sop_instance_uid, f.reason] for f in failed),
        "appearance": _appearance(settings),
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def revision_digest(content: str, predecessor_uid: str | None) -> str:
    """The digest that names a revision: its content and the UID of the object it replaces."""
    return hashlib.sha256(f"{content}\x1f{predecessor_uid or ''}".encode()).hexdigest()


@dataclass(frozen=True)
class Revision:
    """One revision of a study's result: its number (1 for the first), digest, predecessor and content time.

    ``predecessor`` is the SR of the revision this one replaces (listed in
    the new SR's Predecessor Documents Sequence), ``replaces`` the UID that
    entered the digest (the predecessor's revision anchor), and
    ``content_datetime`` the time the result's content was produced (the
    newest analysis it is built from), written as Content, Series and
    Instance Creation Date/Time so that a rebuild writes identical objects.
    """

    number: int
    digest: str
    content_datetime: datetime
    predecessor: PriorObject | None = None
    replaces: str | None = None

    def __post_init__(self) -> None:
        if self.number < 1:
            raise ValueError(f"revision {self.number} is not 1 or more")

    def sop_instance_uid(self, kind: str, source_sop_instance_uid: str | None = None) -> str:
        """SOP Instance UID of this revision's ``kind`` object (of ``source_sop_instance_uid``, per image)."""
        return content_uid(self.digest, kind, source_sop_instance_uid)

    def series_instance_uid(self, kind: str) -> str:
        """Series Instance UID of this revision's ``kind`` objects."""
        return content_series_uid(self.digest, kind)

    def series_number(self, first: int) -> int:
        """The Series Number of a kind whose first revision's series is ``first``."""
        return first + SERIES_STEP * (self.number - 1)

    def series_description(self, text: str) -> str:
        """``text``, with ", revision N" from the second revision on (at most 64 characters)."""
        return (text if self.number == 1 else f"{text}, revision {self.number}")[:64]

    def stamp(self, dataset: Dataset) -> None:
        """Write the content time as Content, Series and Instance Creation Date/Time (PS3.3 C.7.6.1, C.12.1).

        Contribution Date Time of the Contributing Equipment (PS3.3 C.12.1.1.5) takes the same time.
        """
        moment = self.content_datetime.astimezone(UTC) if self.content_datetime.tzinfo else self.content_datetime
        day, time = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")
        dataset.ContentDate = day
        dataset.ContentTime = time
        dataset.SeriesDate = day
        dataset.SeriesTime = time
        dataset.InstanceCreationDate = day
        dataset.InstanceCreationTime = time
        if "DateOfSecondaryCapture" in dataset or "TimeOfSecondaryCapture" in dataset:  # PS3.3 C.8.6.1
            dataset.DateOfSecondaryCapture = day
            dataset.TimeOfSecondaryCapture = time
        # Contributing equipment that dates its contribution (highdicom names itself so) is dated
        # with the content too, so that a rebuild writes the same bytes.
        for item in dataset.get("ContributingEquipmentSequence", []):
            if "ContributionDateTime" in item:
                item.ContributionDateTime = day + time


def first_revision(
    study_uid: str,
    model: ModelInfo,
    findings: Sequence[FindingInput],
    settings: ReportSettings,
    failed: Sequence[FailedImage] = (),
    content_datetime: datetime | None = None,
) -> Revision:
    """Revision 1 of the given content, for building objects outside the publishing flow."""
    digest = revision_digest(content_digest(study_uid, model, findings, failed, settings), None)
    return Revision(1, digest, content_datetime or datetime.now(UTC).replace(microsecond=0))
