"""Destination settings by type, routing, object kinds, secrets in --show, and how failures are classified."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacs_bridge.config import DestinationSettings, Settings, load_settings, routes
from pacs_bridge.errors import ConfigError
from pacs_bridge.report.study_result import ImageFinding, StudyResult, build_study_result
from pacs_bridge.send.dimse import Failure, SendResult, dimse_failure
from pacs_bridge.send.fhir import build_bundle
from pacs_bridge.send.hl7 import build_oru, parse_ack
from pacs_bridge.send.http import http_failure
from pacs_bridge.send.stow import parse_stow_response
from pacs_bridge.send.transport import accepts


def _load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "site.toml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ={})


def test_existing_dicom_destinations_stay_valid(tmp_path: Path) -> None:
    settings = _load(
        tmp_path, '[[destinations]]\nname = "pacs"\nae_title = "MAINPACS"\nhost = "10.0.0.5"\nport = 104\n'
    )
    pacs = settings.destinations[0]
    assert pacs.type == "dicom"
    assert pacs.objects == ["sr", "capture", "gsps", "summary"]
    assert (pacs.from_aets, pacs.return_to_sender, pacs.verify_tls) == ([], False, True)
    assert pacs.address == "MAINPACS@10.0.0.5:104"


def test_every_type_from_toml(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        """
[[destinations]]
name = "web"
type = "dicomweb"
url = "https://pacs.example.org/dicom-web/"
auth = "basic"
username = "bridge"
password = "hunter2"
objects = ["sr"]
[[destinations]]
name = "ris"
type = "hl7"
host = "ris.example.org"
port = 2575
receiving_application = "RIS"
from_aets = ["MAINPACS", " CR1 "]
[[destinations]]
name = "ehr"
type = "fhir"
url = "https://fhir.example.org/r4"
auth = "bearer"
token = "abc.def"
[[destinations]]
name = "hook"
type = "webhook"
url = "http://user:pw@hooks.example.org/results"
""",
    )
    web, ris, ehr, hook = settings.destinations
    assert (web.url, web.objects) == ("https://pacs.example.org/dicom-web", ["sr"])
    assert (ris.objects, ris.from_aets, ris.address) == (["result"], ["MAINPACS", "CR1"], "ris.example.org:2575")
    assert ehr.objects == hook.objects == ["result"]
    assert hook.address == "http://***@hooks.example.org/results"

    shown = settings.to_toml_dict()["destinations"]
    assert shown[0]["password"] == "********" and shown[0]["username"] == "bridge"
    assert shown[2]["token"] == "********"
    assert shown[3]["url"] == "http://***@hooks.example.org/results"
    assert "hunter2" not in str(shown) and "abc.def" not in str(shown) and "pw@" not in str(shown)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name = "x"\nhost = "h"\nport = 104\n', "destinations.0.ae_title: Value error, required for a dicom"),
        ('name = "x"\ntype = "hl7"\nhost = "h"\n', "destinations.0.port: Value error, required for a hl7"),
        ('name = "x"\ntype = "fhir"\n', "destinations.0.url: Value error, required for a fhir"),
        ('name = "x"\ntype = "webhook"\nurl = "ftp://h/x"\n', "is not an http:// or https:// URL"),
        ('name = "x"\ntype = "smtp"\n', "destinations.0.type"),
        ('name = "x"\ntype = "webhook"\nurl = "http://h"\nobjects = ["sr"]\n', "takes result, not sr"),
        ('name = "x"\nae_title = "A"\nhost = "h"\nport = 1\nobjects = ["result"]\n', "not result"),
        ('name = "x"\ntype = "fhir"\nurl = "http://h"\nauth = "bearer"\n', "needs token"),
        ('name = "x"\ntype = "fhir"\nurl = "http://h"\nauth = "basic"\n', "needs username"),
        ('name = "x"\ntype = "fhir"\nurl = "http://h"\nreturn_to_sender = true\n', "return_to_sender needs ae_title"),
        ('name = "x"\ntype = "hl7"\nhost = "h"\nport = 1\nfrom_aets = ["A\\\\B"]\n', "destinations.0.from_aets"),
    ],
)
def test_invalid_destinations_say_what_is_wrong(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "[[destinations]]\n" + text)
    assert expected in str(info.value)


def test_routes_by_calling_ae_title() -> None:
    everyone = DestinationSettings(name="all", ae_title="PACS", host="h", port=104)
    assert routes(everyone, "MAINPACS") and routes(everyone, None)

    listed = everyone.model_copy(update={"from_aets": ["MAINPACS", "CR1"]})
    assert routes(listed, "MAINPACS") and routes(listed, "CR1 ")
    assert not routes(listed, "mainpacs") and not routes(listed, "OTHER") and not routes(listed, None)

    sender = DestinationSettings(name="back", ae_title="MAINPACS", host="h", port=104, return_to_sender=True)
    assert routes(sender, "MAINPACS") and not routes(sender, "CR1") and not routes(sender, None)

    ris = DestinationSettings(
        name="ris", type="hl7", host="h", port=2575, ae_title="MAINPACS", return_to_sender=True, from_aets=["CR1"]
    )
    assert not routes(ris, "MAINPACS") and not routes(ris, "CR1")  # both conditions hold at once


def test_accepts_by_kind() -> None:
    pacs = DestinationSettings(name="pacs", ae_title="PACS", host="h", port=104, objects=["sr"])
    assert accepts(pacs, "sr") and not accepts(pacs, "capture") and not accepts(pacs, "result")
    ris = DestinationSettings(name="ris", type="hl7", host="h", port=2575)
    assert accepts(ris, "result") and not accepts(ris, "sr")


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (0xA700, Failure.TRANSIENT),
        (0xA7FF, Failure.TRANSIENT),
        (0xA900, Failure.PERMANENT),
        (0xC000, Failure.PERMANENT),
        (0xC211, Failure.PERMANENT),
        (0x0122, Failure.PERMANENT),
        (0x0110, Failure.TRANSIENT),
        (0x0213, Failure.TRANSIENT),
    ],
)
def test_dimse_statuses_are_classified(status: int, failure: Failure) -> None:
    assert dimse_failure(status) is failure


@pytest.mark.parametrize(
    ("status", "failure"),
    [(500, Failure.TRANSIENT), (502, Failure.TRANSIENT), (408, Failure.TRANSIENT), (429, Failure.TRANSIENT)]
    + [(code, Failure.PERMANENT) for code in (301, 400, 401, 403, 404, 409, 413, 415, 422)],
)
def test_http_statuses_are_classified(status: int, failure: Failure) -> None:
    assert http_failure(status) is failure


def test_send_result_failure_defaults() -> None:
    ok = SendResult(Path("a"), "1.2", True, status=0, failure=Failure.PERMANENT)
    assert ok.failure is None and not ok.permanent
    unclassified = SendResult(Path("a"), "1.2", False, error="lost")
    assert unclassified.failure is Failure.TRANSIENT and not unclassified.permanent


def test_stow_response_is_read_per_instance() -> None:
    body = {
        "00081199": {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": ["1.2.1"]}},
                {"00081155": {"vr": "UI", "Value": ["1.2.2"]}, "00081196": {"vr": "US", "Value": [0xB000]}},
            ],
        },
        "00081198": {
            "vr": "SQ",
            "Value": [
                {"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [0xA900]}},
                {"00081155": {"vr": "UI", "Value": ["1.2.4"]}},
            ],
        },
    }
    stored, failed = parse_stow_response(body)
    assert stored == {"1.2.1": 0, "1.2.2": 0xB000}
    assert failed == {"1.2.3": 0xA900, "1.2.4": 0xC000}
    assert parse_stow_response(None) == ({}, {})
    assert parse_stow_response([body]) == (stored, failed)


@pytest.mark.parametrize(
    ("ack", "ok", "failure"),
    [
        ("MSA|AA|ID1", True, None),
        ("MSA|CA|ID1", True, None),
        ("MSA|AE|ID1|busy", False, Failure.TRANSIENT),
        ("MSA|AR|ID1|unknown patient", False, Failure.PERMANENT),
        ("MSA|AA|OTHER", False, Failure.TRANSIENT),
        ("PID|1", False, Failure.TRANSIENT),
    ],
)
def test_hl7_acks_are_read(ack: str, ok: bool, failure: Failure | None) -> None:
    message = f"MSH|^~\\&|RIS||PB||20240101||ACK^R01^ACK|A1|P|2.5.1\r{ack}\r".encode()
    result = parse_ack(message, "ID1")
    assert (result.ok, result.failure) == (ok, failure)


def _study(revision: int = 1) -> StudyResult:
    return build_study_result(
        study_instance_uid="1.2.3",
        model_name="m",
        model_version="1",
        threshold=0.5,
        findings=[ImageFinding("1.2.3.1", "1.2.3.2", 0.2, False)],
        patient_id="P|1^x",
        patient_name="O'Brien^Mary^Ann^Dr^Jr=ideographic",
        revision=revision,
    )


def test_hl7_escapes_and_maps_person_names() -> None:
    destination = DestinationSettings(name="ris", type="hl7", host="h", port=1, result_status="preliminary")
    text = build_oru(_study(), destination, "AI result, not a diagnosis", control_id="C1").to_er7()
    pid = next(segment for segment in text.split("\r") if segment.startswith("PID"))
    assert pid.split("|")[3] == "P\\F\\1\\S\\x"
    assert pid.split("|")[5] == "O'Brien^Mary^Ann^Jr^Dr"  # XPN: family, given, middle, suffix, prefix
    obr = next(segment for segment in text.split("\r") if segment.startswith("OBR"))
    assert obr.split("|")[25] == "P"


def test_fhir_status_follows_settings_and_revision() -> None:
    destination = DestinationSettings(name="ehr", type="fhir", url="http://h", result_status="preliminary")
    first = build_bundle(_study(), destination, "AI")
    assert {entry.resource.status for entry in first.entry or []} == {"preliminary"}
    revised = build_bundle(_study(revision=2), destination, "AI")
    assert {entry.resource.status for entry in revised.entry or []} == {"corrected"}
    report = (revised.entry or [])[-1].resource
    assert report.conclusionCode is None and "no fracture detected" in report.conclusion
