"""The HTTP API and pages against a real app, a real SQLite file, the real ingest path and the tiny model."""

from __future__ import annotations

import io
import re

import cv2
import numpy as np
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacs_bridge.store.models import Job, JobKind, JobState, Study, StudyState
from tests.support.paths import FRACATLAS
from tests.web.conftest import TOKEN, WebRig, seed_study, stored_radiograph

JPEG = FRACATLAS / "images/Fractured/IMG0000019.jpg"


def _png(client: TestClient, url: str) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image


def test_study_list_detail_pictures_and_filters(rig: WebRig, user: tuple[TestClient, str]) -> None:
    client, _csrf = user
    first = seed_study(rig, patient_name="Doe^Jane", patient_id="PID-777")
    second = seed_study(rig, ("images/Non_fractured/IMG0000001.jpg", "images/Fractured/IMG0000025.jpg"))

    listing = client.get("/api/studies").json()
    assert listing["total"] == 2
    assert [s["study_instance_uid"] for s in listing["studies"]] == [second, first]  # newest first
    paged = client.get("/api/studies", params={"per_page": 1, "page": 2}).json()
    assert paged["pages"] == 2 and [s["study_instance_uid"] for s in paged["studies"]] == [first]
    assert client.get("/api/studies", params={"state": "queued"}).json()["total"] == 0
    failed = client.get("/api/studies", params={"state": "failed"}).json()  # deliveries died
    assert failed["total"] == 2
    with rig.db.sessions() as session:
        fractures = session.scalars(select(Study.study_instance_uid).where(Study.fracture.is_(True))).all()
    assert client.get("/api/studies", params={"finding": "fracture"}).json()["total"] == len(fractures)
    today = listing["studies"][0]["received_at"][:10]
    assert client.get("/api/studies", params={"from": today, "to": today}).json()["total"] == 2
    assert client.get("/api/studies", params={"to": "2000-01-01"}).json()["total"] == 0
    assert client.get("/api/studies", params={"state": "lost"}).status_code == 422
    assert client.get("/api/studies", params={"from": "yesterday"}).status_code == 422

    detail = client.get(f"/api/studies/{second}").json()
    assert detail["instances"] == 2 and len(detail["instances_detail"]) == 2
    for instance in detail["instances_detail"]:
        result = instance["result"]
        assert 0 <= result["probability"] <= 1
        assert result["fracture"] == (result["probability"] >= result["threshold"])
        assert result["has_heatmap"]
        base = f"/studies/{second}/instances/{instance['sop_instance_uid']}"
        picture = _png(client, f"{base}/image.png")
        heatmap = _png(client, f"{base}/heatmap.png")
        assert heatmap.shape[:2] == picture.shape[:2] and heatmap.shape[2] == 4  # RGBA over the picture
        assert heatmap[..., 3].max() > 0  # somewhere the model looked
    assert {d["kind"] for d in detail["deliveries"]} >= {"sr", "capture"}
    assert all(d["state"] == "dead" and d["destination"] == "main-pacs" for d in detail["deliveries"])
    assert any(j["kind"] == "deliver" and j["state"] == "dead" and j["last_error"] for j in detail["jobs"])

    page = client.get(f"/studies/{first}")
    assert page.status_code == 200
    assert "Doe Jane" in page.text and "PID-777" in page.text  # the console shows who it is ...
    listing_page = client.get("/studies").text
    for href in re.findall(r'href="([^"]+)"', listing_page):
        assert "PID-777" not in href and "Doe" not in href  # ... but never in a URL
    assert f'href="/studies/{first}"' in listing_page
    assert client.get("/studies?finding=fracture").status_code == 200


def test_unknown_study_and_instance_are_404(user: tuple[TestClient, str]) -> None:
    client, csrf = user
    unknown = generate_uid()
    assert client.get(f"/api/studies/{unknown}").status_code == 404
    assert client.get("/api/studies/not-a-uid").status_code == 404
    assert client.get(f"/studies/{unknown}").status_code == 404
    assert client.get(f"/studies/{unknown}/instances/{generate_uid()}/image.png").status_code == 404
    for action in ("reanalyse", "resend", "force-settle"):
        assert client.post(f"/api/studies/{unknown}/{action}", headers={"X-CSRF-Token": csrf}).status_code == 404


def test_actions_reanalyse_resend_settle_and_retry(rig: WebRig, user: tuple[TestClient, str]) -> None:
    client, csrf = user
    study_uid = seed_study(rig)
    other = seed_study(rig)
    headers = {"X-CSRF-Token": csrf}

    resent = client.post(f"/api/studies/{study_uid}/resend", headers=headers)
    assert resent.status_code == 200 and resent.json()["deliveries_queued"] == 2
    states = {d["state"] for d in client.get(f"/api/studies/{study_uid}").json()["deliveries"]}
    assert states == {"pending"}

    assert client.post(f"/api/studies/{study_uid}/force-settle", headers=headers).status_code == 409
    assert client.post(f"/api/studies/{study_uid}/reanalyse", headers=headers).json()["queued"]
    with rig.db.sessions() as session:
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert study is not None and study.state == StudyState.QUEUED
        assert session.scalar(
            select(Job).where(Job.study_id == study.id, Job.kind == JobKind.ANALYSE, Job.state == JobState.PENDING)
        )

    # A receiving study can be settled at once.
    ds, data = stored_radiograph()
    assert rig.ingestor.ingest(
        ds,
        (data,),
        size=len(data),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        calling_aet=None,
        source="dicom",
    ).ok
    settled = client.post(f"/api/studies/{ds.StudyInstanceUID}/force-settle", headers=headers)
    assert settled.status_code == 200
    assert client.get(f"/api/studies/{ds.StudyInstanceUID}").json()["state"] == "queued"

    # Failures list the dead deliveries of another study; retry queues them again.
    dead = [j for j in client.get("/api/failures").json()["jobs"] if j["study_instance_uid"] == other]
    assert len(dead) == 2 and all(j["kind"] == "deliver" and j["last_error"] for j in dead)
    assert client.post(f"/api/jobs/{dead[0]['id']}/retry", headers=headers).status_code == 200
    assert client.post(f"/api/jobs/{dead[0]['id']}/retry", headers=headers).status_code == 200  # still dead: new job
    assert client.post("/api/jobs/999999/retry", headers=headers).status_code == 409
    queue = client.get("/api/queue").json()
    assert queue["deliver"]["pending"] >= 1 and queue["analyse"]["pending"] >= 1

    # The same actions as forms on the pages (CSRF in the form), answered with a redirect and a message.
    page = client.post(f"/studies/{other}/resend", data={"csrf": csrf}, follow_redirects=True)
    assert page.status_code == 200 and "queued for delivery again" in page.text
    failures = client.get("/failures").text
    assert "no association with MAINPACS" in failures


def test_upload_png_jpeg_dicom_report_and_store(rig: WebRig, user: tuple[TestClient, str]) -> None:
    client, csrf = user
    jpeg = JPEG.read_bytes()
    gray = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    png = cv2.imencode(".png", gray)[1].tobytes()
    ds, dicom = stored_radiograph(patient_name="Upload^Only")
    files = [
        ("files", ("hand.jpg", jpeg, "image/jpeg")),
        ("files", ("hand.png", png, "image/png")),
        ("files", ("hand.dcm", dicom, "application/dicom")),
    ]
    response = client.post("/api/uploads", files=files, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["kind"] for r in results] == ["jpeg", "png", "dicom"]
    for result in results:
        assert 0 <= result["probability"] <= 1 and result["body_part"] in {"hand", "leg", "hip", "shoulder"}
        assert result["model"]["name"] == "tiny-test" and result["has_heatmap"]
        assert (result["width"], result["height"]) == (gray.shape[1], gray.shape[0])
    assert abs(results[0]["probability"] - results[1]["probability"]) < 1e-6  # same pixels, same answer
    # Nothing was stored by analysing.
    assert client.get("/api/studies").json()["total"] == 0

    upload_id = results[0]["id"]
    report = client.get(f"/api/uploads/{upload_id}/report.pdf")
    assert report.status_code == 200 and report.headers["content-type"] == "application/pdf"
    assert report.content.startswith(b"%PDF")
    for text in (b"AI result, not a diagnosis", b"tiny-test", b"threshold 0.500", b"Body region"):
        assert text in report.content
    assert _png(client, f"/api/uploads/{upload_id}/heatmap.png").shape[2] == 4
    # Another user's client cannot see it.
    assert (
        TestClient(rig.app).get(f"/api/uploads/{upload_id}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code
        == 404
    )

    assert client.post(f"/api/uploads/{upload_id}/store", headers={"X-CSRF-Token": csrf}).status_code == 409  # JPEG
    stored = client.post(f"/api/uploads/{results[2]['id']}/store", headers={"X-CSRF-Token": csrf})
    assert stored.status_code == 200 and stored.json()["study_instance_uid"] == ds.StudyInstanceUID
    study = client.get(f"/api/studies/{ds.StudyInstanceUID}").json()
    assert study["source"] == "web" and study["instances"] == 1 and study["state"] == "receiving"


def test_bad_uploads_say_why_and_store_nothing(rig: WebRig, user: tuple[TestClient, str]) -> None:
    client, csrf = user
    headers = {"X-CSRF-Token": csrf}
    no_pixels, _ = stored_radiograph()
    del no_pixels.PixelData
    buffer = io.BytesIO()
    no_pixels.save_as(buffer, enforce_file_format=True)
    files = [
        ("files", ("notes.txt", b"this is not an image", "text/plain")),
        ("files", ("sr.dcm", buffer.getvalue(), "application/dicom")),
        ("files", ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "image/png")),
    ]
    results = client.post("/api/uploads", files=files, headers=headers).json()["results"]
    assert "not a DICOM (PS3.10), PNG or JPEG file" in results[0]["error"]
    assert "no pixel data" in results[1]["error"]
    assert "not a readable PNG or JPEG" in results[2]["error"]
    assert client.post("/api/uploads", files=[], headers=headers).status_code in (400, 422)

    small = make_small_limit(rig)
    big = small.client()
    from tests.web.conftest import csrf_of, login

    assert login(big).status_code == 303
    huge = client_post_huge(big, csrf_of(big))
    assert huge.status_code == 413 and "max_upload_mb" in huge.json()["detail"]
    assert client.get("/api/studies").json()["total"] == 0
    assert client.get("/healthz").status_code == 200  # the service is unaffected


def make_small_limit(rig: WebRig) -> WebRig:
    """The same database behind an app that takes at most 1 MiB per request."""
    from pacs_bridge.web.app import create_app

    settings = rig.settings.model_copy(deep=True)
    settings.web.max_upload_mb = 1
    app = create_app(settings, rig.db, rig.health, rig.ingestor, lambda: rig.analyser)
    return WebRig(settings, rig.db, rig.health, rig.ingestor, rig.analyser, app)


def client_post_huge(client: TestClient, csrf: str):  # type: ignore[no-untyped-def]
    return client.post(
        "/api/uploads",
        files=[("files", ("big.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * (2 * 1024 * 1024), "image/png"))],
        headers={"X-CSRF-Token": csrf},
    )


def test_model_page_and_figures(rig: WebRig, user: tuple[TestClient, str]) -> None:
    client, _ = user
    card = client.get("/api/model").json()
    assert card["loaded"] is True
    bundled = make_bundled(rig)
    bundled_client = bundled.client()
    from tests.web.conftest import login

    assert login(bundled_client).status_code == 303
    card = bundled_client.get("/api/model").json()
    assert card["manifest"]["name"] == "fracatlas-cnn"
    assert card["metrics"]["test"]["confusion_matrix"]["tp"] > 0
    assert "roc.png" in card["figures"] and "confusion.png" in card["figures"]
    page = bundled_client.get("/model").text
    assert "ROC AUC" in page and "Per body region" in page and 'src="/model/figures/roc.png"' in page
    assert bundled_client.get("/model/figures/roc.png").headers["content-type"] == "image/png"
    assert bundled_client.get("/model/figures/model.json").status_code == 404
    assert bundled_client.get("/model/figures/../../pyproject.toml").status_code == 404


def make_bundled(rig: WebRig) -> WebRig:
    """An app whose [analysis] model_dir is the bundled model folder (only its card is read)."""
    from pacs_bridge.inference.model import default_model_dir
    from pacs_bridge.web.app import create_app

    settings = rig.settings.model_copy(deep=True)
    settings.analysis.model_dir = default_model_dir()
    app = create_app(settings, rig.db, rig.health, rig.ingestor, lambda: rig.analyser)
    return WebRig(settings, rig.db, rig.health, rig.ingestor, rig.analyser, app)


def test_openapi_and_metrics_need_auth_and_describe_the_api(rig: WebRig, user: tuple[TestClient, str]) -> None:
    anonymous = rig.client()
    assert anonymous.get("/openapi.json").status_code == 401
    assert anonymous.get("/metrics").status_code == 401
    assert anonymous.get("/api/studies").status_code == 401
    assert anonymous.get("/studies", follow_redirects=False).headers["location"] == "/login?next=/studies"
    client, _ = user
    document = client.get("/openapi.json").json()
    for path in (
        "/api/studies",
        "/api/studies/{study_uid}",
        "/api/studies/{study_uid}/resend",
        "/api/uploads",
        "/dicomweb/studies",
        "/healthz",
        "/metrics",
    ):
        assert path in document["paths"], path
    assert "/login" not in document["paths"]
