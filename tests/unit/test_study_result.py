"""The study result document: derived from plain values, JSON round trip, versioned, strict about what it reads."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pacs_bridge.report.study_result import SCHEMA, ImageFinding, NotAnalysed, StudyResult, build_study_result

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.11"


def _result(**overrides: object) -> StudyResult:
    values: dict[str, object] = {
        "study_instance_uid": STUDY,
        "model_name": "fracatlas-cnn",
        "model_version": "1.2.0",
        "threshold": 0.5,
        "findings": [
            ImageFinding("1.2.826.0.1.3680043.8.498.12", SERIES, 0.91, True, "hand", ((10, 20, 30, 40),)),
            ImageFinding("1.2.826.0.1.3680043.8.498.13", SERIES, 0.62, True, "hand"),
            ImageFinding("1.2.826.0.1.3680043.8.498.14", SERIES, 0.04, False, None),
        ],
        "not_analysed": [NotAnalysed("1.2.826.0.1.3680043.8.498.15", "pixel data cannot be decoded")],
        "accession_number": "ACC42",
        "patient_id": "PB-0042",
        "patient_name": "Doe^Jane",
        "study_date": "20240131",
        "study_description": " XR HAND ",
        "modalities": "DX\\CR",
        "calling_aet": "MAINPACS",
        "sr_sop_instance_uid": "1.2.826.0.1.3680043.8.498.16",
        "sr_series_instance_uid": "1.2.826.0.1.3680043.8.498.17",
        "created_at": datetime(2024, 1, 31, 12, 30, 5, 123456, tzinfo=UTC),
    }
    values.update(overrides)
    return build_study_result(**values)  # type: ignore[arg-type]


def test_study_outcome_is_derived_from_the_images() -> None:
    result = _result()
    assert result.fracture is True
    assert result.max_probability == pytest.approx(0.91)
    assert result.max_percent == 91.0
    assert result.positive_instances == 2
    assert result.modalities == ("DX", "CR")
    assert result.study_description == "XR HAND"
    assert result.created_at == "2024-01-31T12:30:05Z"
    assert result.revision == 1
    assert result.model_label == "fracatlas-cnn 1.2.0"
    assert result.findings[0].boxes == ((10.0, 20.0, 30.0, 40.0),)

    negative = _result(findings=[ImageFinding("1.2.826.0.1.3680043.8.498.14", SERIES, 0.04, False)])
    assert (negative.fracture, negative.positive_instances, negative.max_percent) == (False, 0, 4.0)
    nothing = _result(findings=[], accession_number="", patient_name=None, modalities=["DX", " "])
    assert (nothing.fracture, nothing.max_probability, nothing.accession_number) == (False, 0.0, None)
    assert nothing.modalities == ("DX",)


def test_json_round_trip_is_exact_and_versioned() -> None:
    result = _result(revision=3)
    text = result.to_json()
    data = json.loads(text)
    assert next(iter(data)) == "schema" and data["schema"] == SCHEMA
    assert data["revision"] == 3
    assert data["model"] == {"name": "fracatlas-cnn", "version": "1.2.0", "threshold": 0.5}
    assert data["sr"]["sop_instance_uid"] == "1.2.826.0.1.3680043.8.498.16"
    assert data["findings"][0]["boxes"] == [[10.0, 20.0, 30.0, 40.0]]
    assert data["not_analysed"] == [
        {"sop_instance_uid": "1.2.826.0.1.3680043.8.498.15", "reason": "pixel data cannot be decoded"}
    ]
    again = StudyResult.from_json(text)
    assert again == result
    assert again.to_json() == text
    assert StudyResult.from_json(text.encode("utf-8")) == result


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"schema": "pacs-bridge/study-result/999"}', "schema"),
        ("[1, 2]", "JSON object"),
        (json.dumps({"schema": SCHEMA, "study_instance_uid": STUDY}), "incomplete"),
    ],
)
def test_reading_refuses_what_it_does_not_know(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StudyResult.from_json(text)


@pytest.mark.parametrize(
    "overrides",
    [
        {"study_instance_uid": "../../etc"},
        {"threshold": 1.5},
        {"revision": 0},
        {"sr_sop_instance_uid": "1.2.x"},
    ],
)
def test_invalid_values_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _result(**overrides)


def test_invalid_findings_are_refused() -> None:
    with pytest.raises(ValueError, match="probability"):
        ImageFinding("1.2.3", "1.2.4", 1.2, True)
    with pytest.raises(ValueError, match="box"):
        ImageFinding("1.2.3", "1.2.4", 0.2, False, boxes=((5, 5, 5, 9),))
    with pytest.raises(ValueError, match="UID"):
        NotAnalysed("not a uid", "reason")
