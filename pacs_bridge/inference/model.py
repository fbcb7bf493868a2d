"""The fracture model: one ONNX Runtime session per model folder.

:func:`load_model` validates the folder (:mod:`pacs_bridge.inference.manifest`),
chooses the execution providers, creates the
:class:`onnxruntime.InferenceSession` once and checks that the graph matches
the manifest. :meth:`FractureModel.predict` runs a preprocessed batch
(``[N, size, size, channels]`` float32, from
:func:`pacs_bridge.imaging.preprocess.preprocess_batch`). ``session.run`` is
thread-safe, so one model can serve several worker threads.

Provider choice (``providers="auto"``): TensorRT and CUDA are tried when the
installed ONNX Runtime offers them and a GPU actually initialises (a session
created with them keeps them active); otherwise the CPU provider is used. The
choice is logged. On CUDA the inputs and outputs go through
``session.io_binding()``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from pacs_bridge.inference.manifest import ManifestError, ModelManifest

__all__ = [
    "MODEL_DIR_ENV",
    "FractureModel",
    "ModelLoadError",
    "default_model_dir",
    "load_model",
    "resolve_providers",
]

LOGGER = logging.getLogger(__name__)

MODEL_DIR_ENV = "PACS_BRIDGE_ANALYSIS_MODEL_DIR"
"""The settings' own variable for ``[analysis] model_dir`` (one variable for serve, infer and evaluate)."""
DEFAULT_MODEL_NAME = "fracatlas-cnn"

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


class ModelLoadError(ManifestError):
    """The model folder is missing or its graph cannot be loaded or does not match the manifest."""


def default_model_dir() -> Path:
    """``$PACS_BRIDGE_ANALYSIS_MODEL_DIR`` if set, else the bundled model ``fracatlas-cnn``.

    Installed from a wheel, the bundled model is package data,
    ``pacs_bridge/_bundled_models/fracatlas-cnn``; in a checkout (an editable
    install) it is ``<repository root>/models/fracatlas-cnn``, the folder the
    wheel is built from. When neither exists, the package-data path is returned
    so that the error names where an install should have put it.
    """
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override).expanduser()
    package = Path(__file__).resolve().parents[1]
    bundled = package / "_bundled_models" / DEFAULT_MODEL_NAME
    checkout = package.parent / "models" / DEFAULT_MODEL_NAME
    for candidate in (bundled, checkout):
        if candidate.is_dir():
            return candidate
    return bundled


def resolve_providers(providers: str | Sequence[str] = "auto") -> list[str]:
    """The provider list to request from ONNX Runtime.

    ``"auto"``: the available GPU providers (TensorRT, CUDA) followed by CPU.
    Otherwise a comma-separated string or a sequence of names or aliases
    (``cpu``, ``cuda``, ``tensorrt``); unavailable ones are dropped with a
    warning; CPU is always appended as the fallback.
    """
    available = ort.get_available_providers()
    if isinstance(providers, str):
        requested = [p.strip() for p in providers.split(",") if p.strip()]
    else:
        requested = [str(p) for p in providers]
    if not requested or requested == ["auto"]:
        chosen = [p for p in _GPU_PROVIDERS if p in available]
    else:
        chosen = []
        for item in requested:
            name = _ALIASES.get(item.lower(), item)
            if name in available:
                if name not in chosen:
                    chosen.append(name)
            else:
                LOGGER.warning("execution provider %s is not available (available: %s)", name, available)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def _session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = max(0, int(intra_op_threads))
    options.inter_op_num_threads = max(0, int(inter_op_threads))
    options.log_severity_level = 3
    return options


def _create_session(path: Path, providers: list[str], options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        if providers == ["CPUExecutionProvider"]:
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model ({exc})") from exc
        LOGGER.warning("providers %s failed (%s); falling back to CPUExecutionProvider", providers, exc)
        try:
            return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc2:
            raise ModelLoadError(f"{path}: ONNX Runtime cannot load the model ({exc2})") from exc2


@dataclass
class FractureModel:
    """A loaded model: its manifest and its ONNX Runtime session (created once)."""

    manifest: ModelManifest
    session: ort.InferenceSession
    provider: str
    providers: tuple[str, ...]

    @property
    def name(self) -> str:
        """Model name from the manifest."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Model version from the manifest."""
        return self.manifest.version

    @property
    def threshold(self) -> float:
        """Decision threshold from the manifest."""
        return self.manifest.threshold

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(size, size, channels)`` of one input."""
        spec = self.manifest.input
        return (spec.size, spec.size, spec.channels)

    def _output_names(self) -> list[tuple[str, str]]:
        outs = self.manifest.outputs
        pairs = [("probability", outs.probability)]
        if outs.heatmap is not None:
            pairs.append(("heatmap", outs.heatmap))
        if outs.body_part is not None:
            pairs.append(("body_part", outs.body_part))
        return pairs

    def predict(self, batch: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float32]]:
        """Run a preprocessed batch ``[N, size, size, channels]``.

        Returns arrays by role: ``probability`` ``(N,)``; ``heatmap``
        ``(N, h, w)`` and ``body_part`` ``(N, K)`` when the model has them.
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError(f"batch must have shape (N, {', '.join(map(str, self.input_shape))}), got {batch.shape}")
        pairs = self._output_names()
        names = [graph_name for _, graph_name in pairs]
        if batch.shape[0] == 0:
            return {role: np.zeros((0,), dtype=np.float32) for role, _ in pairs[:1]}
        if self.provider in _GPU_PROVIDERS:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.manifest.input.name, batch)
            for graph_name in names:
                binding.bind_output(graph_name, "cuda")
            self.session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self.session.run(names, {self.manifest.input.name: batch})
        result: dict[str, npt.NDArray[np.float32]] = {}
        for (role, _), value in zip(pairs, values, strict=True):
            result[role] = np.asarray(value, dtype=np.float32)
        result["probability"] = result["probability"].reshape(batch.shape[0], -1)[:, 0]
        if "heatmap" in result and result["heatmap"].ndim == 4:
            # Tolerate [N, h, w, 1] or [N, 1, h, w] heatmaps.
            result["heatmap"] = result["heatmap"].reshape(
                batch.shape[0], *[d for d in result["heatmap"].shape[1:] if d != 1]
            )
        return result

    def warmup(self) -> None:
        """Run one blank image so that the first real request is not slow."""
        self.predict(np.zeros((1, *self.input_shape), dtype=np.float32))


def _check_graph(manifest: ModelManifest, session: ort.InferenceSession) -> None:
    where = manifest.onnx_path
    inputs = {i.name: i for i in session.get_inputs()}
    spec = manifest.input
    if spec.name not in inputs:
        raise ModelLoadError(f"{where}: graph has no input {spec.name!r} (inputs: {sorted(inputs)})")
    shape = inputs[spec.name].shape
    expected = (spec.size, spec.size, spec.channels)
    if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=True)):
        raise ModelLoadError(f"{where}: input {spec.name!r} has shape {shape}, manifest says [N, {expected}]")
    outputs = {o.name for o in session.get_outputs()}
    for role, name in (
        ("probability", manifest.outputs.probability),
        ("heatmap", manifest.outputs.heatmap),
        ("body_part", manifest.outputs.body_part),
    ):
        if name is not None and name not in outputs:
            raise ModelLoadError(f"{where}: graph has no output {name!r} for {role} (outputs: {sorted(outputs)})")


def load_model(
    folder: str | Path | None = None,
    providers: str | Sequence[str] = "auto",
    intra_op_threads: int = 0,
    inter_op_threads: int = 0,
) -> FractureModel:
    """Load a model folder (default :func:`default_model_dir`) into a :class:`FractureModel`.

    ``intra_op_threads``/``inter_op_threads``: ONNX Runtime thread pools
    (0 = its default). Raises :class:`ManifestError` / :class:`ModelLoadError`.
    """
    path = Path(folder) if folder is not None else default_model_dir()
    if not path.exists():
        raise ModelLoadError(
            f"{path}: no model folder here; pass --model DIR or set {MODEL_DIR_ENV} "
            "(a model folder holds model.onnx and model.json)"
        )
    manifest = ModelManifest.load(path)
    requested = resolve_providers(providers)
    options = _session_options(intra_op_threads, inter_op_threads)
    session = _create_session(manifest.onnx_path, requested, options)
    active = tuple(session.get_providers())
    dropped = [p for p in requested if p not in active]
    if dropped:
        LOGGER.warning("execution providers %s did not initialise (no working GPU?); using %s", dropped, list(active))
    _check_graph(manifest, session)
    model = FractureModel(manifest=manifest, session=session, provider=active[0], providers=active)
    LOGGER.info(
        "loaded model %s %s from %s on %s (providers %s)",
        manifest.name,
        manifest.version,
        path,
        model.provider,
        list(active),
    )
    return model
