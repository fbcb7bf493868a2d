"""The model folder manifest (``models/<name>/model.json``), typed and validated.

The contract is documented in ``docs/model-manifest.md``: required keys
``schema_version``, ``name``, ``version``, ``onnx_file``, ``sha256``,
``input``, ``preprocessing``, ``outputs.probability``, ``threshold``; the
``preprocessing`` block is exactly
:meth:`pacs_bridge.imaging.preprocess.PreprocessSpec.to_manifest`. A folder
whose manifest is incomplete or whose ONNX file does not match ``sha256`` is
refused with :class:`ManifestError`, naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pacs_bridge.imaging.preprocess import PreprocessSpec
from pacs_bridge.inference.boxes import LocalisationSpec

__all__ = [
    "HEATMAP_KINDS",
    "MANIFEST_FILE",
    "REQUIRED_KEYS",
    "InputSpec",
    "ManifestError",
    "ModelManifest",
    "OutputNames",
    "sha256_file",
]

LOGGER = logging.getLogger(__name__)

MANIFEST_FILE = "model.json"
SCHEMA_VERSION = 1
REQUIRED_KEYS = (
    "schema_version",
    "name",
    "version",
    "onnx_file",
    "sha256",
    "input",
    "preprocessing",
    "outputs",
    "threshold",
)


HEATMAP_KINDS = ("cam", "centre")
"""``cam``: a class-activation map (1.x; relative, the box is its hottest region);
``centre``: per-cell probability of a fracture centre (2.x; boxes from peaks, see
:mod:`pacs_bridge.inference.boxes`)."""


class ManifestError(ValueError):
    """A model folder or manifest is unusable; the message names the file and the reason."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputSpec:
    """The model input tensor: ``[N, size, size, channels]`` float32, NHWC."""

    name: str
    size: int
    channels: int
    layout: str = "NHWC"
    dtype: str = "float32"


@dataclass(frozen=True)
class OutputNames:
    """Graph output names by role; ``heatmap``/``body_part`` are ``None`` when absent.

    ``heatmap_kind`` says how the heatmap reads (:data:`HEATMAP_KINDS`);
    ``body_part_activation`` is ``softmax`` (one region) or ``sigmoid``
    (independent regions).
    """

    probability: str
    heatmap: str | None = None
    body_part: str | None = None
    heatmap_kind: str = "cam"
    body_part_activation: str = "softmax"


@dataclass(frozen=True)
class ModelManifest:
    """A validated ``model.json`` and the folder it came from."""

    folder: Path
    schema_version: int
    name: str
    version: str
    onnx_file: str
    sha256: str
    input: InputSpec
    preprocessing: PreprocessSpec
    outputs: OutputNames
    threshold: float
    description: str = ""
    threshold_rule: str | None = None
    positive_label: str = "fracture"
    body_parts: tuple[str, ...] = ()
    localisation: LocalisationSpec = field(default_factory=LocalisationSpec)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def manifest_path(self) -> Path:
        """Path of ``model.json``."""
        return self.folder / MANIFEST_FILE

    @property
    def onnx_path(self) -> Path:
        """Path of the ONNX graph."""
        return self.folder / self.onnx_file

    @classmethod
    def load(cls, folder: str | Path, *, verify_checksum: bool = True) -> ModelManifest:
        """Load and validate ``folder/model.json`` (``folder`` may also be the JSON file itself).

        Checks the required keys, their types, the consistency of ``input`` and
        ``preprocessing``, that the ONNX file exists and (unless
        ``verify_checksum`` is false) that its SHA-256 equals ``sha256``.
        """
        path = Path(folder)
        if path.is_file() and path.suffix == ".json":
            path = path.parent
        manifest_path = path / MANIFEST_FILE
        if not path.is_dir():
            raise ManifestError(f"{path}: model folder does not exist")
        if not manifest_path.is_file():
            raise ManifestError(f"{manifest_path}: manifest file missing")
        try:
            raw = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{manifest_path}: not valid JSON ({exc})") from exc
        manifest = cls.from_dict(raw, path)
        if not manifest.onnx_path.is_file():
            raise ManifestError(f"{manifest.onnx_path}: ONNX file named by {manifest_path} is missing")
        if verify_checksum:
            actual = sha256_file(manifest.onnx_path)
            if actual != manifest.sha256:
                raise ManifestError(
                    f"{manifest.onnx_path}: sha256 mismatch (manifest {manifest.sha256}, file {actual}); "
                    "the model file does not belong to this manifest"
                )
        return manifest

    @classmethod
    def from_dict(cls, raw: Any, folder: Path) -> ModelManifest:
        """Validate a parsed manifest; ``folder`` is where its files live."""
        where = folder / MANIFEST_FILE
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: the manifest must be a JSON object")
        missing = [key for key in REQUIRED_KEYS if key not in raw]
        if missing:
            raise ManifestError(f"{where}: missing required keys: {', '.join(missing)}")

        def bad(reason: str) -> ManifestError:
            return ManifestError(f"{where}: {reason}")

        if raw["schema_version"] != SCHEMA_VERSION:
            raise bad(f"unsupported schema_version {raw['schema_version']!r} (expected {SCHEMA_VERSION})")
        for key in ("name", "version", "onnx_file", "sha256"):
            if not isinstance(raw[key], str) or not raw[key].strip():
                raise bad(f"'{key}' must be a non-empty string")
        onnx_file = raw["onnx_file"]
        if Path(onnx_file).is_absolute() or ".." in Path(onnx_file).parts:
            raise bad(f"'onnx_file' must be a file inside the model folder, got {onnx_file!r}")
        sha = raw["sha256"].strip().lower()
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise bad("'sha256' must be 64 hex digits")
        threshold = raw["threshold"]
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise bad(f"'threshold' must be a number in [0, 1], got {threshold!r}")

        block = raw["input"]
        if not isinstance(block, dict):
            raise bad("'input' must be an object")
        try:
            spec_in = InputSpec(
                name=str(block["name"]),
                size=int(block["size"]),
                channels=int(block["channels"]),
                layout=str(block.get("layout", "NHWC")),
                dtype=str(block.get("dtype", "float32")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"'input' needs name, size and channels ({exc!r})") from exc
        if spec_in.layout != "NHWC" or spec_in.dtype != "float32":
            raise bad(f"input must be NHWC float32, got {spec_in.layout} {spec_in.dtype}")

        if not isinstance(raw["preprocessing"], dict):
            raise bad("'preprocessing' must be an object")
        try:
            preprocessing = PreprocessSpec.from_manifest(raw["preprocessing"])
        except (TypeError, ValueError) as exc:
            raise bad(f"invalid 'preprocessing': {exc}") from exc
        if (preprocessing.size, preprocessing.channels) != (spec_in.size, spec_in.channels):
            raise bad(
                f"input size/channels ({spec_in.size}, {spec_in.channels}) differ from preprocessing "
                f"({preprocessing.size}, {preprocessing.channels})"
            )

        outputs = raw["outputs"]
        if not isinstance(outputs, dict) or not isinstance(outputs.get("probability"), str):
            raise bad("missing required key outputs.probability")
        for role in ("heatmap", "body_part"):
            if outputs.get(role) is not None and not isinstance(outputs[role], str):
                raise bad(f"outputs.{role} must be a string or null")
        kind = outputs.get("heatmap_kind", "cam")
        if kind not in HEATMAP_KINDS:
            raise bad(f"outputs.heatmap_kind must be one of {HEATMAP_KINDS}, got {kind!r}")
        activation = outputs.get("body_part_activation", "softmax")
        if activation not in ("softmax", "sigmoid"):
            raise bad(f"outputs.body_part_activation must be 'softmax' or 'sigmoid', got {activation!r}")
        names = OutputNames(outputs["probability"], outputs.get("heatmap"), outputs.get("body_part"), kind, activation)
        block = raw.get("localisation") or {}
        if not isinstance(block, dict):
            raise bad("'localisation' must be an object")
        try:
            localisation = LocalisationSpec(**block)
        except (TypeError, ValueError) as exc:
            raise bad(f"invalid 'localisation': {exc}") from exc

        labels = raw.get("labels") or {}
        if not isinstance(labels, dict):
            raise bad("'labels' must be an object")
        body_parts = tuple(str(p) for p in labels.get("body_parts") or ())
        if names.body_part is not None and not body_parts:
            raise bad("outputs.body_part is set but labels.body_parts is empty")

        return cls(
            folder=folder,
            schema_version=int(raw["schema_version"]),
            name=raw["name"],
            version=raw["version"],
            onnx_file=onnx_file,
            sha256=sha,
            input=spec_in,
            preprocessing=preprocessing,
            outputs=names,
            threshold=float(threshold),
            description=str(raw.get("description", "")),
            threshold_rule=raw.get("threshold_rule"),
            positive_label=str(labels.get("positive", "fracture")),
            body_parts=body_parts,
            localisation=localisation,
            training=dict(raw.get("training") or {}),
            metrics=dict(raw.get("metrics") or {}),
            raw=raw,
        )
