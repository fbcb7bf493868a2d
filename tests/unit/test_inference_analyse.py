"""The analyser: batching, failures, and the same finding for every encoding of one radiograph."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from pacs_bridge.imaging.dicom import load_display_image
from pacs_bridge.inference.analyse import Analyser, ImageFailure, ImageFinding
from pacs_bridge.inference.model import FractureModel
from tests.support import fixtures
from tests.support.imaging_samples import FIXTURE_JPEG, TRANSCODINGS, pydicom_file, radiograph, write_dx

tiny_model_dir = fixtures.tiny_model_dir
tiny_model = fixtures.tiny_model
dx_dir = fixtures.dx_dir
dx_reference = fixtures.dx_reference
dx_reference_8bit = fixtures.dx_reference_8bit
dx_variant = fixtures.dx_variant


@pytest.fixture(scope="module")
def analyser(tiny_model: FractureModel) -> Analyser:
    return Analyser(tiny_model, batch_size=4)


def _finding(analyser: Analyser, path: Path) -> ImageFinding:
    (result,) = analyser.analyse_paths([path])
    assert isinstance(result, ImageFinding), result
    return result


def test_finding_fields(analyser: Analyser, dx_reference: Path) -> None:
    finding = _finding(analyser, dx_reference)
    assert finding.path == str(dx_reference)
    assert 0.0 < finding.probability < 1.0
    assert finding.fracture == (finding.probability >= finding.threshold)
    assert finding.threshold == 0.5
    assert finding.body_part in {"hand", "leg", "hip", "shoulder"}
    assert finding.model_name == "tiny-test" and finding.model_version == "0.0.1"
    assert finding.provider == "CPUExecutionProvider"
    assert finding.heatmap is not None and finding.heatmap.shape == (512, 410)
    assert finding.heatmap.dtype == np.float32
    assert 0.0 <= float(finding.heatmap.min()) and float(finding.heatmap.max()) == 1.0
    assert finding.box is not None and finding.peak is not None
    x0, y0, x1, y1 = finding.box
    assert 0 <= x0 < x1 <= 410 and 0 <= y0 < y1 <= 512
    assert x0 <= finding.peak[0] < x1 and y0 <= finding.peak[1] < y1
    assert {"decode_ms", "preprocess_ms", "infer_ms"} <= set(finding.timings)
    assert finding.to_json()["box"] == finding.box


def test_analyse_images_batches_like_single(analyser: Analyser, dx_reference: Path) -> None:
    image = load_display_image(dx_reference)
    items = [(f"k{i}", np.clip(image * (0.6 + 0.1 * i), 0.0, 1.0)) for i in range(6)]
    batched = analyser.analyse_images(items)
    single = [Analyser(analyser.model, batch_size=1).analyse_images([item])[0] for item in items]
    assert [f.path for f in batched] == [f"k{i}" for i in range(6)]
    for a, b in zip(batched, single, strict=True):
        assert isinstance(a, ImageFinding) and isinstance(b, ImageFinding)
        assert a.probability == pytest.approx(b.probability, abs=1e-6)
        assert a.box == b.box
    assert isinstance(batched[0], ImageFinding) and batched[0].timings["decode_ms"] == 0.0


def test_analyse_paths_keeps_order_and_reports_failures(analyser: Analyser, dx_reference: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"junk" * 100)
    png = tmp_path / "image.png"
    cv2.imwrite(str(png), (radiograph(8)).astype(np.uint8))
    tiny = write_dx(tmp_path / "tiny.dcm", np.zeros((4, 4), dtype=np.uint16))
    paths = [dx_reference, junk, png, tmp_path / "absent.dcm", tiny, Path(FIXTURE_JPEG)]
    results = analyser.analyse_paths(paths)
    assert [r.path for r in results] == [str(p) for p in paths]
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["ImageFinding", "ImageFailure", "ImageFinding", "ImageFailure", "ImageFailure", "ImageFinding"]
    failures = [r for r in results if isinstance(r, ImageFailure)]
    assert "not a DICOM file" in failures[0].reason
    assert "no such file" in failures[1].reason
    assert "too small" in failures[2].reason
    assert failures[0].to_json() == {"path": str(junk), "error": failures[0].reason}


# --- the same radiograph in every encoding ----------------------------------------------------------------


@pytest.mark.dcmtk
@pytest.mark.parametrize("name", [n for n, (_, _, lossless) in TRANSCODINGS.items() if lossless])
def test_lossless_encodings_same_probability(
    name: str, analyser: Analyser, dx_reference: Path, dx_variant: Callable[[str], Path]
) -> None:
    reference = _finding(analyser, dx_reference)
    variant = _finding(analyser, dx_variant(name))
    assert variant.probability == reference.probability
    assert variant.box == reference.box


@pytest.mark.dcmtk
@pytest.mark.parametrize("name", ["jpeg_baseline", "jpeg_extended", "jpegls_near", "j2k_lossy"])
def test_lossy_encodings_probability_within_002(
    name: str, analyser: Analyser, dx_reference: Path, dx_reference_8bit: Path, dx_variant: Callable[[str], Path]
) -> None:
    reference = _finding(analyser, dx_reference_8bit if name == "jpeg_baseline" else dx_reference)
    variant = _finding(analyser, dx_variant(name))
    assert abs(variant.probability - reference.probability) < 0.02


def test_12_bit_and_8_bit_probability_within_002(
    analyser: Analyser, dx_reference: Path, dx_reference_8bit: Path
) -> None:
    p12 = _finding(analyser, dx_reference).probability
    p8 = _finding(analyser, dx_reference_8bit).probability
    assert abs(p12 - p8) < 0.02


def test_dicom_with_full_range_window_matches_the_jpeg(analyser: Analyser, tmp_path: Path) -> None:
    gray = np.asarray(cv2.imread(str(FIXTURE_JPEG), cv2.IMREAD_GRAYSCALE), dtype=np.uint8)
    # LINEAR window c=128, w=256 maps x to x / 255 (PS3.3 C.11.2.1.2.1), as the PNG/JPEG loader does.
    path = write_dx(tmp_path / "jpeg-as-dx.dcm", gray, bits_stored=8, window=(128.0, 256.0))
    from_dicom = _finding(analyser, path)
    from_jpeg = _finding(analyser, Path(FIXTURE_JPEG))
    assert from_dicom.probability == pytest.approx(from_jpeg.probability, abs=1e-6)


def test_monochrome1_same_probability(analyser: Analyser, dx_dir: Path, dx_reference: Path) -> None:
    inverted = write_dx(dx_dir / "mono1-analyse.dcm", 4095 - radiograph(12), photometric="MONOCHROME1")
    assert _finding(analyser, inverted).probability == pytest.approx(
        _finding(analyser, dx_reference).probability, abs=1e-6
    )


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_UNCI.dcm", "RG1_J2KR.dcm"])
def test_real_computed_radiographs_are_analysed(analyser: Analyser, name: str) -> None:
    path = pydicom_file(name)
    finding = _finding(analyser, path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert finding.heatmap is not None and finding.heatmap.shape == (ds.Rows, ds.Columns)
    assert 0.0 < finding.probability < 1.0
