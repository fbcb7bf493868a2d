"""Keras -> ONNX export, parity check on real images, and the model manifest.

``export(run_dir, out_dir)`` converts ``run_dir/model.keras`` with tf2onnx
(``tf2onnx.convert.from_function`` on a traced call of the model, which
works with Keras 3), names the graph input ``image`` and the outputs
``probability``, ``heatmap`` and ``body_part``, checks on real validation
images that ONNX Runtime and Keras agree to within ``tolerance`` (default
``1e-4``, otherwise :class:`ExportError`), and writes ``model.onnx``,
``model.json`` (see ``docs/model-manifest.md``), ``model.keras``,
``splits.csv``, ``history.csv``, ``training.json`` and the dataset's
``LICENSE-AND-CITATION.txt`` into ``out_dir``.

The decision threshold and test metrics are filled in by
:func:`trainer.evaluate.evaluate`, which runs on the exported graph.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.preprocess import PreprocessSpec
from pacs_bridge.inference.manifest import sha256_file
from trainer import BODY_PARTS
from trainer.data import load_tensors, read_dataset, read_split_csv
from trainer.nets import HEATMAP_ARCHITECTURES

LOGGER = logging.getLogger(__name__)

__all__ = ["OUTPUT_NAMES", "ExportError", "build_manifest", "convert", "export", "parity_check"]

INPUT_NAME = "image"
OUTPUT_NAMES: tuple[str, ...] = ("probability", "heatmap", "body_part")
OPSET = 17
_COPIED = ("splits.csv", "history.csv", "training.json", "duplicates.json", "LICENSE-AND-CITATION.txt")


class ExportError(RuntimeError):
    """The export failed or the exported graph does not reproduce the Keras model."""


def _rename(graph: Any, old: str, new: str) -> None:
    """Rename a tensor everywhere in an ONNX graph."""
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def convert(model: Any, onnx_path: Path, opset: int = OPSET) -> None:
    """Convert a Keras model with the three named outputs to ONNX at ``onnx_path``."""
    import onnx
    import tensorflow as tf
    import tf2onnx

    shape = (None, *[int(d) for d in model.inputs[0].shape[1:]])
    signature = (tf.TensorSpec(shape, tf.float32, name=INPUT_NAME),)

    def call(image: Any) -> tuple[Any, ...]:
        outputs = model(image, training=False)
        return tuple(tf.identity(outputs[name], name=name) for name in OUTPUT_NAMES)

    forward = tf.function(call, input_signature=signature)

    proto, _ = tf2onnx.convert.from_function(forward, input_signature=signature, opset=opset)
    graph = proto.graph
    if len(graph.output) != len(OUTPUT_NAMES):
        raise ExportError(f"expected {len(OUTPUT_NAMES)} graph outputs, got {[o.name for o in graph.output]}")
    for value, name in zip(list(graph.output), OUTPUT_NAMES, strict=True):
        _rename(graph, value.name, name)
    _rename(graph, graph.input[0].name, INPUT_NAME)
    # Symbolic batch dimension named N for readability.
    for value in [*graph.input, *graph.output]:
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    proto.producer_name = "pacs-bridge-trainer"
    onnx.checker.check_model(proto)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(onnx_path))
    LOGGER.info("wrote %s (%.1f MB)", onnx_path, onnx_path.stat().st_size / 1e6)


def parity_check(
    model: Any, onnx_path: Path, images: npt.NDArray[np.float32], tolerance: float = 1e-4
) -> dict[str, float]:
    """Largest absolute Keras-vs-ONNX Runtime difference per output; raises above ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    keras_out = model.predict(images, batch_size=16, verbose=0)
    diffs: dict[str, float] = {}
    for name, value in zip(OUTPUT_NAMES, onnx_out, strict=True):
        reference = np.asarray(keras_out[name], dtype=np.float32)
        if reference.shape != value.shape:
            raise ExportError(f"output {name}: Keras shape {reference.shape} != ONNX shape {value.shape}")
        diffs[name] = float(np.max(np.abs(reference - value)))
    worst = max(diffs.values())
    LOGGER.info("parity on %d real image(s): %s", len(images), {k: f"{v:.2e}" for k, v in diffs.items()})
    if worst > tolerance:
        raise ExportError(f"ONNX output differs from Keras by {worst:.3e} > {tolerance:.0e}: {diffs}")
    return diffs


def build_manifest(
    *,
    name: str,
    version: str,
    onnx_file: str,
    sha256: str,
    spec: PreprocessSpec,
    training: dict[str, Any],
    threshold: float = 0.5,
    threshold_rule: str = "default 0.5; not yet chosen on the validation split (run evaluate)",
    metrics: dict[str, Any] | None = None,
    has_heatmap: bool = True,
    has_body_part: bool = True,
    heatmap_kind: str = "cam",
    localisation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``model.json`` content, as documented in ``docs/model-manifest.md``.

    ``heatmap_kind="centre"`` (the heatnet) also records independent
    body-region sigmoids and the ``localisation`` block that the service reads
    boxes with (:mod:`pacs_bridge.inference.boxes`).
    """
    outputs: dict[str, Any] = {
        "probability": "probability",
        "heatmap": "heatmap" if has_heatmap else None,
        "body_part": "body_part" if has_body_part else None,
    }
    extra: dict[str, Any] = {}
    if heatmap_kind == "centre":
        outputs["heatmap_kind"] = "centre"
        outputs["body_part_activation"] = "sigmoid"
        extra["localisation"] = localisation or {"min_score": 0.2, "extent": 0.5, "max_boxes": 3}
    return {
        "schema_version": 1,
        "name": name,
        "version": version,
        "description": "Fracture classifier for musculoskeletal radiographs (research use, not for clinical use)",
        "onnx_file": onnx_file,
        "sha256": sha256,
        "input": {
            "name": INPUT_NAME,
            "layout": "NHWC",
            "size": spec.size,
            "channels": spec.channels,
            "dtype": "float32",
        },
        "preprocessing": spec.to_manifest(),
        "outputs": outputs,
        **extra,
        "labels": {"positive": "fracture", "body_parts": list(BODY_PARTS)},
        "threshold": float(threshold),
        "threshold_rule": threshold_rule,
        "training": training,
        "metrics": metrics or {},
    }


def _training_block(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("data", "licence", "attribution", "command", "split_file", "duration_seconds")
    block = {k: record.get(k) for k in keys}
    if record.get("initial_weights"):
        block["initial_weights"] = record["initial_weights"]
    config = record.get("config", {})
    block.update(
        {
            "seed": config.get("seed"),
            "architecture": config.get("arch"),
            "epochs_run": record.get("epochs_run"),
            "best_epoch": record.get("best_epoch"),
            "best_val_auc": record.get("best_val_auc"),
            "split_sizes": record.get("split_sizes"),
            "split_positives": record.get("split_positives"),
            "hardware": f"CPU, {record.get('threads')} thread(s)",
        }
    )
    if config.get("arch") in HEATMAP_ARCHITECTURES:
        block["fusion_weight"] = record.get("fusion_weight")
        block["fusion_val_auc"] = record.get("fusion_val_auc")
    return block


def export(
    run_dir: Path,
    out_dir: Path,
    *,
    name: str = "fracatlas-cnn",
    version: str = "1.0.0",
    data: Path | None = None,
    parity_images: int = 16,
    tolerance: float = 1e-4,
    keep_keras: bool = True,
    min_box_score: float = 0.2,
    flagged_box_score: float = 0.05,
) -> Path:
    """Export a training run folder into a model folder; returns the manifest path."""
    import keras

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    keras_path = run_dir / "model.keras"
    record_path = run_dir / "training.json"
    if not keras_path.is_file() or not record_path.is_file():
        raise ExportError(f"{run_dir}: model.keras and training.json expected (run train first)")
    record = json.loads(record_path.read_text())
    spec = PreprocessSpec.from_manifest(record["preprocessing"])
    model = keras.models.load_model(keras_path, compile=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.onnx"
    convert(model, onnx_path)

    data_root = Path(data) if data is not None else Path(record["config"]["data"])
    records = read_dataset(data_root, record["config"].get("layout", "auto"))
    splits = read_split_csv(run_dir / "splits.csv", records)
    pool = splits["val"] or splits["train"]
    chosen = pool[: max(1, parity_images)]
    tensors = load_tensors(chosen, spec)
    diffs = parity_check(model, onnx_path, tensors.images, tolerance)

    for file_name in _COPIED:
        source = run_dir / file_name
        if source.is_file() and source.resolve() != (out_dir / file_name).resolve():
            shutil.copyfile(source, out_dir / file_name)
    if keep_keras and keras_path.resolve() != (out_dir / "model.keras").resolve():
        shutil.copyfile(keras_path, out_dir / "model.keras")
    training = _training_block(record)
    training["parity_max_abs_diff"] = max(diffs.values())
    centre = record["config"].get("arch") in HEATMAP_ARCHITECTURES
    manifest = build_manifest(
        name=name,
        version=version,
        onnx_file="model.onnx",
        sha256=sha256_file(onnx_path),
        spec=spec,
        training=training,
        heatmap_kind="centre" if centre else "cam",
        localisation=(
            {"min_score": min_box_score, "extent": 0.5, "max_boxes": 3, "flagged_min_score": flagged_box_score}
            if centre
            else None
        ),
    )
    manifest_path = out_dir / "model.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if previous.get("sha256") == manifest["sha256"]:
        for key in ("threshold", "threshold_rule", "metrics"):
            if key in previous:
                manifest[key] = previous[key]
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    LOGGER.info("wrote %s", manifest_path)
    return manifest_path
