"""Fixtures of the web console tests: a real app on a real SQLite file, the tiny model, a logged-in client."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from pacs_bridge.config import Settings, load_settings
from pacs_bridge.health import Health
from pacs_bridge.inference.analyse import Analyser
from pacs_bridge.inference.model import load_model
from pacs_bridge.receive.ingest import Ingestor
from pacs_bridge.store.db import Database, open_database
from pacs_bridge.store.spool import Spool
from pacs_bridge.web.app import create_app
from pacs_bridge.web.auth import hash_password, hash_token
from tests.support.tiny_model import build_tiny_model

PASSWORD = "correct horse battery"
TOKEN = "test-token-0123456789abcdef0123456789"


@dataclass
class WebRig:
    """An app with its parts, and helpers to call it."""

    settings: Settings
    db: Database
    health: Health
    ingestor: Ingestor
    analyser: Analyser
    app: Any

    def client(self) -> TestClient:
        """A fresh browser-like client (no cookies)."""
        return TestClient(self.app, base_url="http://127.0.0.1")


@pytest.fixture(scope="session")
def tiny_analyser(tmp_path_factory: pytest.TempPathFactory) -> Analyser:
    """The tiny contract-conforming model, loaded once."""
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-web-model"))
    return Analyser(load_model(folder, providers="cpu", intra_op_threads=1), batch_size=2)


def make_settings(tmp_path: Path, **web: Any) -> Settings:
    """Settings with one user and one API token, data in ``tmp_path``."""
    overrides: dict[str, Any] = {
        "storage": {"data_dir": str(tmp_path / "data"), "min_free_mb": 1},
        "web": {
            "users": [{"name": "alice", "password_hash": hash_password(PASSWORD)}],
            "api_tokens": [hash_token(TOKEN)],
            **web,
        },
        "destinations": [
            {"name": "main-pacs", "ae_title": "MAINPACS", "host": "127.0.0.1", "port": 1, "objects": ["sr", "capture"]}
        ],
        "send": {"retry_for_hours": 1e-6, "timeout": 2},
        "queue": {"poll_seconds": 0.1},
    }
    return load_settings(environ={}, overrides=overrides)


@pytest.fixture
def make_rig(tmp_path: Path, tiny_analyser: Analyser) -> Iterator[Callable[..., WebRig]]:
    """``make_rig(**web_settings, **create_app_kwargs)``: an app on a fresh SQLite file."""
    databases: list[Database] = []

    def make(app_kwargs: dict[str, Any] | None = None, **web: Any) -> WebRig:
        settings = make_settings(tmp_path, **web)
        db = open_database(settings.storage.resolved_database_url())
        databases.append(db)
        spool = Spool(settings.storage.data_dir, min_free_mb=1, fsync=False)
        ingestor = Ingestor(spool, db, max_instance_bytes=64 * 1024 * 1024)
        health = Health("test-node")
        health.register("analyse")
        health.beat("analyse")
        app = create_app(settings, db, health, ingestor, lambda: tiny_analyser, **(app_kwargs or {}))
        return WebRig(settings, db, health, ingestor, tiny_analyser, app)

    yield make
    for db in databases:
        db.dispose()


@pytest.fixture
def rig(make_rig: Callable[..., WebRig]) -> WebRig:
    """The default app: one user (alice), one token, one destination."""
    return make_rig()


def login(client: TestClient, user: str = "alice", password: str = PASSWORD, next_path: str = "/studies") -> Any:
    """Post the login form as a browser would (with the login CSRF token); the response."""
    page = client.get("/login")
    token = re.search(r'name="login_csrf" value="([^"]+)"', page.text)
    assert token is not None
    return client.post(
        "/login",
        data={"username": user, "password": password, "login_csrf": token.group(1), "next": next_path},
        follow_redirects=False,
    )


def csrf_of(client: TestClient) -> str:
    """The CSRF token of the client's session, as the pages carry it."""
    match = re.search(r'name="csrf-token" content="([^"]*)"', client.get("/studies").text)
    assert match is not None and match.group(1)
    return match.group(1)


@pytest.fixture
def user(rig: WebRig) -> tuple[TestClient, str]:
    """A client logged in as alice, and its CSRF token."""
    client = rig.client()
    assert login(client).status_code == 303
    return client, csrf_of(client)


def stored_radiograph(
    image: str = "images/Fractured/IMG0000019.jpg", study_uid: str | None = None, **kwargs: Any
) -> tuple[Any, bytes]:
    """A DX instance made from a FracAtlas picture, and its PS3.10 bytes."""
    import io

    from pydicom.uid import generate_uid

    from tests.support.dicom_files import make_radiograph
    from tests.support.paths import FRACATLAS

    ds = make_radiograph(FRACATLAS / image, study_uid or generate_uid(), **kwargs)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ds, buffer.getvalue()


def seed_study(rig: WebRig, images: tuple[str, ...] = ("images/Fractured/IMG0000019.jpg",), **kwargs: Any) -> str:
    """Receive a study through the ingest path and run it through settle, analyse, publish and one delivery try.

    The destination does not answer, and ``[send] retry_for_hours`` is tiny, so each delivery ends dead.
    """
    from pydicom.uid import generate_uid

    from pacs_bridge.pipeline import actions
    from pacs_bridge.pipeline.analysis import AnalyseStage
    from pacs_bridge.pipeline.publishing import PublishStage
    from pacs_bridge.pipeline.runner import StageRunner
    from pacs_bridge.send.deliver import DeliverStage

    study_uid = generate_uid()
    series_uid = generate_uid()
    for number, image in enumerate(images, start=1):
        ds, data = stored_radiograph(image, study_uid, series_uid=series_uid, instance_number=number, **kwargs)
        outcome = rig.ingestor.ingest(
            ds,
            (data,),
            size=len(data),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            calling_aet="MODALITY",
            source="dicom",
        )
        assert outcome.ok, outcome.message
    assert actions.force_settle(rig.db, rig.settings, study_uid)
    for stage in (AnalyseStage(rig.settings, rig.db, rig.analyser), PublishStage(rig.settings, rig.db)):
        runner = StageRunner(stage, rig.db, rig.health, owner="test", lease_seconds=60, poll_seconds=0.1)
        assert runner.run_once(), f"no {stage.role} job"
    sender = StageRunner(
        DeliverStage(rig.settings, rig.db), rig.db, rig.health, owner="test", lease_seconds=60, poll_seconds=0.1
    )
    while sender.run_once():
        pass
    return study_uid
