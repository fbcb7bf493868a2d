"""Boxes from a centre heatmap, refusal of inputs that cannot be radiographs, per-image failure isolation."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from pacs_bridge.imaging.preprocess import Letterbox
from pacs_bridge.inference import analyse as analyse_module
from pacs_bridge.inference.analyse import Analyser, ImageFailure, ImageFinding
from pacs_bridge.inference.boxes import LocalisationSpec, centre_boxes
from pacs_bridge.inference.model import FractureModel, load_model
from pacs_bridge.inference.plausibility import implausible_reason, neighbour_correlation
from tests.support.imaging_samples import FIXTURE_JPEG
from tests.support.tiny_model import build_tiny_model


def _gaussian(side: int, cx: float, cy: float, sx: float, sy: float, peak: float) -> npt.NDArray[np.float32]:
    grid = np.arange(side, dtype=np.float32) + 0.5
    gx = np.exp(-((grid - cx) ** 2) / (2 * sx * sx))
    gy = np.exp(-((grid - cy) ** 2) / (2 * sy * sy))
    return (peak * np.outer(gy, gx)).astype(np.float32)


def test_centre_boxes_read_half_maximum_extent_in_original_pixels() -> None:
    # A 1024 x 512 (cols x rows) image letterboxed into 512: scale 0.5, pad_y 128; grid 64 (stride 8).
    letterbox = Letterbox(scale=0.5, pad_x=0, pad_y=128, shape=(512, 1024), size=512)
    # Sigma 0.425 x side: the map falls to one half on the edges of a 6-cell-wide, 4-cell-high box.
    strong = _gaussian(64, 20.5, 30.5, 0.425 * 6, 0.425 * 4, 0.9)
    weak = _gaussian(64, 50.5, 40.5, 0.425 * 2, 0.425 * 2, 0.4)
    found = centre_boxes(np.maximum(strong, weak), letterbox, LocalisationSpec(min_score=0.2, extent=0.5))
    assert [round(score, 2) for _, score in found.boxes] == [0.9, 0.4]
    (x0, y0, x1, y1), _ = found.boxes[0]
    # Cells 17..23 x 28..32 (half-max, centre 20.5 / 30.5), x 8 px, then back to the original: / 0.5, y - 128.
    assert (x0, y0, x1, y1) == (17 * 16, (28 * 8 - 128) * 2, 24 * 16, (33 * 8 - 128) * 2)
    assert found.peak == (int((20.5 * 8) / 0.5), int((30.5 * 8 - 128) / 0.5))
    assert x0 <= found.peak[0] < x1 and y0 <= found.peak[1] < y1


def test_centre_boxes_nothing_on_a_quiet_map_and_at_most_max_boxes() -> None:
    letterbox = Letterbox(scale=1.0, pad_x=0, pad_y=0, shape=(512, 512), size=512)
    quiet = np.full((64, 64), 0.05, dtype=np.float32)
    assert centre_boxes(quiet, letterbox, LocalisationSpec(min_score=0.2)).boxes == []
    assert centre_boxes(quiet, letterbox, LocalisationSpec(min_score=0.2)).peak is None
    many = sum(_gaussian(64, 8.5 + 12 * i, 30.5, 1.0, 1.0, 0.9 - 0.1 * i) for i in range(5))
    found = centre_boxes(np.asarray(many), letterbox, LocalisationSpec(min_score=0.2, max_boxes=3))
    assert len(found.boxes) == 3
    assert [s for _, s in found.boxes] == sorted((s for _, s in found.boxes), reverse=True)


def test_centre_boxes_follow_the_call_with_flagged_min_score() -> None:
    letterbox = Letterbox(scale=1.0, pad_x=0, pad_y=0, shape=(512, 512), size=512)
    spec = LocalisationSpec(min_score=0.2, extent=0.5, flagged_min_score=0.05)
    # A faint peak (0.12) and a fainter one (0.08): under min_score, over flagged_min_score.
    faint = np.maximum(_gaussian(64, 20.5, 30.5, 2.0, 2.0, 0.12), _gaussian(64, 50.5, 10.5, 2.0, 2.0, 0.08))
    flagged = centre_boxes(faint, letterbox, spec, flagged=True)
    assert [round(score, 2) for _, score in flagged.boxes] == [0.12]  # only the strongest peak under min_score
    assert flagged.peak == (int(20.5 * 8), int(30.5 * 8))
    # Called negative: no mark at all, even over a strong peak.
    strong = _gaussian(64, 20.5, 30.5, 2.0, 2.0, 0.9)
    assert centre_boxes(strong, letterbox, spec, flagged=False) == centre_boxes(
        np.zeros((64, 64), np.float32), letterbox, spec
    )
    assert centre_boxes(strong, letterbox, spec, flagged=False).boxes == []
    assert centre_boxes(strong, letterbox, spec, flagged=False).peak is None
    # A flagged image over a flat, near-zero map still gets nothing: no box over empty background.
    assert centre_boxes(np.full((64, 64), 0.01, np.float32), letterbox, spec, flagged=True).boxes == []
    # Without flagged_min_score, or with the call unknown, every peak needs min_score.
    assert centre_boxes(faint, letterbox, LocalisationSpec(min_score=0.2), flagged=True).boxes == []
    assert centre_boxes(faint, letterbox, spec).boxes == []
    with pytest.raises(ValueError, match="flagged_min_score"):
        LocalisationSpec(min_score=0.2, flagged_min_score=0.3)


def test_plausibility_refuses_small_flat_and_noise_accepts_radiograph() -> None:
    rng = np.random.default_rng(0)
    assert "too small" in (implausible_reason(rng.random((64, 64))) or "")
    assert "noise" in (implausible_reason(rng.random((512, 410))) or "")
    assert "near-constant" in (implausible_reason(np.full((300, 200), 0.4)) or "")
    real = np.asarray(cv2.imread(str(FIXTURE_JPEG), cv2.IMREAD_GRAYSCALE), dtype=np.float32) / 255.0
    assert implausible_reason(real) is None
    assert neighbour_correlation(real)[1] > 0.9


@pytest.fixture(scope="module")
def centre_model(tmp_path_factory: pytest.TempPathFactory) -> FractureModel:
    folder = build_tiny_model(tmp_path_factory.mktemp("centre"), size=128, heatmap_kind="centre")
    return load_model(folder, providers="cpu", intra_op_threads=1)


def test_centre_model_finding_has_scored_boxes_and_absolute_heat(centre_model: FractureModel) -> None:
    (finding,) = Analyser(centre_model).analyse_paths([FIXTURE_JPEG])
    assert isinstance(finding, ImageFinding)
    assert finding.boxes and finding.box == list(finding.boxes[0][0])
    assert all(0.5 <= score <= 1.0 for _, score in finding.boxes)
    assert finding.peak is not None
    x0, y0, x1, y1 = finding.box
    assert 0 <= x0 < x1 <= 410 and 0 <= y0 < y1 <= 512
    assert x0 <= finding.peak[0] < x1 and y0 <= finding.peak[1] < y1
    # The heat is relative to the top box's score: 1 at that peak, half on its box's edges.
    assert finding.heatmap is not None and finding.heatmap.shape == (512, 410)
    assert float(finding.heatmap.max()) == pytest.approx(1.0, abs=0.02)
    record = finding.to_json()
    assert record["boxes"][0] == {"box": finding.box, "score": round(finding.boxes[0][1], 6)}
    assert record["peak"] == list(finding.peak)


def test_centre_model_points_nowhere_on_a_quiet_image(centre_model: FractureModel) -> None:
    real = np.asarray(cv2.imread(str(FIXTURE_JPEG), cv2.IMREAD_GRAYSCALE), dtype=np.float32) / 255.0
    (finding,) = Analyser(centre_model).analyse_images([("dark", real * 0.25)])
    assert isinstance(finding, ImageFinding)
    assert finding.boxes == [] and finding.box is None and finding.peak is None
    assert finding.heatmap is not None and not finding.heatmap.any()
    assert finding.to_json()["boxes"] == [] and finding.to_json()["peak"] is None


class _FailingModel(FractureModel):
    """ONNX Runtime stand-in that fails on any batch holding a saturated image."""

    def predict(self, batch: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float32]]:
        if any(float(t.mean()) > 0.75 for t in batch):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")
        return super().predict(batch)


class PanicLike(BaseException):
    """What pyo3 raises when Rust code panics (``pyo3_runtime.PanicException`` derives from BaseException)."""


def test_one_bad_image_fails_alone(
    centre_model: FractureModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _FailingModel(centre_model.manifest, centre_model.session, centre_model.provider, centre_model.providers)
    real = np.asarray(cv2.imread(str(FIXTURE_JPEG), cv2.IMREAD_GRAYSCALE), dtype=np.uint8)
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), real)
    # Saturated but not flat: a plausible-looking image that the runtime stand-in rejects.
    bright = tmp_path / "bright.png"
    square = real[:410, :410].astype(np.int32)
    cv2.imwrite(str(bright), np.clip(square // 4 + 200, 0, 255).astype(np.uint8))
    noise = tmp_path / "noise.png"
    cv2.imwrite(str(noise), (np.random.default_rng(1).random((512, 512)) * 255).astype(np.uint8))
    panics = tmp_path / "panics.png"
    cv2.imwrite(str(panics), real)
    original = analyse_module.load_image

    def decoder(path: object, **kwargs: int) -> npt.NDArray[np.float32]:
        if str(path) == str(panics):
            raise PanicLike("called `Result::unwrap()` on an `Err` value")
        return original(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(analyse_module, "load_image", decoder)
    results = Analyser(model, batch_size=4).analyse_paths([good, bright, noise, panics, good])
    assert [type(r).__name__ for r in results] == [
        "ImageFinding",
        "ImageFailure",
        "ImageFailure",
        "ImageFailure",
        "ImageFinding",
    ]
    reasons = [r.reason for r in results if isinstance(r, ImageFailure)]
    assert "inference failed" in reasons[0] and "RUNTIME_EXCEPTION" in reasons[0]
    assert "noise" in reasons[1]
    assert "PanicLike" in reasons[2] and "unwrap" in reasons[2]


def test_keyboard_interrupt_is_not_swallowed(centre_model: FractureModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def decoder(path: object, **kwargs: int) -> npt.NDArray[np.float32]:
        raise KeyboardInterrupt

    monkeypatch.setattr(analyse_module, "load_image", decoder)
    with pytest.raises(KeyboardInterrupt):
        Analyser(centre_model).analyse_paths([FIXTURE_JPEG])
