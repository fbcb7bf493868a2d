"""A running ``pacs-bridge serve`` analyses what it receives: findings, failures, skips, late instances."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)

from tests.support.broken_images import decoder_panic_rle
from tests.support.dicom_files import make_radiograph
from tests.support.paths import FRACATLAS
from tests.support.serve import ServeProcess
from tests.support.tiny_model import build_tiny_model

SC = "1.2.840.10008.5.1.4.1.1.7"


def _store(port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, RLELossless)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_BRIDGE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProcess]:
    model = build_tiny_model(tmp_path / "model")
    config = {"analysis": {"enabled": True, "model_dir": str(model), "intra_op_threads": 1, "batch_size": 4}}
    with ServeProcess(tmp_path / "srv", config) as srv:
        yield srv


def test_study_is_analysed_and_a_broken_image_fails_alone(server: ServeProcess) -> None:
    study_uid = generate_uid()
    series_uid = generate_uid()
    good = [
        make_radiograph(
            FRACATLAS / "images/Fractured/IMG0000019.jpg", study_uid, series_uid=series_uid, instance_number=1
        ),
        make_radiograph(
            FRACATLAS / "images/Non_fractured/IMG0000001.jpg", study_uid, series_uid=series_uid, instance_number=2
        ),
    ]
    # Stored as received; only the decoder finds it broken, and it panics (a BaseException).
    broken = decoder_panic_rle(
        make_radiograph(
            FRACATLAS / "images/Fractured/IMG0002544.jpg", study_uid, series_uid=series_uid, instance_number=3
        )
    )
    assert _store(server.port, [*good, broken]) == [0, 0, 0]
    row = server.wait_for_state(study_uid, {"done", "failed"})
    assert row["state"] == "done"
    by_uid = {f["sop_instance_uid"]: f for f in row["findings"]}
    assert len(by_uid) == 3
    for ds in good:
        finding = by_uid[ds.SOPInstanceUID]
        assert finding["error"] is None
        assert 0 <= finding["probability"] <= 1
        assert finding["fracture"] == (finding["probability"] >= finding["threshold"])
        assert finding["box"] is None or len(finding["box"]) == 4
    assert by_uid[broken.SOPInstanceUID]["error"]
    assert row["max_probability"] == max(by_uid[d.SOPInstanceUID]["probability"] for d in good)
    assert "Test^Patient" not in server.log() and "PB-TEST-0001" not in server.log()
    assert (server.data_dir / "heatmaps" / study_uid).is_dir()

    # A late instance re-settles the study; only the new image is analysed.
    late = make_radiograph(
        FRACATLAS / "images/Fractured/IMG0000025.jpg", study_uid, series_uid=series_uid, instance_number=4
    )
    assert _store(server.port, [late]) == [0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.log().count(f"study {study_uid} analysed") < 2:
        time.sleep(0.3)
    analysed = re.findall(rf"study {re.escape(study_uid)} analysed by \S+ \S+: (\d+) images", server.log())
    assert analysed == ["3", "1"]
    assert len(server.wait_for_state(study_uid, {"done"})["findings"]) == 4


def test_unrouted_modality_is_kept_and_skipped_with_reason(server: ServeProcess) -> None:
    study_uid = generate_uid()
    photo = make_radiograph(np.random.default_rng(0).random((64, 64)), study_uid, modality="DX")
    photo.Modality = "XC"
    photo.SOPClassUID = SC
    photo.file_meta.MediaStorageSOPClassUID = SC
    assert _store(server.port, [photo]) == [0]
    row = server.wait_for_state(study_uid, {"skipped", "done", "queued"})
    assert row["state"] == "skipped"
    assert "modality XC is not routed" in row["reason"]
    assert row["instances"] == 1
    assert (server.data_dir / "spool" / study_uid / f"{photo.SOPInstanceUID}.dcm").exists()


def test_reanalyse_of_unknown_study_is_a_clear_error(server: ServeProcess) -> None:
    proc = server.cli("reanalyse", "1.2.3.4.5")
    assert proc.returncode == 1
    assert "no study 1.2.3.4.5" in proc.stderr
