"""Training of the ``heatnet`` (classifier + fracture-centre heatmap + body-region sigmoids).

Differences from the compact 1.x recipe (:mod:`trainer.train`):

* inputs are kept in memory as 8-bit tensors (the pool is 8-bit JPEG, so this
  is exact) and turned to float per batch;
* :func:`trainer.augment.augment_with_boxes` moves the fracture boxes with the
  image; the heatmap target is built after augmentation
  (:func:`trainer.targets.centre_heatmap`) and learnt with the focal loss;
  fractured images without a box do not train the heatmap;
* the classifier uses balanced class weights; body regions are independent
  sigmoids (several may be present);
* AdamW with a warm-up then cosine learning rate, and an exponential moving
  average of the weights (EMA), which is what is validated, checkpointed and
  shipped;
* after training, the weight of the heatmap peak in the image score is chosen
  on the validation split (:func:`trainer.nets.set_fusion`).

Checkpoints (``checkpoints/last.weights.h5``, ``best.weights.h5``,
``state.json``) let ``--resume`` continue an interrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.loader import load_display_image
from pacs_bridge.imaging.preprocess import PreprocessSpec, preprocess
from trainer import BODY_PARTS
from trainer.augment import RadiographAugment, augment_with_boxes
from trainer.data import DatasetError, Record
from trainer.nets import HEATMAP_STRIDE, NetConfig, build_models, set_fusion
from trainer.targets import centre_heatmap, focal_loss

LOGGER = logging.getLogger(__name__)

__all__ = ["ByteTensors", "choose_fusion", "load_bytes", "train_heatnet"]

MONITOR = "val_classifier_auc"


class ByteTensors:
    """Preprocessed inputs as ``uint8`` ``(N, S, S)`` with the boxes in tensor pixels."""

    def __init__(self, records: Sequence[Record], images: npt.NDArray[np.uint8], boxes: list[npt.NDArray[np.float32]]):
        self.records = list(records)
        self.images = images
        self.boxes = boxes

    @property
    def labels(self) -> npt.NDArray[np.float32]:
        """Fracture labels ``(N, 1)``."""
        return np.array([[r.label] for r in self.records], dtype=np.float32)

    @property
    def body_flags(self) -> npt.NDArray[np.float32]:
        """Body-region flags ``(N, 4)`` (multi-hot)."""
        return np.array([r.body_parts for r in self.records], dtype=np.float32).reshape(-1, len(BODY_PARTS))

    def floats(self, index: npt.NDArray[np.int64] | slice) -> npt.NDArray[np.float32]:
        """Images as float tensors ``(n, S, S, 1)``."""
        return (self.images[index].astype(np.float32) / np.float32(255.0))[..., None]


def load_bytes(records: Sequence[Record], spec: PreprocessSpec) -> ByteTensors:
    """Read and preprocess every record (unit normalisation, one channel) into 8-bit tensors."""
    if spec.normalisation != "unit" or spec.channels != 1:
        raise DatasetError("the heatnet trainer keeps 8-bit tensors: unit normalisation, 1 channel")
    images = np.empty((len(records), spec.size, spec.size), dtype=np.uint8)
    boxes: list[npt.NDArray[np.float32]] = []
    errors: list[str] = []
    for index, rec in enumerate(records):
        try:
            tensor, lb = preprocess(load_display_image(rec.path), spec)
        except (ValueError, OSError) as exc:
            errors.append(f"{rec.path}: {exc}")
            boxes.append(np.zeros((0, 4), np.float32))
            continue
        images[index] = np.clip(tensor[:, :, 0] * 255.0 + 0.5, 0, 255).astype(np.uint8)
        b = np.asarray(rec.boxes, dtype=np.float32).reshape(-1, 4) * np.float32(lb.scale)
        b[:, [0, 2]] += lb.pad_x
        b[:, [1, 3]] += lb.pad_y
        boxes.append(b)
    if errors:
        raise DatasetError(f"{len(errors)} unreadable image(s):\n  " + "\n  ".join(errors[:10]))
    return ByteTensors(records, images, boxes)


def _targets(data: ByteTensors, idx: npt.NDArray[np.int64], size: int, boxes: list[npt.NDArray[np.float32]]) -> Any:
    heat = np.stack([centre_heatmap(b, size, HEATMAP_STRIDE) for b in boxes])
    labels = data.labels[idx]
    heat_weight = np.array(
        [1.0 if (lab[0] < 0.5 or len(b)) else 0.0 for lab, b in zip(labels, boxes, strict=True)], dtype=np.float32
    )
    return heat, heat_weight


def _make_batches(data: ByteTensors, config: Any, augment: RadiographAugment | None):  # type: ignore[no-untyped-def]
    import keras

    labels = data.labels
    flags = data.body_flags
    n = len(labels)
    batch = int(config.batch_size)
    n_pos = float(labels.sum())
    class_weight = {1: n / (2.0 * max(n_pos, 1.0)), 0: n / (2.0 * max(n - n_pos, 1.0))}
    sw_cls = np.where(labels[:, 0] > 0.5, class_weight[1], class_weight[0]).astype(np.float32)
    sw_body = (flags.sum(axis=1) > 0).astype(np.float32)
    size = data.images.shape[1]
    LOGGER.info("class weights: fractured %.3f, not fractured %.3f", class_weight[1], class_weight[0])

    class Batches(keras.utils.PyDataset):  # type: ignore[misc]
        """Shuffled, augmented batches with heatmap targets built after augmentation."""

        def __init__(self) -> None:
            # Two threads: augmenting the next batch (OpenCV/numpy release the GIL) overlaps the training step.
            super().__init__(workers=2, use_multiprocessing=False)
            self.seed = config.seed
            self.rng = np.random.default_rng(config.seed)
            self.order = self.rng.permutation(n)

        def __len__(self) -> int:
            return math.ceil(n / batch)

        def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
            idx = np.sort(self.order[index * batch : (index + 1) * batch])
            images = data.floats(idx)
            boxes = [data.boxes[i] for i in idx]
            if augment is not None:
                # One generator per batch (seeded by epoch order and index): reproducible whatever thread runs it.
                rng = np.random.default_rng([self.seed, int(self.order[0]), index])
                pairs = [augment_with_boxes(img, b, rng, augment) for img, b in zip(images, boxes, strict=True)]
                images = np.stack([p[0] for p in pairs])
                boxes = [p[1] for p in pairs]
            heat, heat_weight = _targets(data, idx, size, boxes)
            targets = {"classifier": labels[idx], "heatmap": heat, "body_part": flags[idx]}
            weights = {"classifier": sw_cls[idx], "heatmap": heat_weight, "body_part": sw_body[idx]}
            return images, targets, weights

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(n)

    return Batches()


def _validation(data: ByteTensors) -> tuple[Any, Any, Any]:
    size = data.images.shape[1]
    heat, heat_weight = _targets(data, np.arange(len(data.records)), size, data.boxes)
    flags = data.body_flags
    return (
        data.floats(slice(None)),
        {"classifier": data.labels, "heatmap": heat, "body_part": flags},
        {
            "classifier": np.ones(len(flags), np.float32),
            "heatmap": heat_weight,
            "body_part": (flags.sum(axis=1) > 0).astype(np.float32),
        },
    )


def choose_fusion(
    labels: npt.NDArray[Any], classifier: npt.NDArray[Any], peak: npt.NDArray[Any]
) -> tuple[float, dict[str, float]]:
    """The heatmap-peak weight in ``{0, 0.25, 0.5, 0.75, 1}`` with the best validation ROC AUC (ties: lower)."""
    from trainer.metrics import roc_auc

    table = {f"{w:.2f}": roc_auc(labels, (1 - w) * classifier + w * peak) for w in (0.0, 0.25, 0.5, 0.75, 1.0)}
    best = max(table, key=lambda k: (table[k], -float(k)))
    return float(best), table


def train_heatnet(config: Any, splits: dict[str, list[Record]], started: float) -> dict[str, Any]:
    """Train the heatnet described by ``config`` (a :class:`trainer.train.TrainConfig`); returns the record."""
    import keras

    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    spec = config.preprocess_spec()
    LOGGER.info("reading and preprocessing images at %d px", spec.size)
    train_set = load_bytes(splits["train"], spec)
    val_set = load_bytes(splits["val"], spec)
    LOGGER.info("tensors ready in %.0f s", time.monotonic() - started)

    full, model = build_models(
        NetConfig(
            arch=config.arch,
            size=config.size,
            channels=1,
            width=config.width,
            dropout=config.dropout,
            weights=config.weights,
            frozen_stages=config.frozen_stages,
        )
    )
    batches = _make_batches(train_set, config, RadiographAugment() if config.augment else None)
    steps = len(batches)
    warmup = min(steps * 2, steps * config.epochs // 4)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate * 0.1,
        decay_steps=max(1, steps * config.epochs - warmup),
        alpha=0.02,
        warmup_target=config.learning_rate,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=config.weight_decay, use_ema=True, ema_momentum=config.ema_momentum
    )
    model.compile(
        optimizer=optimizer,
        loss={"classifier": "binary_crossentropy", "heatmap": focal_loss(), "body_part": "binary_crossentropy"},
        loss_weights={"classifier": 1.0, "heatmap": config.heatmap_weight, "body_part": config.body_part_weight},
        metrics={"classifier": [keras.metrics.AUC(name="auc")]},
    )

    state_path = ckpt_dir / "state.json"
    last_path = ckpt_dir / "last.weights.h5"
    best_path = ckpt_dir / "best.weights.h5"
    initial_epoch, previous_seconds, best_value, best_epoch = 0, 0.0, None, 0
    if config.resume and state_path.is_file() and last_path.is_file():
        state = json.loads(state_path.read_text())
        model.optimizer.build(model.trainable_variables)
        model.load_weights(last_path)
        initial_epoch = int(state["epoch"])
        previous_seconds = float(state.get("seconds", 0.0))
        best_value = state.get("best")
        best_epoch = int(state.get("best_epoch", 0))
        model.optimizer.iterations.assign(initial_epoch * steps)
        LOGGER.info("resuming after epoch %d (best %s at epoch %d)", initial_epoch, best_value, best_epoch)
    elif config.resume:
        LOGGER.warning("--resume given but no checkpoint in %s; starting afresh", ckpt_dir)

    best_ckpt = keras.callbacks.ModelCheckpoint(
        best_path, monitor=MONITOR, mode="max", save_best_only=True, save_weights_only=True
    )
    if best_value is not None:
        best_ckpt.best = best_value
    run_started = time.monotonic()

    class State(keras.callbacks.Callback):  # type: ignore[misc]
        """Saves the last (EMA) weights and the resume state; stops when the time budget is spent."""

        def __init__(self) -> None:
            super().__init__()
            self.best, self.best_epoch = best_value, best_epoch
            self.epoch_started = time.monotonic()
            self.epoch_seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.epoch_started = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            value = (logs or {}).get(MONITOR)
            if value is not None and (self.best is None or value > self.best):
                self.best, self.best_epoch = float(value), epoch + 1
            model.save_weights(last_path)
            spent = previous_seconds + time.monotonic() - run_started
            state_path.write_text(
                json.dumps({"epoch": epoch + 1, "best": self.best, "best_epoch": self.best_epoch, "seconds": spent})
            )
            self.epoch_seconds.append(time.monotonic() - self.epoch_started)
            if config.max_minutes and spent + float(np.mean(self.epoch_seconds[-3:])) > config.max_minutes * 60.0:
                LOGGER.info("time budget of %.0f min reached after epoch %d", config.max_minutes, epoch + 1)
                model.stop_training = True

    state_cb = State()
    callbacks: list[Any] = [
        keras.callbacks.SwapEMAWeights(swap_on_epoch=True),
        best_ckpt,
        state_cb,
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=initial_epoch > 0),
    ]
    val_x, val_y, val_w = _validation(val_set)
    history = model.fit(
        batches,
        validation_data=(val_x, val_y, val_w),
        validation_batch_size=32,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        verbose=config.verbose,
    )
    epochs_run = initial_epoch + len(history.history.get("loss", []))
    if best_path.is_file():
        model.load_weights(best_path)
        LOGGER.info("restored best EMA weights (epoch %d, %s %.4f)", state_cb.best_epoch, MONITOR, state_cb.best or 0.0)
    outputs = full.predict(val_x, batch_size=32, verbose=0)
    classifier = model.predict(val_x, batch_size=32, verbose=0)["classifier"][:, 0]
    peak = np.asarray(outputs["heatmap"]).reshape(len(val_x), -1).max(axis=1)
    fusion, table = choose_fusion(val_set.labels[:, 0], classifier, peak)
    set_fusion(full, fusion)
    LOGGER.info("validation ROC AUC by heatmap-peak weight %s; chosen %.2f", table, fusion)
    full.save(out / "model.keras")
    return {
        "epochs_run": epochs_run,
        "best_epoch": state_cb.best_epoch,
        "best_val_auc": state_cb.best,
        "fusion_weight": fusion,
        "fusion_val_auc": table,
        "duration_seconds": round(previous_seconds + time.monotonic() - run_started, 1),
        "threads": config.threads or os.cpu_count(),
        "config_dump": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
