"""Training loop: data, split, model, class weighting, schedule, checkpoints, resume.

``train(config)`` writes into ``config.out``:

* ``splits.csv``: the split used (image, split, label, seed), reproducible;
* ``checkpoints/last.weights.h5`` and ``checkpoints/best.weights.h5``,
  ``checkpoints/state.json`` (for ``--resume``);
* ``history.csv``: per-epoch losses and metrics;
* ``model.keras``: the full model (outputs ``probability``, ``heatmap``,
  ``body_part``) with the best validation weights;
* ``training.json``: command, configuration, split sizes, duration, data
  attribution; copied into the manifest by the exporter;
* ``LICENSE-AND-CITATION.txt``: copied from the dataset when present.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.preprocess import PreprocessSpec
from trainer import BODY_PARTS
from trainer.augment import AugmentConfig, augment_batch, fill_value
from trainer.data import (
    Record,
    TensorSet,
    check_splits,
    load_tensors,
    read_dataset,
    read_split_csv,
    stratified_split,
    write_split_csv,
)
from trainer.nets import HEATMAP_ARCHITECTURES, NetConfig, build_models
from trainer.splitting import read_fold_csv

LOGGER = logging.getLogger(__name__)

__all__ = ["TrainConfig", "TrainResult", "configure_threads", "train"]

LICENCE_FILE = "LICENSE-AND-CITATION.txt"
MONITOR = "val_probability_auc"


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in ``training.json``)."""

    data: Path
    out: Path
    layout: str = "auto"
    split_file: Path | None = None
    seed: int = 20231
    size: int = 256
    channels: int = 1
    clahe_clip: float = 0.0
    arch: str = "compact"
    width: int = 16
    weights: str | None = None
    frozen_stages: int = 0
    epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    lr_schedule: str = "plateau"
    patience: int = 8
    max_minutes: float | None = None
    limit: int | None = None
    include_truncated: bool = False
    augment: bool = True
    body_part_weight: float = 0.3
    dropout: float = 0.3
    weight_decay: float = 0.02
    ema_momentum: float = 0.995
    heatmap_weight: float = 0.25
    grouped: bool = False
    keep_test_from: Path | None = None
    folds: int = 5
    cv_fold: int = 0
    threads: int | None = None
    resume: bool = False
    verbose: int = 2
    command: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def preprocess_spec(self) -> PreprocessSpec:
        """The preprocessing the model is trained with (and shipped in the manifest)."""
        return PreprocessSpec(size=self.size, channels=self.channels, clahe_clip=self.clahe_clip)


@dataclass
class TrainResult:
    """What a finished run produced."""

    out: Path
    model_path: Path
    duration_seconds: float
    epochs_run: int
    best_epoch: int
    best_val_auc: float


def configure_threads(threads: int | None) -> None:
    """Limit TensorFlow's thread pools (call before any TensorFlow op runs)."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    except RuntimeError:
        LOGGER.warning("TensorFlow already initialised; thread limits not applied")


def _limit_records(records: list[Record], limit: int, seed: int) -> list[Record]:
    """A class-balanced random subset of ``limit`` images (for quick runs and tests)."""
    rng = np.random.default_rng(seed)
    chosen: list[Record] = []
    for label in (1, 0):
        group = sorted((r for r in records if r.label == label), key=lambda r: r.image_id)
        take = min(len(group), limit // 2 if label == 1 else limit - len(chosen))
        chosen.extend(group[int(i)] for i in rng.choice(len(group), size=take, replace=False))
    return sorted(chosen, key=lambda r: r.image_id)


def prepare_splits(config: TrainConfig) -> dict[str, list[Record]]:
    """Read the dataset and apply (or create and record) the split; validated before training."""
    records = read_dataset(Path(config.data), config.layout, include_truncated=config.include_truncated)
    if config.limit:
        records = _limit_records(records, config.limit, config.seed)
    split_path = Path(config.out) / "splits.csv"
    source = Path(config.split_file) if config.split_file is not None else None
    if source is None and config.resume and split_path.is_file():
        source = split_path
    if source is not None:
        splits = read_split_csv(source, records)
        fold_of, _ = read_fold_csv(source)
        if fold_of and config.cv_fold != _val_fold(source, fold_of):
            pool = [r for name in ("train", "val") for r in splits[name]]
            splits["val"] = [r for r in pool if fold_of.get(r.image_id) == config.cv_fold]
            splits["train"] = [r for r in pool if fold_of.get(r.image_id) != config.cv_fold]
            LOGGER.info("cross-validation fold %d of %s as validation", config.cv_fold, source)
        if source.resolve() != split_path.resolve():
            shutil.copyfile(source, split_path)
    elif config.grouped:
        from trainer.duplicates import find_groups
        from trainer.splitting import grouped_split, write_grouped_csv

        keep_test = None
        if config.keep_test_from is not None:
            keep_test = [r.image_id for r in read_split_csv(Path(config.keep_test_from), records)["test"]]
        grouped = grouped_split(
            records,
            find_groups(records),
            seed=config.seed,
            folds=config.folds,
            val_fold=config.cv_fold,
            keep_test=keep_test,
        )
        splits = grouped.splits
        write_grouped_csv(split_path, grouped, config.seed)
        (Path(config.out) / "duplicates.json").write_text(
            json.dumps({"dropped_contradictory": grouped.dropped, "groups": _groups(grouped.group_of)}, indent=1)
        )
    else:
        splits = stratified_split(records, seed=config.seed, by_region=not config.limit)
    check_splits(splits)
    if source is None and not config.grouped:
        write_split_csv(split_path, splits, config.seed)
    for name, recs in splits.items():
        LOGGER.info("split %-5s %5d images, %4d fractured", name, len(recs), sum(r.label for r in recs))
    return splits


def _val_fold(path: Path, fold_of: dict[str, int]) -> int | None:
    """The fold that a grouped split file uses as its validation split."""
    import csv

    with Path(path).open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["split"] == "val" and row["image_id"] in fold_of:
                return fold_of[row["image_id"]]
    return None


def _groups(group_of: dict[str, str]) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {}
    for image_id, group in sorted(group_of.items()):
        members.setdefault(group, []).append(image_id)
    return {g: ids for g, ids in members.items() if len(ids) > 1}


def _sample_weights(labels: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], dict[int, float]]:
    """Balanced class weights ``n / (2 n_c)`` as per-sample weights."""
    n = len(labels)
    n_pos = float(labels.sum())
    weights = {1: n / (2.0 * max(n_pos, 1.0)), 0: n / (2.0 * max(n - n_pos, 1.0))}
    per_sample = np.where(labels[:, 0] > 0.5, weights[1], weights[0]).astype(np.float32)
    return per_sample, weights


def _make_batches(tensors: TensorSet, config: TrainConfig, spec: PreprocessSpec):  # type: ignore[no-untyped-def]
    import keras

    labels = tensors.labels
    body = tensors.body_targets
    sw_prob, class_weights = _sample_weights(labels)
    sw_body = (body.sum(axis=1) > 0).astype(np.float32)
    LOGGER.info("class weights: fractured %.3f, not fractured %.3f", class_weights[1], class_weights[0])
    fill = fill_value(spec)
    clip = (0.0, 1.0) if spec.normalisation == "unit" else None
    aug_cfg = AugmentConfig()

    class Batches(keras.utils.PyDataset):  # type: ignore[misc]
        """Shuffled, augmented batches of the in-memory training tensors."""

        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.rng = np.random.default_rng(config.seed)
            self.order = self.rng.permutation(len(labels))

        def __len__(self) -> int:
            return math.ceil(len(labels) / config.batch_size)

        def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
            idx = np.sort(self.order[index * config.batch_size : (index + 1) * config.batch_size])
            images = tensors.images[idx]
            if config.augment:
                images = augment_batch(images, self.rng, aug_cfg, fill, clip)
            targets = {"probability": labels[idx], "body_part": body[idx]}
            weights = {"probability": sw_prob[idx], "body_part": sw_body[idx]}
            return images, targets, weights

        def on_epoch_end(self) -> None:
            self.order = self.rng.permutation(len(labels))

    return Batches()


def _copy_licence(config: TrainConfig) -> None:
    data = Path(config.data)
    source = (data if data.is_dir() else data.parent) / LICENCE_FILE
    target = Path(config.out) / LICENCE_FILE
    if source.is_file():
        shutil.copyfile(source, target)
    if config.arch == "heatnet-lite0" and config.weights == "imagenet":
        from trainer.pretrained import LITE0_PROVENANCE

        with target.open("a", encoding="utf-8") as handle:
            handle.write(f"\n\n{LITE0_PROVENANCE}\n")


def _attribution(config: TrainConfig) -> dict[str, str]:
    data = Path(config.data)
    licence_file = (data if data.is_dir() else data.parent) / LICENCE_FILE
    if licence_file.is_file() and (data / "labels.csv").is_file():
        return {
            "data": "FracAtlas (Abedeen et al., Scientific Data 10, 521, 2023)",
            "licence": "CC BY 4.0",
            "attribution": (
                "Abedeen, I., Rahman, M. A., Prottyasha, F. Z. et al. FracAtlas: A Dataset for "
                "Fracture Classification, Localization and Segmentation of Musculoskeletal "
                "Radiographs. Sci Data 10, 521 (2023). https://doi.org/10.1038/s41597-023-02432-4; "
                "images downscaled; see LICENSE-AND-CITATION.txt"
            ),
        }
    return {"data": str(data.name), "licence": "unknown", "attribution": ""}


def _initial_weights(config: TrainConfig) -> dict[str, str]:
    """Provenance of pretrained weights, when the network started from any."""
    if config.arch == "heatnet-lite0" and config.weights == "imagenet":
        from trainer.pretrained import LITE0_PROVENANCE

        return {"initial_weights": LITE0_PROVENANCE}
    return {}


def train(config: TrainConfig) -> TrainResult:
    """Run a full training; returns where the model is and how it went."""
    import keras

    started = time.monotonic()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    configure_threads(config.threads)
    keras.utils.set_random_seed(config.seed)

    spec = config.preprocess_spec()
    splits = prepare_splits(config)
    if config.arch in HEATMAP_ARCHITECTURES:
        return _train_heatnet(config, splits, spec, started)
    LOGGER.info("reading and preprocessing images at %d px", spec.size)
    train_set = load_tensors(splits["train"], spec)
    val_set = load_tensors(splits["val"], spec)
    LOGGER.info("tensors ready in %.0f s", time.monotonic() - started)

    full, model = build_models(
        NetConfig(
            arch=config.arch, size=config.size, channels=config.channels, width=config.width, weights=config.weights
        )
    )
    batches = _make_batches(train_set, config, spec)
    steps = len(batches)
    learning_rate: Any = config.learning_rate
    if config.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, decay_steps=max(1, steps * config.epochs), alpha=0.02
        )
    elif config.lr_schedule != "plateau":
        raise ValueError(f"unknown lr_schedule {config.lr_schedule!r} (plateau or cosine)")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={"probability": "binary_crossentropy", "body_part": "categorical_crossentropy"},
        loss_weights={"probability": 1.0, "body_part": config.body_part_weight},
        metrics={"probability": [keras.metrics.AUC(name="auc")], "body_part": ["categorical_accuracy"]},
    )

    state_path = ckpt_dir / "state.json"
    last_path = ckpt_dir / "last.weights.h5"
    best_path = ckpt_dir / "best.weights.h5"
    initial_epoch = 0
    previous_seconds = 0.0
    best_value: float | None = None
    best_epoch = 0
    if config.resume and state_path.is_file() and last_path.is_file():
        state = json.loads(state_path.read_text())
        model.optimizer.build(model.trainable_variables)  # so the saved Adam moments are restored too
        model.load_weights(last_path)
        initial_epoch = int(state["epoch"])
        previous_seconds = float(state.get("seconds", 0.0))
        best_value = state.get("best")
        best_epoch = int(state.get("best_epoch", 0))
        if config.lr_schedule == "plateau" and state.get("lr"):
            model.optimizer.learning_rate.assign(float(state["lr"]))
        LOGGER.info("resuming after epoch %d (best %s at epoch %d)", initial_epoch, best_value, best_epoch)
    elif config.resume:
        LOGGER.warning("--resume given but no checkpoint in %s; starting afresh", ckpt_dir)

    best_ckpt = keras.callbacks.ModelCheckpoint(
        best_path, monitor=MONITOR, mode="max", save_best_only=True, save_weights_only=True
    )
    if best_value is not None:
        best_ckpt.best = best_value

    class State(keras.callbacks.Callback):  # type: ignore[misc]
        """Saves the last weights and the resume state; stops when the time budget is spent."""

        def __init__(self) -> None:
            super().__init__()
            self.best = best_value
            self.best_epoch = best_epoch
            self.epoch_started = time.monotonic()
            self.epoch_seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.epoch_started = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            value = logs.get(MONITOR)
            if value is not None and (self.best is None or value > self.best):
                self.best, self.best_epoch = float(value), epoch + 1
            model.save_weights(last_path)
            lr = model.optimizer.learning_rate
            state = {
                "epoch": epoch + 1,
                "best": self.best,
                "best_epoch": self.best_epoch,
                "lr": float(np.asarray(lr.numpy() if hasattr(lr, "numpy") else lr)),
                "seconds": previous_seconds + time.monotonic() - started,
            }
            state_path.write_text(json.dumps(state, indent=2))
            self.epoch_seconds.append(time.monotonic() - self.epoch_started)
            if config.max_minutes:
                spent = previous_seconds + time.monotonic() - started
                if spent + float(np.mean(self.epoch_seconds[-3:])) > config.max_minutes * 60.0:
                    LOGGER.info("time budget of %.0f min reached after epoch %d", config.max_minutes, epoch + 1)
                    model.stop_training = True

    state_cb = State()
    callbacks: list[Any] = [
        best_ckpt,
        state_cb,
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=config.patience, verbose=1),
        keras.callbacks.CSVLogger(str(out / "history.csv"), append=initial_epoch > 0),
    ]
    if config.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=MONITOR, mode="max", factor=0.5, patience=3, min_lr=1e-5, verbose=1
            )
        )
    history = model.fit(
        batches,
        validation_data=(val_set.images, {"probability": val_set.labels, "body_part": val_set.body_targets}),
        validation_batch_size=64,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        verbose=config.verbose,
    )
    epochs_run = initial_epoch + len(history.history.get("loss", []))
    if best_path.is_file():
        model.load_weights(best_path)
        LOGGER.info("restored best weights (epoch %d, %s %.4f)", state_cb.best_epoch, MONITOR, state_cb.best or 0.0)
    model_path = out / "model.keras"
    full.save(model_path)
    duration = previous_seconds + time.monotonic() - started
    _copy_licence(config)
    record = {
        "command": config.command,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "preprocessing": spec.to_manifest(),
        "body_parts": list(BODY_PARTS),
        "split_file": "splits.csv",
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "split_positives": {k: sum(r.label for r in v) for k, v in splits.items()},
        "epochs_run": epochs_run,
        "best_epoch": state_cb.best_epoch,
        "best_val_auc": state_cb.best,
        "duration_seconds": round(duration, 1),
        "threads": config.threads or os.cpu_count(),
        **_attribution(config),
        **_initial_weights(config),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    LOGGER.info("saved %s after %d epoch(s) in %.0f s", model_path, epochs_run, duration)
    return TrainResult(
        out=out,
        model_path=model_path,
        duration_seconds=duration,
        epochs_run=epochs_run,
        best_epoch=state_cb.best_epoch,
        best_val_auc=float(state_cb.best or float("nan")),
    )


def _train_heatnet(
    config: TrainConfig, splits: dict[str, list[Record]], spec: PreprocessSpec, started: float
) -> TrainResult:
    from trainer.heatnet_train import train_heatnet

    out = Path(config.out)
    result = train_heatnet(config, splits, started)
    _copy_licence(config)
    record = {
        "command": config.command,
        "config": result.pop("config_dump"),
        "preprocessing": spec.to_manifest(),
        "body_parts": list(BODY_PARTS),
        "split_file": "splits.csv",
        "split_sizes": {k: len(v) for k, v in splits.items()},
        "split_positives": {k: sum(r.label for r in v) for k, v in splits.items()},
        **result,
        **_attribution(config),
        **_initial_weights(config),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2))
    LOGGER.info(
        "saved %s after %d epoch(s) in %.0f s", out / "model.keras", result["epochs_run"], result["duration_seconds"]
    )
    return TrainResult(
        out=out,
        model_path=out / "model.keras",
        duration_seconds=float(result["duration_seconds"]),
        epochs_run=int(result["epochs_run"]),
        best_epoch=int(result["best_epoch"]),
        best_val_auc=float(result["best_val_auc"] or float("nan")),
    )
