"""Model folder manifest: validation and checksum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pacs_bridge.imaging.preprocess import PreprocessSpec
from pacs_bridge.inference.manifest import ManifestError, ModelManifest, sha256_file
from tests.support.tiny_model import build_tiny_model


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return build_tiny_model(tmp_path / "model", size=64, name="tiny", threshold=0.4)


def _edit(folder: Path, change: Any) -> None:
    path = folder / "model.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_valid_manifest_loads(folder: Path) -> None:
    manifest = ModelManifest.load(folder)
    assert manifest.name == "tiny" and manifest.version == "0.0.1"
    assert manifest.threshold == pytest.approx(0.4)
    assert manifest.preprocessing == PreprocessSpec(size=64)
    assert manifest.input.name == "image" and manifest.input.size == 64 and manifest.input.channels == 1
    assert manifest.outputs.probability == "probability"
    assert manifest.outputs.heatmap == "heatmap" and manifest.outputs.body_part == "body_part"
    assert manifest.body_parts == ("hand", "leg", "hip", "shoulder")
    assert manifest.onnx_path == folder / "model.onnx"
    assert manifest.sha256 == sha256_file(folder / "model.onnx")
    assert ModelManifest.load(folder / "model.json") == manifest


def test_preprocessing_block_round_trips(folder: Path) -> None:
    manifest = ModelManifest.load(folder)
    raw = json.loads((folder / "model.json").read_text())
    assert manifest.preprocessing.to_manifest() == raw["preprocessing"]
    assert PreprocessSpec.from_manifest(raw["preprocessing"]) == manifest.preprocessing


@pytest.mark.parametrize("key", ["schema_version", "name", "version", "onnx_file", "sha256", "input", "threshold"])
def test_missing_required_key(folder: Path, key: str) -> None:
    _edit(folder, lambda d: d.pop(key))
    with pytest.raises(ManifestError, match=f"missing required keys: {key}") as info:
        ModelManifest.load(folder)
    assert str(folder / "model.json") in str(info.value)


def test_missing_probability_output(folder: Path) -> None:
    _edit(folder, lambda d: d["outputs"].pop("probability"))
    with pytest.raises(ManifestError, match=r"outputs\.probability"):
        ModelManifest.load(folder)


def test_optional_outputs_may_be_null(folder: Path) -> None:
    def change(d: dict[str, Any]) -> None:
        d["outputs"]["heatmap"] = None
        d["outputs"]["body_part"] = None

    _edit(folder, change)
    manifest = ModelManifest.load(folder)
    assert manifest.outputs.heatmap is None and manifest.outputs.body_part is None


def test_checksum_mismatch(folder: Path) -> None:
    _edit(folder, lambda d: d.__setitem__("sha256", "0" * 64))
    with pytest.raises(ManifestError, match="sha256 mismatch") as info:
        ModelManifest.load(folder)
    assert str(folder / "model.onnx") in str(info.value)
    assert ModelManifest.load(folder, verify_checksum=False).name == "tiny"


def test_modified_onnx_file_is_refused(folder: Path) -> None:
    with (folder / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ManifestError, match="sha256 mismatch"):
        ModelManifest.load(folder)


def test_missing_onnx_file(folder: Path) -> None:
    (folder / "model.onnx").unlink()
    with pytest.raises(ManifestError, match="is missing"):
        ModelManifest.load(folder)


def test_missing_folder_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        ModelManifest.load(tmp_path / "nowhere")
    with pytest.raises(ManifestError, match="manifest file missing"):
        ModelManifest.load(tmp_path)


def test_invalid_json(folder: Path) -> None:
    (folder / "model.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        ModelManifest.load(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.__setitem__("threshold", 1.5), "threshold"),
        (lambda d: d.__setitem__("schema_version", 2), "schema_version"),
        (lambda d: d.__setitem__("sha256", "xyz"), "64 hex digits"),
        (lambda d: d.__setitem__("onnx_file", "../model.onnx"), "inside the model folder"),
        (lambda d: d["preprocessing"].__setitem__("colour", True), "unknown preprocessing keys"),
        (lambda d: d["preprocessing"].__setitem__("size", 128), "differ from preprocessing"),
        (lambda d: d["input"].__setitem__("layout", "NCHW"), "NHWC"),
        (lambda d: d["labels"].__setitem__("body_parts", []), "labels.body_parts"),
    ],
)
def test_invalid_values(folder: Path, change: Any, message: str) -> None:
    _edit(folder, change)
    with pytest.raises(ManifestError, match=message):
        ModelManifest.load(folder)
