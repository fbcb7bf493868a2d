"""`pacs-bridge infer` as a subprocess: the --json contract on DICOM, PNG and JPEG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pacs_bridge.inference.infer_cli import expand_paths, infer_main
from tests.support import fixtures
from tests.support.imaging_samples import FIXTURE_JPEG, radiograph

tiny_model_dir = fixtures.tiny_model_dir
dx_dir = fixtures.dx_dir
dx_reference = fixtures.dx_reference

REPO = Path(__file__).resolve().parents[2]
KEYS = ["path", "probability", "fracture", "threshold", "body_part", "box", "model"]


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
        assert record["model"] == {"name": "tiny-test", "version": "0.0.1"}


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
    proc = _infer("--json", str(inputs["jpeg"]), env={"PACS_BRIDGE_MODEL_DIR": str(tiny_model_dir)})
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
