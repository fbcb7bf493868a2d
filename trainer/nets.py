"""Network definitions: a compact CNN and optional ``keras.applications`` backbones.

Every network ends in global average pooling over its last convolutional
feature maps ``F`` (``[N, h, w, C]``) followed by two heads:

* ``probability``: ``sigmoid(GAP(F) . w + b)``, the fracture probability;
* ``body_part``: a softmax over :data:`trainer.BODY_PARTS`.

The class-activation map is computed in the graph by applying the *same*
dense layer of the probability head to every position of ``F``:
``heatmap = sigmoid(F . w + b)`` with shape ``[N, h, w]``. Because the
pooling is linear, the mean of the pre-sigmoid map equals the logit of
``probability``, so the map shows where the evidence for the prediction is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from trainer import BODY_PARTS

LOGGER = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "HEATMAP_ARCHITECTURES",
    "HEATMAP_STRIDE",
    "NetConfig",
    "build_heatnet",
    "build_models",
    "lite0_features",
    "set_fusion",
]

HEATMAP_STRIDE = 8
"""The ``heatnet`` heatmap is ``size / HEATMAP_STRIDE`` on a side."""

ARCHITECTURES: tuple[str, ...] = (
    "compact",
    "heatnet",
    "heatnet-lite0",
    "mobilenetv2",
    "efficientnetb0",
    "densenet121",
)

HEATMAP_ARCHITECTURES: tuple[str, ...] = ("heatnet", "heatnet-lite0")
"""Networks with the fracture-centre heatmap head (trained by :mod:`trainer.heatnet_train`)."""


@dataclass(frozen=True)
class NetConfig:
    """Architecture choice.

    ``width`` is the first stage's filter count (compact net); without
    ``final_pool`` the compact net's last stage keeps 1/16 of the input
    resolution, so the heatmap is ``size / 16`` on a side.
    """

    arch: str = "compact"
    size: int = 256
    channels: int = 1
    width: int = 24
    dropout: float = 0.3
    weights: str | None = None
    final_pool: bool = False
    frozen_stages: int = 0
    """``heatnet-lite0``: keep the stem and this many first stages fixed (weights and batch-norm statistics)."""


def _compact_features(inputs, cfg: NetConfig):  # type: ignore[no-untyped-def]
    """Plain VGG-like stack with batch norm: stem, then four stages halving resolution."""
    from keras import layers

    def conv(x, filters: int, stride: int = 1, name: str = ""):  # type: ignore[no-untyped-def]
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x)

    w = cfg.width
    x = conv(inputs, w, stride=2, name="stem")
    stages = (w, 2 * w, 4 * w, 8 * w, 12 * w)
    for index, filters in enumerate(stages):
        if index > 0 and (index < len(stages) - 1 or cfg.final_pool):
            x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
        x = conv(x, filters, name=f"s{index}a")
        if index > 0:
            x = conv(x, filters, name=f"s{index}b")
    return x


def _application_features(inputs, cfg: NetConfig):  # type: ignore[no-untyped-def]
    """Feature maps of a ``keras.applications`` backbone (3 channels fed from the input)."""
    import keras
    from keras import layers

    x = inputs
    if cfg.channels == 1:
        x = layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    shape = (cfg.size, cfg.size, 3)
    builders = {
        "mobilenetv2": keras.applications.MobileNetV2,
        "efficientnetb0": keras.applications.EfficientNetB0,
        "densenet121": keras.applications.DenseNet121,
    }
    backbone = builders[cfg.arch](include_top=False, weights=cfg.weights, input_shape=shape)
    return backbone(x)


def build_models(cfg: NetConfig):  # type: ignore[no-untyped-def]
    """Return ``(full_model, train_model)`` sharing all layers.

    ``full_model`` has the outputs ``probability`` ``[N, 1]``, ``heatmap``
    ``[N, h, w]`` and ``body_part`` ``[N, 4]`` (this is the model that is
    saved and exported); ``train_model`` has only the two supervised outputs.
    """
    import keras
    from keras import layers

    if cfg.arch in HEATMAP_ARCHITECTURES:
        return build_heatnet(cfg)
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {cfg.arch!r}; choose from {ARCHITECTURES}")
    inputs = keras.Input(shape=(cfg.size, cfg.size, cfg.channels), name="image")
    features = _compact_features(inputs, cfg) if cfg.arch == "compact" else _application_features(inputs, cfg)
    pooled = layers.GlobalAveragePooling2D(name="gap")(features)
    dropped = layers.Dropout(cfg.dropout, name="dropout")(pooled)
    fracture_dense = layers.Dense(1, name="fracture_logit")
    logit = fracture_dense(dropped)
    probability = layers.Activation("sigmoid", name="probability")(logit)
    body_part = layers.Dense(len(BODY_PARTS), activation="softmax", name="body_part")(dropped)
    cam_logits = fracture_dense(features)
    h, w = int(features.shape[1]), int(features.shape[2])
    cam = layers.Reshape((h, w), name="cam_logits")(cam_logits)
    heatmap = layers.Activation("sigmoid", name="heatmap")(cam)
    full = keras.Model(
        inputs, {"probability": probability, "heatmap": heatmap, "body_part": body_part}, name=f"fracture_{cfg.arch}"
    )
    train = keras.Model(inputs, {"probability": probability, "body_part": body_part}, name=f"train_{cfg.arch}")
    LOGGER.info("built %s: %d parameters, heatmap %dx%d", cfg.arch, full.count_params(), h, w)
    return full, train


def _heatnet_features(inputs, cfg: NetConfig):  # type: ignore[no-untyped-def]
    """Cheap stem (one stride-4 convolution: 1/4), then stages at 1/8, 1/16, 1/32 with residual blocks."""
    from keras import layers

    def conv(x, filters: int, stride: int = 1, name: str = "", relu: bool = True):  # type: ignore[no-untyped-def]
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    def residual(x, filters: int, name: str):  # type: ignore[no-untyped-def]
        y = conv(x, filters, name=f"{name}a")
        y = conv(y, filters, name=f"{name}b", relu=False)
        return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([x, y]))

    w = cfg.width
    # Stem: a 4 x 4 convolution with stride 4 (space-to-depth followed by a 1 x 1 mix), so nothing runs at 1/2.
    x = layers.Conv2D(w, 4, strides=4, padding="valid", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    c3 = conv(conv(x, 2 * w, stride=2, name="s1down"), 2 * w, name="s1a")
    c4 = residual(conv(c3, 4 * w, stride=2, name="s2down"), 4 * w, name="s2r")
    c5 = residual(conv(c4, 8 * w, stride=2, name="s3down"), 8 * w, name="s3r")
    return c3, c4, c5


def lite0_features(inputs, cfg: NetConfig):  # type: ignore[no-untyped-def]
    """EfficientNet-Lite0 (no squeeze-excite, ReLU6) from standard Keras layers: features at 1/8, 1/16, 1/32.

    The input in ``[0, 1]`` is mapped to ``[-1, 1]`` (the Lite models'
    ``(x - 127) / 128`` on 8-bit pixels). The 1/32 output is the 1280-channel
    head convolution. With ``cfg.weights == "imagenet"`` the ImageNet weights
    of :mod:`trainer.pretrained` are loaded into the layers named ``lite0_*``.
    Stochastic depth (drop rate rising to 0.2 over the blocks) as in the
    original training.
    """
    from keras import layers

    from trainer.pretrained import LITE0_STAGES

    def conv_bn(x, filters: int, kernel: int, stride: int, name: str, act: bool = True):  # type: ignore[no-untyped-def]
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x

    x = layers.Rescaling(2.0, offset=-1.0, name="lite0_scale")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="lite0_stem_conv")(x)
    x = layers.BatchNormalization(epsilon=1e-3, name="lite0_stem_bn")(x)
    x = layers.ReLU(6.0, name="lite0_stem_relu")(x)
    total = sum(stage[0] for stage in LITE0_STAGES)
    block, channels, taps = 0, 32, []
    for stage, (repeats, kernel, stride, expansion, filters) in enumerate(LITE0_STAGES):
        for rep in range(repeats):
            name = f"lite0_b{stage}_{rep}"
            y = x
            if expansion != 1:
                y = conv_bn(y, channels * expansion, 1, 1, f"{name}_expand")
            y = layers.DepthwiseConv2D(
                kernel, strides=stride if rep == 0 else 1, padding="same", use_bias=False, name=f"{name}_dw"
            )(y)
            y = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_dw_bn")(y)
            y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
            y = conv_bn(y, filters, 1, 1, f"{name}_project", act=False)
            if rep > 0:
                rate = 0.2 * block / total
                if rate > 0:
                    y = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(y)
                y = layers.Add(name=f"{name}_add")([x, y])
            x, channels, block = y, filters, block + 1
        taps.append(x)
    head = conv_bn(x, 1280, 1, 1, "lite0_head_conv")
    return taps[2], taps[4], head


def _load_lite0_imagenet(model, channels: int) -> None:  # type: ignore[no-untyped-def]
    """Set the ``lite0_*`` layers of ``model`` from the ImageNet checkpoint."""
    from trainer.pretrained import lite0_keras_weights, lite0_weights_path, read_legacy_state_dict

    weights = lite0_keras_weights(read_legacy_state_dict(lite0_weights_path()), channels)
    names = {layer.name for layer in model.layers if layer.name.startswith("lite0_") and layer.weights}
    missing = names.symmetric_difference(weights)
    if missing:
        raise ValueError(f"ImageNet weights and network disagree on layers {sorted(missing)[:5]}")
    for name, values in weights.items():
        model.get_layer(name).set_weights(values)
    LOGGER.info("loaded ImageNet EfficientNet-Lite0 weights into %d layers", len(weights))


def build_heatnet(cfg: NetConfig):  # type: ignore[no-untyped-def]
    """The 2.x network: image classifier, fracture-centre heatmap at 1/8, body-region sigmoids.

    ``cfg.arch`` picks the feature extractor: ``heatnet`` (the compact
    residual net trained from scratch) or ``heatnet-lite0`` (EfficientNet-Lite0,
    optionally from ImageNet weights).

    Returns ``(full_model, train_model)``. ``full_model`` outputs
    ``probability`` ``[N, 1]`` (the fused score, see :func:`set_fusion`),
    ``heatmap`` ``[N, size/8, size/8]`` (per-cell probability that a fracture
    centre lies there) and ``body_part`` ``[N, 4]`` (independent sigmoids).
    ``train_model`` outputs ``classifier`` (the pooled classifier alone),
    ``heatmap`` and ``body_part``.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(cfg.size, cfg.size, cfg.channels), name="image")
    c3, c4, c5 = lite0_features(inputs, cfg) if cfg.arch == "heatnet-lite0" else _heatnet_features(inputs, cfg)
    pooled = layers.GlobalAveragePooling2D(name="gap")(c5)
    dropped = layers.Dropout(cfg.dropout, name="dropout")(pooled)
    classifier = layers.Dense(1, activation="sigmoid", name="classifier")(dropped)
    body_part = layers.Dense(len(BODY_PARTS), activation="sigmoid", name="body_part")(dropped)
    lateral = 2 * cfg.width
    p5 = layers.Conv2D(lateral, 1, name="fpn5")(c5)
    p4 = layers.Add(name="fpn4_add")(
        [layers.UpSampling2D(2, name="fpn5_up")(p5), layers.Conv2D(lateral, 1, name="fpn4")(c4)]
    )
    p3 = layers.Add(name="fpn3_add")(
        [layers.UpSampling2D(2, name="fpn4_up")(p4), layers.Conv2D(lateral, 1, name="fpn3")(c3)]
    )
    h = layers.Conv2D(32, 3, padding="same", use_bias=False, name="head_conv")(p3)
    h = layers.BatchNormalization(name="head_bn")(h)
    h = layers.ReLU(name="head_relu")(h)
    # Bias so that every cell starts near 1 % (focal-loss practice: no flood of confident negatives at start).
    logits = layers.Conv2D(1, 1, name="heat_logits", bias_initializer=keras.initializers.Constant(-4.6))(h)
    heat4 = layers.Activation("sigmoid", name="heat_sigmoid")(logits)
    side = cfg.size // HEATMAP_STRIDE
    heatmap = layers.Reshape((side, side), name="heatmap")(heat4)
    peak = layers.GlobalMaxPooling2D(name="heat_peak")(heat4)
    both = layers.Concatenate(name="scores")([classifier, peak])
    fusion = layers.Dense(
        1, use_bias=False, trainable=False, name="probability", kernel_initializer=keras.initializers.Constant(0.5)
    )
    probability = fusion(both)
    full = keras.Model(
        inputs, {"probability": probability, "heatmap": heatmap, "body_part": body_part}, name="fracture_heatnet"
    )
    train = keras.Model(
        inputs, {"classifier": classifier, "heatmap": heatmap, "body_part": body_part}, name="train_heatnet"
    )
    if cfg.arch == "heatnet-lite0" and cfg.weights == "imagenet":
        _load_lite0_imagenet(full, cfg.channels)
    if cfg.arch == "heatnet-lite0" and cfg.frozen_stages:
        frozen = ("lite0_stem_", *(f"lite0_b{stage}_" for stage in range(cfg.frozen_stages)))
        for layer in full.layers:
            if layer.name.startswith(frozen):
                layer.trainable = False
    LOGGER.info("built %s: %d parameters, heatmap %dx%d", cfg.arch, full.count_params(), side, side)
    return full, train


def set_fusion(full_model, weight: float) -> None:  # type: ignore[no-untyped-def]
    """Score = ``(1 - weight) * classifier + weight * heatmap peak`` (weight chosen on validation)."""
    layer = full_model.get_layer("probability")
    layer.set_weights([np.array([[1.0 - weight], [weight]], dtype=np.float32)])
