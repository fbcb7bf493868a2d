"""A deterministic tiny ONNX model that follows the model-folder contract.

Built with ``onnx.helper`` only (no TensorFlow). The graph:

``image [N,S,S,C] -> NCHW -> 4x4 average pool -> 3x3 conv (4 fixed filters:
brightness, two Sobel edges, Laplacian) -> ReLU``, then

* ``heatmap [N,S/4,S/4]``: class-activation map, the 1x1 weighted sum of the
  feature maps;
* ``probability [N,1]``: ``sigmoid(gain * (mean(CAM) - offset))``, so it
  rises smoothly with bright (dense) and edgy content;
* ``body_part [N,K]``: softmax of a fixed linear layer on the pooled features.

With ``heatmap_kind="centre"`` the heatmap is instead a per-cell
probability, ``sigmoid(gain * (CAM - centre_offset))``, and the manifest says
``outputs.heatmap_kind = "centre"`` with a ``localisation`` block, as a 2.x
model's does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pacs_bridge.imaging.preprocess import PreprocessSpec

__all__ = ["BODY_PARTS", "build_tiny_model", "tiny_manifest"]

BODY_PARTS = ["hand", "leg", "hip", "shoulder"]

_CAM_WEIGHTS = np.array([1.0, 0.6, 0.6, 0.3], dtype=np.float32)
_GAIN = 6.0
_OFFSET = 0.35
_CENTRE_GAIN = 8.0
_CENTRE_OFFSET = 0.55


def _filters(channels: int) -> np.ndarray:
    mean = np.full((3, 3), 1.0 / 9.0, dtype=np.float32)
    sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32) / 4.0
    sobel_y = sobel_x.T.copy()
    laplace = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=np.float32) / 4.0
    kernels = np.stack([mean, sobel_x, sobel_y, laplace])[:, None, :, :]  # [4,1,3,3]
    return np.repeat(kernels, channels, axis=1) / float(channels)


def _graph(size: int, channels: int, n_parts: int, heatmap_kind: str = "cam") -> onnx.ModelProto:
    init = [
        numpy_helper.from_array(_filters(channels), "conv_w"),
        numpy_helper.from_array(np.zeros(4, dtype=np.float32), "conv_b"),
        numpy_helper.from_array(_CAM_WEIGHTS.reshape(1, 4, 1, 1), "cam_w"),
        numpy_helper.from_array(np.array([_GAIN], dtype=np.float32), "gain"),
        numpy_helper.from_array(np.array([_OFFSET], dtype=np.float32), "offset"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([_CENTRE_GAIN], dtype=np.float32), "centre_gain"),
        numpy_helper.from_array(np.array([_CENTRE_OFFSET], dtype=np.float32), "centre_offset"),
    ]
    parts_w = np.array(
        [[np.cos(0.7 * (i + 1) * (j + 1)) * 3.0 for j in range(n_parts)] for i in range(4)], dtype=np.float32
    )
    init.append(numpy_helper.from_array(parts_w, "parts_w"))
    init.append(numpy_helper.from_array(np.linspace(-0.2, 0.2, n_parts, dtype=np.float32), "parts_b"))
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["pooled", "conv_w", "conv_b"], ["conv"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["maps"]),
        helper.make_node("Conv", ["maps", "cam_w"], ["cam4"], kernel_shape=[1, 1]),
        *(
            [
                helper.make_node("Sub", ["cam4", "centre_offset"], ["centre_shift"]),
                helper.make_node("Mul", ["centre_shift", "centre_gain"], ["centre_logit"]),
                helper.make_node("Sigmoid", ["centre_logit"], ["centre4"]),
                helper.make_node("Squeeze", ["centre4", "axis1"], ["heatmap"]),
            ]
            if heatmap_kind == "centre"
            else [helper.make_node("Squeeze", ["cam4", "axis1"], ["heatmap"])]
        ),
        helper.make_node("GlobalAveragePool", ["cam4"], ["cam_mean4"]),
        helper.make_node("Flatten", ["cam_mean4"], ["cam_mean"], axis=1),
        helper.make_node("Sub", ["cam_mean", "offset"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
        helper.make_node("GlobalAveragePool", ["maps"], ["feat4"]),
        helper.make_node("Flatten", ["feat4"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "parts_w", "parts_b"], ["parts_logit"]),
        helper.make_node("Softmax", ["parts_logit"], ["body_part"], axis=1),
    ]
    side = size // 4
    graph = helper.make_graph(
        nodes,
        "tiny_fracture_model",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", size, size, channels])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["N", side, side]),
            helper.make_tensor_value_info("body_part", TensorProto.FLOAT, ["N", n_parts]),
        ],
        init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pacs-bridge-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tiny_manifest(
    size: int, name: str, threshold: float, sha256: str, channels: int = 1, heatmap_kind: str = "cam"
) -> dict[str, Any]:
    """A complete ``model.json`` for the tiny model."""
    spec = PreprocessSpec(size=size, channels=channels)
    outputs: dict[str, Any] = {"probability": "probability", "heatmap": "heatmap", "body_part": "body_part"}
    extra: dict[str, Any] = {}
    if heatmap_kind == "centre":
        outputs["heatmap_kind"] = "centre"
        extra["localisation"] = {"min_score": 0.5, "extent": 0.5, "max_boxes": 3}
    return {
        "schema_version": 1,
        "name": name,
        "version": "0.0.1",
        "description": "Deterministic synthetic model for tests (not trained, not a diagnosis)",
        "onnx_file": "model.onnx",
        "sha256": sha256,
        "input": {"name": "image", "layout": "NHWC", "size": size, "channels": channels, "dtype": "float32"},
        "preprocessing": spec.to_manifest(),
        "outputs": outputs,
        **extra,
        "labels": {"positive": "fracture", "body_parts": list(BODY_PARTS)},
        "threshold": threshold,
        "threshold_rule": "fixed for tests",
        "training": {"data": "none (fixed weights)", "licence": "n/a"},
        "metrics": {},
    }


def build_tiny_model(
    folder: Path,
    size: int = 64,
    name: str = "tiny-test",
    threshold: float = 0.5,
    channels: int = 1,
    heatmap_kind: str = "cam",
) -> Path:
    """Write ``model.onnx`` and a valid ``model.json`` into ``folder``; return ``folder``.

    ``size`` must be a multiple of 4 (the pooling step).
    """
    if size % 4 or size < 16:
        raise ValueError("size must be a multiple of 4 and >= 16")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = _graph(size, channels, len(BODY_PARTS), heatmap_kind).SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    manifest = tiny_manifest(size, name, threshold, hashlib.sha256(data).hexdigest(), channels, heatmap_kind)
    (folder / "model.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return folder
