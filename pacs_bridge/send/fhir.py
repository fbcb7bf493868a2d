"""FHIR R4: a study result as a DiagnosticReport with Observations, posted as one transaction Bundle.

Built and validated with the ``fhir.resources`` models of FHIR 4.3.0
(``fhir.resources.R4B``), using only elements that FHIR R4 (4.0.1) has in
the same form, so an R4 server reads them unchanged.

- ``Observation`` (overall, and one per analysed image): code SNOMED CT
  72704001 "Fracture"; ``valueQuantity`` the fracture probability in percent
  (UCUM ``%``); ``interpretation`` POS/NEG (v3 ObservationInterpretation);
  ``bodySite`` SNOMED CT where the region is known; ``method`` the algorithm
  name, version and threshold; ``derivedFrom`` the ImagingStudy by its Study
  Instance UID; the disclaimer as a ``note``. A per-image Observation is
  identified by the Tracking Unique Identifier of the same finding in the
  TID 1500 SR (PS3.16), and names its image in ``derivedFrom.display``.
- ``DiagnosticReport``: identified by the SR's SOP Instance UID
  (``urn:dicom:uid`` / ``urn:oid:...``, the convention of ImagingStudy
  identifiers), ``basedOn`` the order by Accession Number (v2-0203 ACSN),
  code LOINC 18748-4 "Diagnostic imaging study", category v2-0074 RAD,
  ``subject`` the patient by Patient ID, ``imagingStudy`` by Study Instance
  UID, ``conclusion`` in words and ``conclusionCode`` 72704001 when a
  fracture is suspected.

Every entry is a conditional update (``PUT Type?identifier=system|value``),
so sending a result again, or a revision, updates the same resources rather
than adding copies. ``status`` is ``final`` or ``preliminary`` as the
destination's ``result_status`` says, ``corrected`` for a revision above 1.

The Bundle is POSTed to the destination's ``url`` (the FHIR base URL).
2xx is success; 5xx, 408 and 429 are transient failures; 400, 401, 403,
404, 409, 412, 422 ... permanent (see :mod:`pacs_bridge.send.http`).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from pacs_bridge.config import DestinationSettings
from pacs_bridge.report.sr import FRACTURE, finding_site_code
from pacs_bridge.report.study_result import ImageFinding, StudyResult
from pacs_bridge.report.uids import instance_uid, tracking_uid
from pacs_bridge.send.dimse import Failure, SendResult
from pacs_bridge.send.http import describe_response, http_client, http_failure, transport_error

__all__ = ["FHIR_JSON", "build_bundle", "send_result"]

LOGGER = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_DIAGNOSTIC_SERVICE = "http://terminology.hl7.org/CodeSystem/v2-0074"
_IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
_NAMESPACE = uuid.UUID("0d7c2c5e-3f4b-4a3e-8e0c-6b1f2f9f5a11")


def status_code(result: StudyResult, destination: DestinationSettings) -> str:
    """``corrected`` for a revision, else ``final`` or ``preliminary`` (DiagnosticReport and Observation status)."""
    return "corrected" if result.revision > 1 else destination.result_status


def _urn_oid(uid: str) -> dict[str, str]:
    return {"system": DICOM_UID, "value": f"urn:oid:{uid}"}


def _full_url(identifier: dict[str, str]) -> str:
    return f"urn:uuid:{uuid.uuid5(_NAMESPACE, identifier['system'] + '|' + identifier['value'])}"


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def _fhir_date(study_date: str | None) -> str | None:
    if study_date and len(study_date) == 8 and study_date.isdigit():
        return f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    return None


def _observation(
    result: StudyResult,
    status: str,
    identifier: dict[str, str],
    probability_percent: float,
    fracture: bool,
    disclaimer: str,
    *,
    finding: ImageFinding | None = None,
) -> dict[str, Any]:
    study = {"type": "ImagingStudy", "identifier": _urn_oid(result.study_instance_uid)}
    if finding is not None:
        study["display"] = f"image {finding.sop_instance_uid}"
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "identifier": [identifier],
        "status": status,
        "category": [{"coding": [_coding(_OBSERVATION_CATEGORY, "imaging", "Imaging")]}],
        "code": {
            "coding": [_coding(SNOMED, str(FRACTURE.value), str(FRACTURE.meaning))],
            "text": "AI fracture probability" + (" (image)" if finding is not None else " (study)"),
        },
        "effectiveDateTime": result.created_at,
        "issued": result.created_at,
        "valueQuantity": {"value": probability_percent, "unit": "%", "system": UCUM, "code": "%"},
        "interpretation": [
            {
                "coding": [
                    _coding(_INTERPRETATION, "POS", "Positive")
                    if fracture
                    else _coding(_INTERPRETATION, "NEG", "Negative")
                ]
            }
        ],
        "method": {"text": f"{result.model_label}, threshold {result.threshold * 100:g} %"},
        "device": {"display": result.model_label},
        "derivedFrom": [study],
        "note": [{"text": disclaimer}],
    }
    if result.patient_id:
        observation["subject"] = {"type": "Patient", "identifier": {"value": result.patient_id}}
    if finding is not None:
        site = finding_site_code(finding.body_part)
        if site is not None:
            observation["bodySite"] = {"coding": [_coding(SNOMED, str(site.value), str(site.meaning))]}
    return observation


def _entry(resource: dict[str, Any], identifier: dict[str, str]) -> dict[str, Any]:
    kind = resource["resourceType"]
    return {
        "fullUrl": _full_url(identifier),
        "resource": resource,
        "request": {"method": "PUT", "url": f"{kind}?identifier={identifier['system']}|{identifier['value']}"},
    }


def _conclusion(result: StudyResult, disclaimer: str) -> str:
    analysed = len(result.findings)
    if result.fracture:
        what = (
            f"AI: fracture suspected ({result.max_percent:.0f}%), "
            f"{result.positive_instances} of {analysed} image(s) positive"
        )
    elif analysed:
        what = f"AI: no fracture detected in {analysed} image(s) (highest {result.max_percent:.0f}%)"
    else:
        what = "AI: no image could be analysed"
    if result.not_analysed:
        what += f"; {len(result.not_analysed)} image(s) not analysed"
    return f"{what}. {result.model_label}. {disclaimer}."


def build_bundle(result: StudyResult, destination: DestinationSettings, disclaimer: str) -> Bundle:
    """The transaction Bundle of a study result (see the module docstring), validated by the R4B models."""
    status = status_code(result, destination)
    entries: list[dict[str, Any]] = []
    overall_id = _urn_oid(
        instance_uid(result.study_instance_uid, result.model_name, result.model_version, "fhir-observation")
    )
    overall = _observation(result, status, overall_id, result.max_percent, result.fracture, disclaimer)
    Observation.model_validate(overall)
    entries.append(_entry(overall, overall_id))
    for finding in result.findings:
        image_id = _urn_oid(
            tracking_uid(result.study_instance_uid, result.model_name, result.model_version, finding.sop_instance_uid)
        )
        observation = _observation(
            result, status, image_id, finding.percent, finding.fracture, disclaimer, finding=finding
        )
        Observation.model_validate(observation)
        entries.append(_entry(observation, image_id))

    report_uid = result.sr_sop_instance_uid or instance_uid(
        result.study_instance_uid, result.model_name, result.model_version, "fhir-report"
    )
    report_id = _urn_oid(report_uid)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [report_id],
        "status": status,
        "category": [{"coding": [_coding(_DIAGNOSTIC_SERVICE, "RAD", "Radiology")]}],
        "code": {"coding": [_coding(LOINC, "18748-4", "Diagnostic imaging study")]},
        "issued": result.created_at,
        "result": [{"reference": entry["fullUrl"]} for entry in entries],
        "imagingStudy": [{"type": "ImagingStudy", "identifier": _urn_oid(result.study_instance_uid)}],
        "conclusion": _conclusion(result, disclaimer),
    }
    if result.accession_number:
        report["basedOn"] = [
            {
                "type": "ServiceRequest",
                "identifier": {
                    "type": {"coding": [_coding(_IDENTIFIER_TYPE, "ACSN", "Accession ID")]},
                    "value": result.accession_number,
                },
            }
        ]
    if result.patient_id:
        report["subject"] = {"type": "Patient", "identifier": {"value": result.patient_id}}
    effective = _fhir_date(result.study_date)
    if effective:
        report["effectiveDateTime"] = effective
    if result.fracture:
        report["conclusionCode"] = [{"coding": [_coding(SNOMED, str(FRACTURE.value), str(FRACTURE.meaning))]}]
    DiagnosticReport.model_validate(report)
    entries.append(_entry(report, report_id))
    return Bundle.model_validate({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def send_result(destination: DestinationSettings, path: Path, disclaimer: str, timeout: float) -> SendResult:
    """POST the study result document at ``path`` to ``destination`` (a ``fhir`` destination) as a transaction."""
    try:
        result = StudyResult.from_json(path.read_bytes())
    except (OSError, ValueError) as exc:
        error = f"unreadable study result: {type(exc).__name__}: {exc}"
        return SendResult(path, None, False, error=error, failure=Failure.PERMANENT)
    try:
        body = build_bundle(result, destination, disclaimer).model_dump_json()
    except ValueError as exc:  # the models refuse a value: sending again cannot help
        error = f"cannot build the FHIR Bundle: {type(exc).__name__}: {exc}"
        return SendResult(path, None, False, error=error, failure=Failure.PERMANENT)
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    try:
        with http_client(destination, timeout) as client:
            response = client.post(str(destination.url), content=body.encode("utf-8"), headers=headers)
    except httpx.HTTPError as exc:
        return SendResult(path, None, False, error=transport_error(destination, exc), failure=Failure.TRANSIENT)
    except (OSError, ValueError) as exc:  # TLS files that cannot be read, a URL httpx refuses
        error = f"cannot send to {destination.name}: {type(exc).__name__}: {exc}"
        return SendResult(path, None, False, error=error, failure=Failure.PERMANENT)
    LOGGER.debug(
        "FHIR transaction for study %s to %s: HTTP %d",
        result.study_instance_uid,
        destination.name,
        response.status_code,
    )
    if response.is_success:
        return SendResult(path, None, True)
    return SendResult(path, None, False, error=describe_response(response), failure=http_failure(response.status_code))
