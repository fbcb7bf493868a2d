"""`pacs-bridge infer` as a subprocess: the --json contract on DICOM, PNG and JPEG; one set of settings with serve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pacs_bridge.config import load_settings
from pacs_bridge.inference.analyse import ImageFinding, analyser_from_settings
from pacs_bridge.inference.infer_cli import expand_paths, infer_main
from pacs_bridge.inference.model import MODEL_DIR_ENV
from tests.support import fixtures
from tests.support.imaging_samples import FIXTURE_JPEG, radiograph
from tests.support.tiny_model import build_tiny_model

tiny_model_dir = fixtures.tiny_model_dir
dx_dir = fixtures.dx_dir
dx_reference = fixtures.dx_reference

REPO = Path(__file__).resolve().parents[2]
KEYS = ["path", "probability", "fracture", "threshold", "body_part", "box", "boxes", "peak", "model"]


def _infer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_bridge.inference.infer_cli", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, dx_reference: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-inputs")
    png = folder / "hand.png"
    cv2.imwrite(str(png), (radiograph(16)).astype(np.uint16))
    return {"dicom": dx_reference, "png": png, "jpeg": Path(FIXTURE_JPEG)}


def test_json_contract(tiny_model_dir: Path, inputs: dict[str, Path]) -> None:
    paths = [str(inputs[k]) for k in ("dicom", "png", "jpeg")]
    proc = _infer("--model", str(tiny_model_dir), "--json", *paths)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, path in zip(lines, paths, strict=True):
        record = json.loads(line)
        assert list(record) == KEYS
        assert record["path"] == path
        assert isinstance(record["probability"], float) and 0.0 <= record["probability"] <= 1.0
        assert isinstance(record["fracture"], bool)
        assert record["fracture"] == (record["probability"] >= record["threshold"])
        assert record["threshold"] == 0.5
        assert record["body_part"] in ("hand", "leg", "hip", "shoulder")
        box = record["box"]
        assert isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)
        assert box[0] < box[2] and box[1] < box[3]
        assert record["boxes"][0]["box"] == box and 0.0 <= record["boxes"][0]["score"] <= 1.0
        x, y = record["peak"]
        assert box[0] <= x < box[2] and box[1] <= y < box[3]
        assert record["model"] == {"name": "tiny-test", "version": "0.0.1"}


def test_json_contract_of_a_centre_heatmap_model(tmp_path: Path, inputs: dict[str, Path]) -> None:
    model = build_tiny_model(tmp_path / "centre", size=128, heatmap_kind="centre")
    proc = _infer("--model", str(model), "--json", str(inputs["jpeg"]))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert list(record) == KEYS
    assert len(record["boxes"]) >= 1
    for entry in record["boxes"]:
        x0, y0, x1, y1 = entry["box"]
        assert 0 <= x0 < x1 <= 410 and 0 <= y0 < y1 <= 512
        assert 0.5 <= entry["score"] <= 1.0
    scores = [entry["score"] for entry in record["boxes"]]
    assert scores == sorted(scores, reverse=True)
    assert record["box"] == record["boxes"][0]["box"]
    assert record["peak"][0] in range(record["box"][0], record["box"][2])


def test_noise_and_tiny_images_are_refused_with_a_reason(
    tiny_model_dir: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    small = tmp_path / "noise64.png"
    cv2.imwrite(str(small), (rng.random((64, 64)) * 255).astype(np.uint8))
    noise = tmp_path / "noise512.png"
    cv2.imwrite(str(noise), (rng.random((512, 512)) * 255).astype(np.uint8))
    flat = tmp_path / "flat.png"
    cv2.imwrite(str(flat), np.full((400, 300), 90, dtype=np.uint8))
    proc = _infer("--model", str(tiny_model_dir), "--json", str(small), str(noise), str(flat), str(inputs["jpeg"]))
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert "too small to be a radiograph" in records[0]["error"] and "64x64" in records[0]["error"]
    assert "noise" in records[1]["error"]
    assert "near-constant" in records[2]["error"]
    assert "probability" in records[3]


def test_settings_file_and_environment_are_the_services(
    tiny_model_dir: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    """infer reads [analysis] like serve: model_dir and box_threshold from --config, the same box as the service's."""
    config = tmp_path / "site.toml"
    config.write_text(f'[analysis]\nmodel_dir = "{tiny_model_dir}"\nbox_threshold = 0.3\n', encoding="utf-8")
    proc = _infer("--config", str(config), "--json", str(inputs["jpeg"]))
    assert proc.returncode == 0, proc.stderr
    from_file = json.loads(proc.stdout)
    settings = load_settings(config, environ={})
    (service_finding,) = analyser_from_settings(settings).analyse_paths([inputs["jpeg"]])
    assert isinstance(service_finding, ImageFinding)
    assert from_file["box"] == service_finding.box
    assert from_file["probability"] == pytest.approx(service_finding.probability, abs=1e-6)
    default = json.loads(_infer("--model", str(tiny_model_dir), "--json", str(inputs["jpeg"])).stdout)
    assert default["box"] != from_file["box"]  # 0.3 of the peak outlines a larger region than the default 0.7
    env = {"PACS_BRIDGE_ANALYSIS_BOX_THRESHOLD": "0.3", MODEL_DIR_ENV: str(tiny_model_dir)}
    assert json.loads(_infer("--json", str(inputs["jpeg"]), env=env).stdout)["box"] == from_file["box"]
    broken = tmp_path / "broken.toml"
    broken.write_text("[analysis]\nbox_threshold = 7\n", encoding="utf-8")
    proc = _infer("--config", str(broken), "--json", str(inputs["jpeg"]))
    assert proc.returncode == 2 and "box_threshold" in proc.stderr and "Traceback" not in proc.stderr


def test_failed_input_gives_error_record_and_nonzero_exit(
    tiny_model_dir: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 500)
    proc = _infer("--model", str(tiny_model_dir), "--json", str(junk), str(inputs["jpeg"]), str(tmp_path / "gone.png"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert list(records[0]) == ["path", "error"] and records[0]["path"] == str(junk)
    assert str(junk) in records[0]["error"]
    assert "probability" in records[1]
    assert records[2] == {"path": str(tmp_path / "gone.png"), "error": f"{tmp_path / 'gone.png'}: no such file"}


def test_table_and_directory_expansion(tiny_model_dir: Path, inputs: dict[str, Path]) -> None:
    folder = inputs["png"].parent
    proc = _infer("--model", str(tiny_model_dir), "--batch-size", "2", str(folder))
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.strip().splitlines()
    assert header.split()[:3] == ["path", "probability", "fracture"]
    assert len(rows) == 1 and rows[0].startswith(str(inputs["png"]))


def test_model_from_environment(tiny_model_dir: Path, inputs: dict[str, Path]) -> None:
    proc = _infer("--json", str(inputs["jpeg"]), env={MODEL_DIR_ENV: str(tiny_model_dir)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model"]["name"] == "tiny-test"


def test_missing_model_is_a_clear_error(tmp_path: Path, inputs: dict[str, Path]) -> None:
    proc = _infer("--model", str(tmp_path / "nomodel"), "--json", str(inputs["jpeg"]))
    assert proc.returncode == 2
    assert "no model folder" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_infer_main_in_process(
    tiny_model_dir: Path, inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert infer_main(["--model", str(tiny_model_dir), "--json", str(inputs["dicom"])]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(inputs["dicom"])
    assert infer_main(["--model", str(tiny_model_dir), "--batch-size", "0", str(inputs["dicom"])]) == 2
    assert infer_main([]) == 2


def test_expand_paths(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.dcm").write_bytes(b"")
    (tmp_path / "1.dcm").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"")
    assert expand_paths([tmp_path, tmp_path / "x.png"]) == [
        tmp_path / "1.dcm",
        tmp_path / "b" / "2.dcm",
        tmp_path / "x.png",
    ]


def test_shipped_model_marks_follow_the_call_on_real_radiographs() -> None:
    """The bundled model on real FracAtlas radiographs: a box and a peak exactly on the flagged images."""
    images = REPO / "tests" / "fixtures" / "fracatlas" / "images"
    proc = _infer("--model", str(REPO / "models" / "fracatlas-cnn"), "--json", str(images))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 10
    flagged = [r for r in records if r["fracture"]]
    assert flagged and len(flagged) < len(records)  # both calls occur
    for record in records:
        assert record["fracture"] == (record["probability"] >= record["threshold"])
        if not record["fracture"]:
            assert record["boxes"] == [] and record["box"] is None and record["peak"] is None
            continue
        assert 1 <= len(record["boxes"]) <= 3
        x0, y0, x1, y1 = record["box"]
        assert x0 <= record["peak"][0] < x1 and y0 <= record["peak"][1] < y1
        assert (x1 - x0) * (y1 - y0) < 0.10 * 512 * 512  # a mark on the fracture, not on the whole image
