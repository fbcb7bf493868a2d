"""The ImageNet EfficientNet-Lite0 weights: read safely, mapped exactly onto the Keras network.

``tests/fixtures/pretrained/lite0-reference.npz`` holds the features that the
PyTorch reference implementation computes on a fixed pattern (see
``make_lite0_reference.py`` there); the Keras network built by
``trainer.nets.lite0_features`` must reproduce them from the same weights.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from trainer.pretrained import PretrainedError, lite0_keras_weights, lite0_weights_path, read_legacy_state_dict

pytestmark = [pytest.mark.train]

REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "pretrained" / "lite0-reference.npz"


def _pattern() -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) / 63.0
    image = 0.5 + 0.3 * np.sin(7 * xx + 3 * yy) * np.cos(5 * yy) + 0.15 * xx
    return image[None, :, :, None].astype(np.float32)


def _legacy_file(path: Path, payload: bytes) -> Path:
    with path.open("wb") as handle:
        pickle.dump(0x1950A86A20F9469CFC6C, handle)
        pickle.dump(1001, handle)
        pickle.dump({"protocol_version": 1001, "little_endian": True}, handle)
        handle.write(payload)
    return path


def test_reads_the_packaged_checkpoint() -> None:
    state = read_legacy_state_dict(lite0_weights_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")
    mapped = lite0_keras_weights(state, channels=1)
    assert mapped["lite0_stem_conv"][0].shape == (3, 3, 1, 32)
    np.testing.assert_allclose(
        mapped["lite0_stem_conv"][0][..., 0, :], state["_conv_stem.weight"].sum(axis=1).transpose(1, 2, 0), rtol=1e-6
    )
    assert mapped["lite0_b6_0_dw"][0].shape == (3, 3, 1152, 1)


def test_refuses_a_checkpoint_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = _legacy_file(tmp_path / "evil.pth", pickle.dumps(_Runs(str(marker)), protocol=2))
    with pytest.raises(PretrainedError, match="refusing to load"):
        read_legacy_state_dict(evil)
    assert not marker.exists()


class _Runs:
    """Pickles as a call to ``os.system`` (what a hostile checkpoint would hold)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.path}",)


def test_truncated_and_foreign_files_get_a_clear_error(tmp_path: Path) -> None:
    whole = lite0_weights_path().read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(PretrainedError, match="truncated"):
        read_legacy_state_dict(cut)
    text = tmp_path / "notes.pth"
    text.write_bytes(b"not a checkpoint at all\n")
    with pytest.raises(PretrainedError):
        read_legacy_state_dict(text)
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(PretrainedError, match="zip-format"):
        read_legacy_state_dict(zipped)
    wrong = _legacy_file(tmp_path / "wrong.pth", pickle.dumps({"x": 1}, protocol=2) + pickle.dumps([], protocol=2))
    with pytest.raises(PretrainedError, match="lacks"):
        lite0_keras_weights(read_legacy_state_dict(wrong), channels=1)


def test_keras_lite0_reproduces_the_pytorch_reference() -> None:
    pytest.importorskip("tensorflow")
    import keras

    from trainer.nets import HEATMAP_STRIDE, NetConfig, build_models

    full, _train = build_models(NetConfig(arch="heatnet-lite0", size=64, channels=1, weights="imagenet"))
    features = keras.Model(full.input, full.get_layer("lite0_head_conv_relu").output)
    got = features.predict(_pattern(), verbose=0)
    want = np.load(REFERENCE)["features"]
    assert got.shape == want.shape == (1, 2, 2, 1280)
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert full.output["heatmap"].shape[1] == 64 // HEATMAP_STRIDE


def test_frozen_stages_keep_their_weights() -> None:
    pytest.importorskip("tensorflow")
    from trainer.nets import NetConfig, build_models

    full, train = build_models(NetConfig(arch="heatnet-lite0", size=64, channels=1, frozen_stages=3))
    frozen = [layer.name for layer in full.layers if layer.weights and not layer.trainable]
    assert "lite0_stem_conv" in frozen and "lite0_b2_1_project" in frozen
    assert full.get_layer("lite0_b3_0_expand").trainable and full.get_layer("heat_logits").trainable
    assert not any(name.startswith("lite0_b3") for name in frozen)
    assert len(train.trainable_weights) < len(train.weights)
