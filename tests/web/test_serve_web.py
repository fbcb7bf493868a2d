"""The console inside a running ``pacs-bridge serve``: STOW-RS with a DICOMweb client, metrics, health, first login."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
from requests.exceptions import HTTPError

from pacs_bridge.web.auth import hash_password, hash_token
from tests.support.hostile import deflate_bomb
from tests.support.serve import ServeProcess, free_port
from tests.support.tiny_model import build_tiny_model
from tests.web.conftest import PASSWORD, TOKEN, stored_radiograph

BEARER = {"Authorization": f"Bearer {TOKEN}"}
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
REFERENCED_SOP_INSTANCE_UID = "00081155"


def web_config(tmp_path: Path, **web: Any) -> dict[str, Any]:
    """A serve configuration with the console on a free port and the tiny model."""
    model = build_tiny_model(tmp_path / "model")
    return {
        "analysis": {"enabled": True, "model_dir": str(model), "intra_op_threads": 1},
        "web": {
            "enabled": True,
            "port": free_port(),
            "users": [{"name": "alice", "password_hash": hash_password(PASSWORD)}],
            "api_tokens": [hash_token(TOKEN)],
            **web,
        },
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp_path = tmp_path_factory.mktemp("serve-web")
    with ServeProcess(tmp_path / "srv", web_config(tmp_path)) as srv:
        yield srv


def base_url(server: ServeProcess) -> str:
    return f"http://127.0.0.1:{server.config['web']['port']}"


def wait_for(server: ServeProcess, study_uid: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    study: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(f"{base_url(server)}/api/studies/{study_uid}", headers=BEARER)
        if response.status_code == 200:
            study = response.json()
            if study["state"] in states:
                return study
        time.sleep(0.3)
    raise TimeoutError(f"{study_uid} not in {states}: {study}\n{server.log()[-3000:]}")


def multipart(parts: list[tuple[str | None, bytes]], boundary: str = "pb-test-boundary") -> bytes:
    body = b""
    for content_type, data in parts:
        body += f"--{boundary}\r\n".encode()
        if content_type is not None:
            body += f"Content-Type: {content_type}\r\n".encode()
        body += b"\r\n" + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def test_stow_rs_with_a_dicomweb_client_stores_through_the_ingest_path(server: ServeProcess) -> None:
    client = DICOMwebClient(f"{base_url(server)}/dicomweb", headers=BEARER)
    study_uid = generate_uid()
    first, _ = stored_radiograph("images/Fractured/IMG0000019.jpg", study_uid, instance_number=1)
    second, _ = stored_radiograph("images/Non_fractured/IMG0000001.jpg", study_uid, instance_number=2)
    response = client.store_instances([first, second])
    stored = {item.ReferencedSOPInstanceUID for item in response.ReferencedSOPSequence}
    assert stored == {first.SOPInstanceUID, second.SOPInstanceUID}
    assert "FailedSOPSequence" not in response
    # Durable: the files are in the spool under the validated UIDs, and the study is analysed like any other.
    for ds in (first, second):
        assert (server.data_dir / "spool" / study_uid / f"{ds.SOPInstanceUID}.dcm").is_file()
    study = wait_for(server, study_uid, {"done", "failed"})
    assert study["source"] == "dicomweb" and study["instances"] == 2
    assert all(i["result"] and 0 <= i["result"]["probability"] <= 1 for i in study["instances_detail"])

    # Storing into another study's URL is refused for every part: 409.
    stray, _ = stored_radiograph()
    with pytest.raises(HTTPError) as refused:
        client.store_instances([stray], study_instance_uid=study_uid)
    assert refused.value.response.status_code == 409
    body = refused.value.response.json()
    assert body[FAILED_SOP_SEQUENCE]["Value"][0][FAILURE_REASON]["Value"] == [0xC409]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_stow_rs_reports_broken_parts_and_keeps_the_good_ones(server: ServeProcess) -> None:
    good, good_bytes = stored_radiograph()
    no_uid, _ = stored_radiograph()
    no_uid.SOPInstanceUID = "1.2..3"  # empty component: not a UID (PS3.5 9.1)
    no_uid.file_meta.MediaStorageSOPInstanceUID = "1.2.3"
    buffer = io.BytesIO()
    no_uid.save_as(buffer, enforce_file_format=True)
    body = multipart(
        [
            ("application/dicom", good_bytes),
            ("application/dicom", b"not a DICOM file at all"),
            ("application/dicom+json", b"{}"),
            (None, buffer.getvalue()),  # no Content-Type: the request's type applies
        ]
    )
    headers = {**BEARER, "Content-Type": 'multipart/related; type="application/dicom"; boundary=pb-test-boundary'}
    response = httpx.post(f"{base_url(server)}/dicomweb/studies", content=body, headers=headers)
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/dicom+json"
    data = response.json()
    referenced = data[REFERENCED_SOP_SEQUENCE]["Value"]
    assert [item[REFERENCED_SOP_INSTANCE_UID]["Value"] for item in referenced] == [[good.SOPInstanceUID]]
    reasons = [item[FAILURE_REASON]["Value"][0] for item in data[FAILED_SOP_SEQUENCE]["Value"]]
    assert reasons == [0xC000, 0xC122, 0xC210]
    assert (server.data_dir / "spool" / good.StudyInstanceUID / f"{good.SOPInstanceUID}.dcm").is_file()
    assert not (server.data_dir / "spool" / no_uid.StudyInstanceUID).exists()

    all_bad = multipart([("application/dicom", b"garbage")])
    assert httpx.post(f"{base_url(server)}/dicomweb/studies", content=all_bad, headers=headers).status_code == 409
    url = f"{base_url(server)}/dicomweb/studies"
    not_multipart = httpx.post(url, content=good_bytes, headers={**BEARER, "Content-Type": "application/dicom"})
    assert not_multipart.status_code == 400
    wrong_type = {**BEARER, "Content-Type": 'multipart/related; type="application/dicom+xml"; boundary=x'}
    assert httpx.post(url, content=b"--x--", headers=wrong_type).status_code == 415
    assert httpx.post(url, content=all_bad, headers={"Content-Type": headers["Content-Type"]}).status_code == 401
    assert "Test^Patient" not in server.log() and "PB-TEST-0001" not in server.log()


def _families(server: ServeProcess) -> dict[str, Any]:
    response = httpx.get(f"{base_url(server)}/metrics", headers=BEARER)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def _sample(families: dict[str, Any], family: str, sample_name: str, **labels: str) -> float:
    for sample in families[family].samples:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return float(sample.value)
    return 0.0


def test_metrics_count_what_came_in_and_the_pipeline(server: ServeProcess) -> None:
    before = _families(server)
    ds, _ = stored_radiograph()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    bad = multipart([("application/dicom", b"garbage")])
    headers = {**BEARER, "Content-Type": 'multipart/related; type="application/dicom"; boundary=pb-test-boundary'}
    httpx.post(f"{base_url(server)}/dicomweb/studies", content=bad, headers=headers)
    wait_for(server, ds.StudyInstanceUID, {"done", "failed"})

    after = _families(server)
    received = "pacs_bridge_instances_received"
    assert _sample(after, received, f"{received}_total", source="dicom") == (
        _sample(before, received, f"{received}_total", source="dicom") + 1
    )
    assert _sample(after, "pacs_bridge_studies", "pacs_bridge_studies", state="done") >= 1
    assert _sample(after, "pacs_bridge_studies_analysed", "pacs_bridge_studies_analysed") >= 1
    assert _sample(after, "pacs_bridge_analysis_seconds", "pacs_bridge_analysis_seconds_count") >= 1
    queue = {(s.labels["kind"], s.labels["state"]) for s in after["pacs_bridge_queue_jobs"].samples}
    assert queue == {
        (k, s) for k in ("settle", "analyse", "publish", "deliver") for s in ("pending", "running", "dead")
    }
    oldest = {s.labels["kind"] for s in after["pacs_bridge_queue_oldest_pending_seconds"].samples}
    assert oldest == {"settle", "analyse", "publish", "deliver"}
    assert {"pacs_bridge_queue_jobs", "pacs_bridge_deliveries_failed", "pacs_bridge_positive_studies"} <= set(after)
    assert _sample(after, "pacs_bridge_healthy", "pacs_bridge_healthy") == 1
    assert _sample(after, "pacs_bridge_model_info", "pacs_bridge_model_info", name="tiny-test") == 1
    assert httpx.get(f"{base_url(server)}/metrics").status_code == 401


def test_healthz_is_green_with_every_role_alive(server: ServeProcess) -> None:
    response = httpx.get(f"{base_url(server)}/healthz")
    assert response.status_code == 200 and response.json()["ok"] is True
    assert "detail" not in json.dumps(response.json())  # anonymous callers get verdicts only
    detailed = httpx.get(f"{base_url(server)}/healthz", headers=BEARER).json()["checks"]
    assert detailed["model"]["ok"] and "tiny-test" in detailed["model"]["detail"]
    assert set(detailed["roles"]["detail"]) >= {"receive", "settle", "analyse", "publish", "send", "web"}


def test_healthz_is_red_when_the_model_cannot_be_loaded(tmp_path: Path) -> None:
    config = web_config(tmp_path)
    model = Path(config["analysis"]["model_dir"])
    corrupt = b"\x08\x07this is no ONNX graph" * 50
    (model / "model.onnx").write_bytes(corrupt)  # a broken export whose manifest matches its bytes
    manifest = json.loads((model / "model.json").read_text())
    manifest["sha256"] = hashlib.sha256(corrupt).hexdigest()
    (model / "model.json").write_text(json.dumps(manifest))
    with ServeProcess(tmp_path / "srv", config) as srv:
        response = httpx.get(f"{base_url(srv)}/healthz", headers=BEARER)
        assert response.status_code == 503
        checks = response.json()["checks"]
        assert checks["model"]["ok"] is False
        assert checks["roles"]["detail"]["analyse"]["status"] == "dead"
        assert checks["database"]["ok"] and checks["disk"]["ok"]


def test_healthz_turns_red_when_the_analysis_stage_dies_while_running(tmp_path: Path) -> None:
    """Green at start; the analysis thread ends on its first job (a stage that cannot go on): 503, C-ECHO still up."""
    env = {"PACS_BRIDGE_FAILPOINTS": "analyse.before-commit=exit"}
    with ServeProcess(tmp_path / "srv", web_config(tmp_path), env=env) as srv:
        assert httpx.get(f"{base_url(srv)}/healthz").status_code == 200
        ds, _ = stored_radiograph()
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
        ae.add_requested_context("1.2.840.10008.1.1")  # Verification
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="PACS_BRIDGE")
        assert assoc.is_established and int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        deadline = time.monotonic() + 60
        while httpx.get(f"{base_url(srv)}/healthz").status_code == 200:
            assert time.monotonic() < deadline, srv.log()[-3000:]
            time.sleep(0.3)
        response = httpx.get(f"{base_url(srv)}/healthz", headers=BEARER)
        assert response.status_code == 503
        assert response.json()["checks"]["roles"]["detail"]["analyse"]["status"] == "dead"
        assert "ERROR" in srv.log() and "failpoint analyse.before-commit" in srv.log()
        # The rest of the service stays up: it still receives and answers C-ECHO.
        assoc = ae.associate("127.0.0.1", srv.port, ae_title="PACS_BRIDGE")
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()


def test_first_login_uses_a_one_time_password_printed_once(tmp_path: Path) -> None:
    config = web_config(tmp_path, users=[], api_tokens=[])
    config["analysis"] = {"enabled": False}
    with ServeProcess(tmp_path / "srv", config) as srv:
        deadline = time.monotonic() + 10
        while "one-time password" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [line for line in srv.log().splitlines() if "one-time password" in line]
        assert len(lines) == 1 and " INFO " not in lines[0]  # printed, not logged
        password = re.search(r"one-time password (\S+)", lines[0])
        assert password is not None
        client = httpx.Client(base_url=base_url(srv))
        page = client.get("/login")
        assert "one-time password" in page.text
        token = re.search(r'name="login_csrf" value="([^"]+)"', page.text)
        assert token is not None
        form = {"username": "admin", "password": password.group(1), "login_csrf": token.group(1), "next": "/studies"}
        assert client.post("/login", data=form).status_code == 303
        assert client.get("/api/studies").status_code == 200
        assert srv.log().count(password.group(1)) == 1


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_stow_rs_and_upload_refuse_a_deflate_bomb_without_inflating_it(tmp_path: Path) -> None:
    """A deflated part that inflates past the limits is refused (0xA700 / a clear message), the good part stored.

    [dicom] max_instance_mb bounds STOW-RS parts as it bounds C-STORE; an upload may inflate to what
    [analysis] max_pixels allows.
    """

    config = web_config(tmp_path)
    config["dicom"] = {"max_instance_mb": 8}
    config["analysis"]["max_pixels"] = 4_000_000
    with ServeProcess(tmp_path / "srv", config) as server:
        _refuse_bombs(server)


def _refuse_bombs(server: ServeProcess) -> None:
    assert server.proc is not None
    before = _peak_rss_mib(server.proc.pid)
    study_uid = generate_uid()
    bomb = deflate_bomb(512 << 20, generate_uid(), study_uid, generate_uid())
    assert len(bomb) < 2 << 20  # small on the wire
    good, good_bytes = stored_radiograph(study_uid=study_uid)
    body = multipart([("application/dicom", bomb), ("application/dicom", good_bytes)])
    headers = {**BEARER, "Content-Type": 'multipart/related; type="application/dicom"; boundary=pb-test-boundary'}
    response = httpx.post(f"{base_url(server)}/dicomweb/studies", content=body, headers=headers, timeout=60)
    assert response.status_code == 202
    data = response.json()
    assert [item[FAILURE_REASON]["Value"][0] for item in data[FAILED_SOP_SEQUENCE]["Value"]] == [0xA700]
    stored = [item[REFERENCED_SOP_INSTANCE_UID]["Value"] for item in data[REFERENCED_SOP_SEQUENCE]["Value"]]
    assert stored == [[good.SOPInstanceUID]]

    upload = httpx.post(
        f"{base_url(server)}/api/uploads", files={"files": ("bomb.dcm", bomb)}, headers=BEARER, timeout=60
    )
    assert upload.status_code in (200, 400, 422), upload.text
    assert "too large once inflated" in upload.text
    # Neither path inflated the bomb: the server's peak memory grew by far less than its 512 MiB.
    assert _peak_rss_mib(server.proc.pid) - before < 150
    assert httpx.get(f"{base_url(server)}/healthz", headers=BEARER).status_code == 200
