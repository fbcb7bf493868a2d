"""Result delivery to real peers of every destination type, through :func:`pacs_bridge.send.transport.deliver`.

STOW-RS to Orthanc's DICOMweb plugin and C-STORE to Orthanc; HL7 v2 ORU^R01 to
an MLLP listener that parses the message with hl7apy and ACKs; a FHIR
transaction to an HTTP server that validates it with the fhir.resources
models; a webhook to an HTTP server. Each peer also fails in the ways that
matter, and each failure must come back classified as transient or permanent.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.parser import parse_message

from pacs_bridge.config import DestinationSettings, Settings
from pacs_bridge.report.study_result import ImageFinding, StudyResult, build_study_result
from pacs_bridge.report.uids import tracking_uid
from pacs_bridge.send.dimse import Failure, SendResult
from pacs_bridge.send.transport import OutgoingItem, deliver
from pacs_bridge.send.webhook import EVENT_HEADER
from tests.support.dicom_files import make_radiograph
from tests.support.http_stub import HttpStub, Reply, StubRequest
from tests.support.mllp import MllpListener
from tests.support.orthanc import OrthancServer, dicomweb_available, free_port

STUDY = "1.2.826.0.1.3680043.8.498.901.1"
SERIES = "1.2.826.0.1.3680043.8.498.901.2"
IMAGE_1 = "1.2.826.0.1.3680043.8.498.901.3.1"
IMAGE_2 = "1.2.826.0.1.3680043.8.498.901.3.2"
SR_UID = "1.2.826.0.1.3680043.8.498.901.4"
SR_SERIES = "1.2.826.0.1.3680043.8.498.901.5"
RESULT_UID = "1.2.826.0.1.3680043.8.498.901.6"
DISCLAIMER = "AI result, not a diagnosis"


def _settings(tmp_path: Path, timeout: float = 5.0) -> Settings:
    return Settings.model_validate(
        {"storage": {"data_dir": str(tmp_path / "data"), "fsync": False}, "send": {"timeout": timeout}}
    )


def _study_result() -> StudyResult:
    return build_study_result(
        study_instance_uid=STUDY,
        model_name="fracatlas-cnn",
        model_version="1.2.0",
        threshold=0.5,
        findings=[
            ImageFinding(IMAGE_1, SERIES, 0.93, True, "hand", ((221.0, 165.0, 270.0, 192.0),)),
            ImageFinding(IMAGE_2, SERIES, 0.07, False, "hand"),
        ],
        accession_number="ACC0001",
        patient_id="PB-TEST-0001",
        patient_name="Test^Patient",
        study_date="20240131",
        study_description="XR HAND 2 VIEWS",
        modalities="DX",
        calling_aet="MAINPACS",
        sr_sop_instance_uid=SR_UID,
        sr_series_instance_uid=SR_SERIES,
    )


@pytest.fixture()
def result_item(tmp_path: Path) -> OutgoingItem:
    """The study result document as publishing leaves it: <data_dir>/outputs/<study>/<uid>.json."""
    path = tmp_path / "data" / "outputs" / STUDY / f"{RESULT_UID}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_study_result().to_json(), encoding="utf-8")
    return OutgoingItem(path=path, kind="result", sop_instance_uid=RESULT_UID, study_instance_uid=STUDY)


@pytest.fixture()
def dicom_items(tmp_path: Path) -> list[OutgoingItem]:
    """Two small DICOM files of one study, as kinds a DICOM destination takes."""
    items = []
    for number, kind in ((1, "sr"), (2, "capture")):
        ds = make_radiograph(
            np.random.default_rng(number).random((64, 64)), STUDY, series_uid=SERIES, instance_number=number
        )
        path = tmp_path / "data" / "outputs" / STUDY / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        items.append(OutgoingItem(path, kind, str(ds.SOPInstanceUID), STUDY))
    return items


def _assert_failed(results: list[SendResult], failure: Failure, text: str = "") -> None:
    assert results, "no result"
    for result in results:
        assert not result.ok
        assert result.failure is failure, result
        assert result.permanent is (failure is Failure.PERMANENT)
        assert text in (result.describe() or ""), result.describe()


# -- DICOM: C-STORE and STOW-RS to Orthanc -----------------------------------------------------------


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    if not dicomweb_available():
        pytest.skip("Orthanc or its DICOMweb plugin (orthanc-dicomweb) is not installed")
    with OrthancServer(tmp_path, dicomweb=True, users={"bridge": "s3cret"}) as server:
        yield server


@pytest.mark.orthanc
def test_stow_rs_stores_in_orthanc_and_classifies_failures(
    tmp_path: Path, pacs: OrthancServer, dicom_items: list[OutgoingItem]
) -> None:
    settings = _settings(tmp_path)
    destination = DestinationSettings(
        name="dicomweb", type="dicomweb", url=pacs.dicomweb_url, auth="basic", username="bridge", password="s3cret"
    )
    results = deliver(destination, dicom_items, settings)
    assert [r.ok for r in results] == [True, True]
    assert [r.sop_instance_uid for r in results] == [item.sop_instance_uid for item in dicom_items]
    stored = {item["MainDicomTags"]["SOPInstanceUID"] for item in pacs.instances_of_study(STUDY)}
    assert stored == {item.sop_instance_uid for item in dicom_items}

    # Sending the same instances again is accepted: a resend replaces, it does not fail.
    assert all(r.ok for r in deliver(destination, dicom_items, settings))
    assert len(pacs.instances_of_study(STUDY)) == 2

    wrong = destination.model_copy(update={"password": "wrong"})
    _assert_failed(deliver(wrong, dicom_items, settings), Failure.PERMANENT, "HTTP 401")

    nowhere = destination.model_copy(update={"url": f"{pacs.url}/no-such-root"})
    _assert_failed(deliver(nowhere, dicom_items[:1], settings), Failure.PERMANENT, "HTTP 404")

    pacs.stop()
    _assert_failed(deliver(destination, dicom_items, settings), Failure.TRANSIENT, "cannot connect")


@pytest.mark.orthanc
def test_dicom_destination_goes_through_c_store(
    tmp_path: Path, pacs: OrthancServer, dicom_items: list[OutgoingItem], result_item: OutgoingItem
) -> None:
    settings = _settings(tmp_path)
    destination = DestinationSettings(name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port)
    missing = OutgoingItem(dicom_items[0].path.with_name("gone.dcm"), "capture", "1.2.3.4", STUDY)
    results = deliver(destination, [dicom_items[0], result_item, missing, dicom_items[1]], settings)
    assert [r.ok for r in results] == [True, False, False, True]
    assert results[0].status == 0x0000
    # A result document is not a DICOM object; a missing file cannot appear by retrying.
    _assert_failed([results[1]], Failure.PERMANENT, "does not take result")
    _assert_failed([results[2]], Failure.PERMANENT, "output file missing")
    assert len(pacs.instances_of_study(STUDY)) == 2

    refused = DestinationSettings(name="down", ae_title="NOBODY", host="127.0.0.1", port=free_port())
    _assert_failed(deliver(refused, dicom_items, settings), Failure.TRANSIENT, "no association")


# -- HL7 v2.5.1 ORU^R01 over MLLP ---------------------------------------------------------------------


@pytest.fixture()
def ris() -> Iterator[MllpListener]:
    with MllpListener() as listener:
        yield listener


def _hl7_destination(port: int) -> DestinationSettings:
    return DestinationSettings(
        name="ris",
        type="hl7",
        host="127.0.0.1",
        port=port,
        sending_facility="RADIOLOGY",
        receiving_application="RIS",
        receiving_facility="HOSPITAL",
    )


def _observations(message: Any) -> list[Any]:
    order = message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
    return [group.OBX for group in order.ORU_R01_OBSERVATION]


def test_hl7_oru_reaches_the_ris(tmp_path: Path, ris: MllpListener, result_item: OutgoingItem) -> None:
    settings = _settings(tmp_path)
    results = deliver(_hl7_destination(ris.port), [result_item], settings)
    assert results[0].ok, results[0].describe()
    assert results[0].sop_instance_uid == RESULT_UID
    assert len(ris.messages) == 1

    message = parse_message(ris.messages[0], find_groups=True)
    assert message.validate() is True  # the HL7 v2.5.1 ORU_R01 structure, every required field present
    msh = message.MSH
    assert msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert msh.msh_12.to_er7() == "2.5.1"
    assert [msh.msh_3.to_er7(), msh.msh_4.to_er7(), msh.msh_5.to_er7(), msh.msh_6.to_er7()] == [
        "PACS_BRIDGE",
        "RADIOLOGY",
        "RIS",
        "HOSPITAL",
    ]
    pid = message.ORU_R01_PATIENT_RESULT.ORU_R01_PATIENT.PID
    assert pid.pid_3.cx_1.to_er7() == "PB-TEST-0001"
    assert pid.pid_5.to_er7() == "Test^Patient"
    order = message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION
    assert order.ORC.orc_1.to_er7() == "RE"
    assert order.ORC.orc_2.to_er7() == "ACC0001"
    assert order.OBR.obr_2.to_er7() == order.OBR.obr_3.to_er7() == "ACC0001"
    assert order.OBR.obr_4.to_er7() == "18748-4^Diagnostic imaging study^LN"
    assert order.OBR.obr_7.to_er7() == "20240131"
    assert order.OBR.obr_25.to_er7() == "F"
    assert DISCLAIMER in order.NTE.nte_3.to_er7()

    obx = _observations(message)
    rows = [(o.obx_2.to_er7(), o.obx_3.to_er7(), o.obx_4.to_er7(), o.obx_5.to_er7()) for o in obx]
    assert [o.obx_1.to_er7() for o in obx] == [str(n) for n in range(1, len(obx) + 1)]
    assert {o.obx_11.to_er7() for o in obx} == {"F"}
    assert ("HD", "113014^Study^DCM", "", STUDY) in rows
    assert ("CWE", "72704001^Fracture^SCT", "", "52101004^Present^SCT") in rows
    assert ("NM", "111012^Certainty of Finding^DCM", "", "93.0") in rows
    assert ("ST", "111001^Algorithm Name^DCM", "", "fracatlas-cnn") in rows
    assert ("ST", "111003^Algorithm Version^DCM", "", "1.2.0") in rows
    assert ("HD", "SRUID^AI report SOP Instance UID^99PBR", "", SR_UID) in rows
    # One group of OBX per image, tied together by the sub-ID.
    assert ("HD", "IMGUID^Image SOP Instance UID^99PBR", "1", IMAGE_1) in rows
    assert ("CWE", "72704001^Fracture^SCT", "1", "52101004^Present^SCT") in rows
    assert ("HD", "IMGUID^Image SOP Instance UID^99PBR", "2", IMAGE_2) in rows
    assert ("CWE", "72704001^Fracture^SCT", "2", "272519000^Absent^SCT") in rows
    assert ("NM", "111012^Certainty of Finding^DCM", "2", "7.0") in rows
    assert ("CWE", "363698007^Finding Site^SCT", "1", "85562004^Hand structure^SCT") in rows
    percent = next(o for o in obx if o.obx_2.to_er7() == "NM")
    assert percent.obx_6.to_er7() == "%^percent^UCUM"
    flags = [o.obx_8.to_er7() for o in obx if o.obx_3.to_er7().startswith("72704001")]
    assert flags == ["A", "A", "N"]


@pytest.mark.parametrize(
    ("code", "failure"),
    [("AE", Failure.TRANSIENT), ("CE", Failure.TRANSIENT), ("AR", Failure.PERMANENT), ("CR", Failure.PERMANENT)],
)
def test_hl7_negative_ack_is_classified(
    tmp_path: Path, ris: MllpListener, result_item: OutgoingItem, code: str, failure: Failure
) -> None:
    ris.ack_code = code
    results = deliver(_hl7_destination(ris.port), [result_item], _settings(tmp_path))
    _assert_failed(results, failure, f"ACK {code}: test {code}")
    assert len(ris.messages) == 1


def test_hl7_silence_and_refusal_are_transient(tmp_path: Path, ris: MllpListener, result_item: OutgoingItem) -> None:
    ris.ack_code = None  # reads the message, never answers
    settings = _settings(tmp_path, timeout=1.0)
    _assert_failed(deliver(_hl7_destination(ris.port), [result_item], settings), Failure.TRANSIENT, "no ACK")
    assert len(ris.messages) == 1
    _assert_failed(deliver(_hl7_destination(free_port()), [result_item], settings), Failure.TRANSIENT, "cannot deliver")


def test_hl7_revision_is_sent_as_a_correction(tmp_path: Path, ris: MllpListener, result_item: OutgoingItem) -> None:
    revised = StudyResult.from_json(result_item.path.read_text(encoding="utf-8"))
    result_item.path.write_text(StudyResult.from_dict({**revised.to_dict(), "revision": 2}).to_json(), encoding="utf-8")
    destination = _hl7_destination(ris.port).model_copy(update={"result_status": "preliminary"})
    assert deliver(destination, [result_item], _settings(tmp_path))[0].ok
    message = parse_message(ris.messages[0], find_groups=True)
    assert message.ORU_R01_PATIENT_RESULT.ORU_R01_ORDER_OBSERVATION.OBR.obr_25.to_er7() == "C"
    assert {o.obx_11.to_er7() for o in _observations(message)} == {"C"}


# -- FHIR R4 -------------------------------------------------------------------------------------------


def _fhir_server(request: StubRequest) -> Reply:
    """A FHIR endpoint that accepts only a valid transaction Bundle (validated by the R4B models)."""
    if request.headers.get("content-type") != "application/fhir+json":
        return 415, "application/fhir+json", b'{"resourceType": "OperationOutcome"}'
    bundle = Bundle.model_validate_json(request.body)
    if bundle.type != "transaction":
        return 400, "application/fhir+json", b'{"resourceType": "OperationOutcome"}'
    answer = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [{"response": {"status": "201 Created"}} for _ in bundle.entry or []],
    }
    return 200, "application/fhir+json", json.dumps(answer).encode()


@pytest.fixture()
def fhir_server() -> Iterator[HttpStub]:
    with HttpStub(_fhir_server) as server:
        yield server


def test_fhir_transaction_is_valid_and_complete(
    tmp_path: Path, fhir_server: HttpStub, result_item: OutgoingItem
) -> None:
    destination = DestinationSettings(
        name="fhir", type="fhir", url=f"{fhir_server.url}/fhir", auth="bearer", token="t0ken"
    )
    results = deliver(destination, [result_item], _settings(tmp_path))
    assert results[0].ok, results[0].describe()
    assert len(fhir_server.requests) == 1
    request = fhir_server.requests[0]
    assert (request.method, request.path) == ("POST", "/fhir")
    assert request.headers["authorization"] == "Bearer t0ken"

    bundle = json.loads(request.body)
    Bundle.model_validate(bundle)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry)
        assert entry["request"]["method"] == "PUT"  # conditional update: a resend updates, never duplicates
        assert entry["request"]["url"].startswith(entry["resource"]["resourceType"] + "?identifier=urn:dicom:uid|")
    assert sorted(by_type) == ["DiagnosticReport", "Observation"]
    report = by_type["DiagnosticReport"][0]["resource"]
    assert report["status"] == "final"
    assert report["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{SR_UID}"}]
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert report["subject"] == {"type": "Patient", "identifier": {"value": "PB-TEST-0001"}}
    assert report["imagingStudy"][0]["identifier"]["value"] == f"urn:oid:{STUDY}"
    assert report["basedOn"][0]["identifier"]["value"] == "ACC0001"
    assert report["effectiveDateTime"] == "2024-01-31"
    assert report["conclusionCode"][0]["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": "72704001",
        "display": "Fracture",
    }
    assert "fracture suspected (93%)" in report["conclusion"] and DISCLAIMER in report["conclusion"]
    observations = [entry["resource"] for entry in by_type["Observation"]]
    assert len(observations) == 3  # the study, then one per analysed image
    assert {ref["reference"] for ref in report["result"]} == {entry["fullUrl"] for entry in by_type["Observation"]}
    values = [(o["valueQuantity"]["value"], o["interpretation"][0]["coding"][0]["code"]) for o in observations]
    assert values == [(93.0, "POS"), (93.0, "POS"), (7.0, "NEG")]
    assert all(o["valueQuantity"]["code"] == "%" and o["status"] == "final" for o in observations)
    image = observations[1]
    assert image["identifier"][0]["value"] == f"urn:oid:{tracking_uid(STUDY, 'fracatlas-cnn', '1.2.0', IMAGE_1)}"
    assert image["bodySite"]["coding"][0]["code"] == "85562004"
    assert IMAGE_1 in image["derivedFrom"][0]["display"]


@pytest.mark.parametrize(
    ("status", "failure"),
    [(500, Failure.TRANSIENT), (503, Failure.TRANSIENT), (429, Failure.TRANSIENT), (400, Failure.PERMANENT),
     (401, Failure.PERMANENT), (422, Failure.PERMANENT)],
)  # fmt: skip
def test_fhir_errors_are_classified(
    tmp_path: Path, fhir_server: HttpStub, result_item: OutgoingItem, status: int, failure: Failure
) -> None:
    outcome = b'{"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]}'
    fhir_server.respond = lambda request: (status, "application/fhir+json", outcome)
    destination = DestinationSettings(name="fhir", type="fhir", url=fhir_server.url)
    _assert_failed(deliver(destination, [result_item], _settings(tmp_path)), failure, f"HTTP {status}")
    assert "OperationOutcome" in (deliver(destination, [result_item], _settings(tmp_path))[0].error or "")


# -- webhook -------------------------------------------------------------------------------------------


def test_webhook_posts_the_study_result(tmp_path: Path, result_item: OutgoingItem) -> None:
    with HttpStub(lambda request: (204, "text/plain", b"")) as hook:
        destination = DestinationSettings(
            name="hook",
            type="webhook",
            url=f"{hook.url}/hooks/results",
            auth="basic",
            username="bridge",
            password="pa:ss",
        )
        results = deliver(destination, [result_item], _settings(tmp_path))
        assert results[0].ok, results[0].describe()
        request = hook.requests[0]
        assert (request.method, request.path) == ("POST", "/hooks/results")
        assert request.headers["content-type"] == "application/json"
        assert request.headers[EVENT_HEADER.lower()] == "study-result"
        assert request.headers["authorization"] == "Basic " + base64.b64encode(b"bridge:pa:ss").decode()
        assert StudyResult.from_json(request.body) == _study_result_from(result_item)

        for status, failure in ((503, Failure.TRANSIENT), (404, Failure.PERMANENT), (403, Failure.PERMANENT)):
            hook.respond = lambda request, status=status: (status, "text/plain", b"nope")
            _assert_failed(deliver(destination, [result_item], _settings(tmp_path)), failure, f"HTTP {status}")

    # The server is gone: nothing listens on the port any more.
    _assert_failed(deliver(destination, [result_item], _settings(tmp_path)), Failure.TRANSIENT, "cannot connect")


def _study_result_from(item: OutgoingItem) -> StudyResult:
    return StudyResult.from_json(item.path.read_bytes())


def test_broken_result_document_is_permanent(tmp_path: Path, result_item: OutgoingItem) -> None:
    result_item.path.write_text('{"schema": "something-else/9"}', encoding="utf-8")
    with HttpStub() as hook:
        destination = DestinationSettings(name="hook", type="webhook", url=hook.url)
        _assert_failed(deliver(destination, [result_item], _settings(tmp_path)), Failure.PERMANENT, "schema")
        assert hook.requests == []
