"""ONNX Runtime model loading, providers, prediction and heatmap localisation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from pacs_bridge.imaging.preprocess import PreprocessSpec, preprocess
from pacs_bridge.inference import model as model_module
from pacs_bridge.inference.heatmap import locate, normalise
from pacs_bridge.inference.manifest import ManifestError, sha256_file
from pacs_bridge.inference.model import (
    MODEL_DIR_ENV,
    FractureModel,
    ModelLoadError,
    default_model_dir,
    load_model,
    resolve_providers,
)
from tests.support import fixtures
from tests.support.tiny_model import build_tiny_model

tiny_model_dir = fixtures.tiny_model_dir
tiny_model = fixtures.tiny_model


def test_load_and_predict(tiny_model: FractureModel) -> None:
    assert tiny_model.name == "tiny-test" and tiny_model.provider == "CPUExecutionProvider"
    assert tiny_model.input_shape == (64, 64, 1)
    batch = np.stack([np.full((64, 64, 1), v, dtype=np.float32) for v in (0.0, 0.3, 0.6, 1.0)])
    out = tiny_model.predict(batch)
    assert set(out) == {"probability", "heatmap", "body_part"}
    assert out["probability"].shape == (4,)
    assert out["heatmap"].shape == (4, 16, 16)
    assert out["body_part"].shape == (4, 4)
    np.testing.assert_allclose(out["body_part"].sum(axis=1), 1.0, atol=1e-5)
    # brighter input, higher probability, smoothly
    assert np.all(np.diff(out["probability"]) > 0)
    assert np.all((out["probability"] > 0) & (out["probability"] < 1))


def test_batch_equals_single(tiny_model: FractureModel) -> None:
    rng = np.random.default_rng(0)
    batch = rng.random((5, 64, 64, 1), dtype=np.float32)
    together = tiny_model.predict(batch)["probability"]
    alone = np.array([tiny_model.predict(batch[i : i + 1])["probability"][0] for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_wrong_batch_shape(tiny_model: FractureModel) -> None:
    with pytest.raises(ValueError, match="batch must have shape"):
        tiny_model.predict(np.zeros((1, 32, 32, 1), dtype=np.float32))


def test_resolve_providers() -> None:
    auto = resolve_providers("auto")
    assert auto[-1] == "CPUExecutionProvider"
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")
def test_unavailable_provider_falls_back_to_cpu(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    with caplog.at_level(logging.INFO, logger="pacs_bridge.inference.model"):
        model = load_model(tiny_model_dir, providers="auto")
    assert model.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in caplog.text


def test_default_model_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(MODEL_DIR_ENV, raising=False)
    assert default_model_dir() == Path(model_module.__file__).resolve().parents[2] / "models" / "fracatlas-cnn"
    monkeypatch.setenv(MODEL_DIR_ENV, str(tmp_path))
    assert default_model_dir() == tmp_path


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"no model folder here.*{MODEL_DIR_ENV}"):
        load_model(tmp_path / "absent")


def test_graph_must_match_manifest(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "m")
    data = json.loads((folder / "model.json").read_text())
    data["outputs"]["heatmap"] = "cam"
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelLoadError, match="no output 'cam'"):
        load_model(folder, providers="cpu")


def test_corrupt_onnx_with_matching_checksum(tmp_path: Path) -> None:
    folder = build_tiny_model(tmp_path / "m")
    (folder / "model.onnx").write_bytes(b"not an onnx graph")
    data = json.loads((folder / "model.json").read_text())
    data["sha256"] = sha256_file(folder / "model.onnx")
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="cannot load the model"):
        load_model(folder, providers="cpu")


# --- heatmap --------------------------------------------------------------------------------------------


def test_locate_maps_hot_spot_to_original_grid() -> None:
    image = np.zeros((300, 200), dtype=np.float32)  # portrait: padded left and right in the square
    _, letterbox = preprocess(image, PreprocessSpec(size=64))
    cam = np.zeros((16, 16), dtype=np.float32)
    # square input: the 200-wide image spans x = 10.67..53.33 of 64 (scale 64/300); hot cell (row 4, col 8)
    cam[4, 8] = 1.0
    result = locate(cam, letterbox)
    assert result.heatmap.shape == (300, 200)
    assert result.heatmap.dtype == np.float32
    assert float(result.heatmap.max()) == 1.0 and float(result.heatmap.min()) == 0.0
    assert result.peak is not None and result.box is not None
    x, y = result.peak
    # cell centre in input pixels: (8.5 * 4, 4.5 * 4) = (34, 18) -> original ((34 - 10) / 0.2133, 18 / 0.2133)
    assert abs(x - (34 - letterbox.pad_x) / letterbox.scale) < 12
    assert abs(y - (18 - letterbox.pad_y) / letterbox.scale) < 12
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 <= x < x1 <= 200 and 0 <= y0 <= y < y1 <= 300
    assert (x1 - x0) < 100 and (y1 - y0) < 100


def test_locate_picks_the_component_with_the_peak() -> None:
    image = np.zeros((256, 256), dtype=np.float32)
    _, letterbox = preprocess(image, PreprocessSpec(size=64))
    cam = np.zeros((16, 16), dtype=np.float32)
    cam[2, 2] = 0.8  # a second, weaker region
    cam[12, 12] = 1.0
    result = locate(cam, letterbox, threshold=0.5)
    assert result.box is not None
    x0, y0, _, _ = result.box
    assert x0 > 128 and y0 > 128


def test_flat_heatmap_has_no_box() -> None:
    _, letterbox = preprocess(np.zeros((100, 100), dtype=np.float32), PreprocessSpec(size=64))
    result = locate(np.full((16, 16), 3.0, dtype=np.float32), letterbox)
    assert result.box is None and result.peak is None
    assert not result.heatmap.any()


def test_normalise() -> None:
    out = normalise(np.array([[-2.0, 0.0], [2.0, np.nan]]))
    np.testing.assert_allclose(out, [[0.0, 0.5], [1.0, 0.5]])
