"""A study pushed to a running ``pacs-bridge serve`` reaches the RIS: HL7 ORU^R01 over MLLP, FHIR and a webhook.

The publish stage writes the study result document beside the DICOM objects
and the deliver stage sends it, through the same job queue, to every
destination whose ``objects`` name ``result``: a real MLLP listener that
parses the message with hl7apy and ACKs it, an HTTP server that validates the
FHIR transaction with the R4B models, and a webhook receiver. A late image
makes a second revision, sent as a corrected result.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

from tests.support.dicom_files import make_radiograph
from tests.support.http_stub import HttpStub, Reply, StubRequest
from tests.support.mllp import MllpListener
from tests.support.paths import FRACATLAS
from tests.support.serve import ServeProcess
from tests.support.tiny_model import build_tiny_model

IMAGES = ("images/Fractured/IMG0000019.jpg", "images/Non_fractured/IMG0000001.jpg", "images/Fractured/IMG0000025.jpg")


def _fhir(request: StubRequest) -> Reply:
    bundle = Bundle.model_validate_json(request.body)
    assert bundle.type == "transaction"
    answer = {"resourceType": "Bundle", "type": "transaction-response", "entry": []}
    return 200, "application/fhir+json", json.dumps(answer).encode()


@pytest.fixture
def peers() -> Iterator[tuple[MllpListener, HttpStub, HttpStub]]:
    with MllpListener() as ris, HttpStub(_fhir) as fhir, HttpStub() as hook:
        yield ris, fhir, hook


def _store(port: int, datasets: list[Dataset]) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    assert [int(assoc.send_c_store(ds).Status) for ds in datasets] == [0] * len(datasets)
    assoc.release()


def _radiograph(index: int, study_uid: str, series_uid: str) -> Dataset:
    return make_radiograph(
        FRACATLAS / IMAGES[index],
        study_uid,
        series_uid=series_uid,
        instance_number=index + 1,
        accession_number="ACC-RIS-7",
        patient_id="PB-RIS-0007",
    )


def _wait(condition: Callable[[], Any], what: str, srv: ServeProcess, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen:\n{srv.log()[-4000:]}")


def _field(er7: str, segment: str, number: int) -> str:
    """Field ``number`` of the first ``segment`` of an ER7 message (fields counted as HL7 counts them)."""
    for line in er7.replace("\n", "\r").split("\r"):
        parts = line.split("|")
        if parts[0] == segment:
            return parts[number] if len(parts) > number else ""
    raise AssertionError(f"no {segment} segment in {er7!r}")


def _probabilities(db: Path, study_uid: str) -> dict[str, float]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute(
            "SELECT i.sop_instance_uid, r.probability FROM instance_results r"
            " JOIN instances i ON i.id = r.instance_id JOIN studies s ON s.id = i.study_id"
            " WHERE s.study_instance_uid = ? AND r.ok",
            (study_uid,),
        ).fetchall()
    return {str(uid): float(p) for uid, p in rows}


def test_results_reach_hl7_fhir_and_webhook_and_a_late_image_sends_a_correction(
    tmp_path: Path, peers: tuple[MllpListener, HttpStub, HttpStub]
) -> None:
    ris, fhir, hook = peers
    config = {
        "analysis": {"enabled": True, "model_dir": str(build_tiny_model(tmp_path / "model")), "intra_op_threads": 1},
        "send": {"retry_initial_seconds": 0.5, "timeout": 10},
        "destinations": [
            {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port},
            {"name": "fhir", "type": "fhir", "url": fhir.url + "/fhir"},
            {"name": "hook", "type": "webhook", "url": hook.url + "/results"},
        ],
    }
    with ServeProcess(tmp_path / "srv", config) as srv:
        study_uid, series_uid = generate_uid(), generate_uid()
        _store(srv.port, [_radiograph(0, study_uid, series_uid), _radiograph(1, study_uid, series_uid)])
        _wait(lambda: ris.messages and fhir.requests and hook.requests, "first delivery to the RIS", srv)

        # Webhook: the study result document, with the probabilities the service recorded.
        body = json.loads(hook.requests[0].body)
        stored = _probabilities(srv.data_dir / "pacs-bridge.db", study_uid)
        assert body["study_instance_uid"] == study_uid and body["revision"] == 1
        assert body["accession_number"] == "ACC-RIS-7" and body["calling_aet"] == "MODALITY"
        sent = {f["sop_instance_uid"]: f["probability"] for f in body["findings"]}
        assert sent.keys() == stored.keys() and len(sent) == 2
        assert all(abs(sent[uid] - stored[uid]) <= 0.0005 for uid in sent)
        assert body["sr"]["sop_instance_uid"]

        # HL7: ORU^R01 whose OBR names the order and the study, ACKed by the RIS.
        message = parse_message(ris.messages[0], find_groups=False)
        assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
        text = ris.messages[0]
        assert "ACC-RIS-7" in text and study_uid in text and "AI result, not a diagnosis" in text
        assert _field(text, "OBR", 25) == "F" and _field(text, "OBX", 11) == "F"

        # FHIR: one valid transaction (validated by the stub); nothing sent twice.
        time.sleep(2)
        assert len(fhir.requests) == 1 and len(hook.requests) == 1 and len(ris.messages) == 1

        # A late third image: a second revision, sent as a corrected result to each.
        _store(srv.port, [_radiograph(2, study_uid, series_uid)])
        _wait(lambda: len(hook.requests) >= 2 and len(ris.messages) >= 2, "corrected result", srv)
        revised = json.loads(hook.requests[-1].body)
        assert revised["revision"] == 2 and len(revised["findings"]) == 3
        assert revised["sr"]["sop_instance_uid"] != body["sr"]["sop_instance_uid"]
        assert _field(ris.messages[-1], "OBR", 25) == "C"
        _wait(lambda: len(fhir.requests) >= 2, "corrected FHIR result", srv)
