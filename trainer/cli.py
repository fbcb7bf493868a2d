"""Command-line entry points: ``train``, ``evaluate`` and ``export``.

Each ``*_main(argv)`` parses its own arguments and returns an exit status,
so ``pacs-bridge train|evaluate|export`` can delegate to them directly.
Dataset problems are reported as one clear message with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from trainer.nets import ARCHITECTURES

LOGGER = logging.getLogger(__name__)

__all__ = ["default_data_dir", "evaluate_main", "export_main", "main", "train_main"]

DATA_ENV = "PACS_BRIDGE_FRACATLAS"


def default_data_dir() -> Path:
    """FracAtlas pool: ``$PACS_BRIDGE_FRACATLAS`` or ``../shared/data/fracatlas`` beside the repository."""
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fracatlas"


def _setup_logging(verbose: bool = False) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )


def _command(prog: str, argv: list[str]) -> str:
    return " ".join(["pacs-bridge", prog, *(shlex.quote(a) for a in argv)])


def _fraction(text: str) -> float:
    """An argparse type: a rate in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pacs-bridge train", description="Train the fracture-detection CNN.")
    p.add_argument(
        "--data", type=Path, default=None, help="dataset: FracAtlas folder, train/val/test folders or a path,label CSV"
    )
    p.add_argument("--layout", choices=("auto", "fracatlas", "folders", "mura"), default="auto")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, model.keras, splits.csv)")
    p.add_argument("--split-file", type=Path, default=None, help="reuse a splits.csv instead of drawing a split")
    p.add_argument("--seed", type=int, default=20231)
    p.add_argument("--size", type=int, default=256, help="input square side in pixels")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--clahe-clip", type=float, default=0.0)
    p.add_argument("--arch", choices=ARCHITECTURES, default="compact")
    p.add_argument(
        "--width",
        type=int,
        default=16,
        help="first-stage filters of the compact net and heatnet; heatnet FPN width is twice this",
    )
    p.add_argument("--weights", choices=("none", "imagenet"), default="none", help="backbone initial weights")
    p.add_argument(
        "--frozen-stages",
        type=int,
        default=0,
        choices=range(8),
        metavar="N",
        help="heatnet-lite0: keep the stem and the first N of 7 stages fixed (0-7)",
    )
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=("plateau", "cosine"), default="plateau")
    p.add_argument("--patience", type=int, default=8, help="early-stopping patience (epochs)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop after this much wall-clock time")
    p.add_argument("--limit", type=int, default=None, help="use a class-balanced subset of this many images")
    p.add_argument("--include-truncated", action="store_true", help="keep images flagged source_truncated")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--weight-decay", type=float, default=0.02, help="AdamW decoupled weight decay (heatnet)")
    p.add_argument("--ema", type=float, default=0.995, help="weight EMA momentum (heatnet)")
    p.add_argument("--heatmap-weight", type=float, default=0.25, help="focal-loss weight of the heatmap (heatnet)")
    p.add_argument("--body-part-weight", type=float, default=0.3)
    p.add_argument(
        "--grouped", action="store_true", help="split by duplicate group (exact + perceptual hash), drop contradictions"
    )
    p.add_argument(
        "--keep-test-from", type=Path, default=None, help="grouped: test split only inside this splits.csv's test"
    )
    p.add_argument("--folds", type=int, default=5, help="grouped: stratified folds of the non-test pool")
    p.add_argument("--cv-fold", type=int, default=0, help="grouped: the fold used as validation split")
    p.add_argument("--threads", type=int, default=None, help="TensorFlow intra-op threads")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None, help="Keras progress (1 = bar)")
    return p


def train_main(argv: list[str]) -> int:
    """``pacs-bridge train``: returns 0 on success, 2 on a dataset error."""
    args = _train_parser().parse_args(argv)
    _setup_logging()
    from trainer.data import DatasetError
    from trainer.train import TrainConfig, train

    config = TrainConfig(
        data=args.data or default_data_dir(),
        out=args.out,
        layout=args.layout,
        split_file=args.split_file,
        seed=args.seed,
        size=args.size,
        channels=args.channels,
        clahe_clip=args.clahe_clip,
        arch=args.arch,
        width=args.width,
        weights=None if args.weights == "none" else args.weights,
        frozen_stages=args.frozen_stages,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_schedule=args.lr_schedule,
        patience=args.patience,
        max_minutes=args.max_minutes,
        limit=args.limit,
        include_truncated=args.include_truncated,
        augment=not args.no_augment,
        dropout=args.dropout,
        weight_decay=args.weight_decay,
        ema_momentum=args.ema,
        heatmap_weight=args.heatmap_weight,
        body_part_weight=args.body_part_weight,
        grouped=args.grouped,
        keep_test_from=args.keep_test_from,
        folds=args.folds,
        cv_fold=args.cv_fold,
        threads=args.threads,
        resume=args.resume,
        verbose=args.verbose if args.verbose is not None else (1 if sys.stdout.isatty() else 2),
        command=_command("train", argv),
    )
    try:
        result = train(config)
    except DatasetError as exc:
        LOGGER.error("dataset error: %s", exc)
        return 2
    LOGGER.info(
        "done: %s (best epoch %d, validation AUC %.4f, %.0f s)",
        result.model_path,
        result.best_epoch,
        result.best_val_auc,
        result.duration_seconds,
    )
    return 0


def export_main(argv: list[str]) -> int:
    """``pacs-bridge export``: Keras run folder -> model folder with ``model.onnx`` + ``model.json``."""
    p = argparse.ArgumentParser(prog="pacs-bridge export", description="Export a trained model to ONNX.")
    p.add_argument("--run", type=Path, required=True, help="training run folder (model.keras, training.json)")
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--name", default="fracatlas-cnn")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--data", type=Path, default=None, help="dataset for the parity check (default: the training data)")
    p.add_argument("--parity-images", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--no-keras", action="store_true", help="do not copy model.keras into the model folder")
    p.add_argument(
        "--min-box-score", type=float, default=0.2, help="centre heatmaps: least peak value that gives a box"
    )
    p.add_argument(
        "--flagged-box-score",
        type=float,
        default=0.05,
        help="centre heatmaps: least value of a flagged image's strongest peak (boxes follow the call)",
    )
    args = p.parse_args(argv)
    _setup_logging()
    from trainer.data import DatasetError
    from trainer.export import ExportError, export

    try:
        export(
            run_dir=args.run,
            out_dir=args.out,
            name=args.name,
            version=args.version,
            data=args.data,
            parity_images=args.parity_images,
            tolerance=args.tolerance,
            keep_keras=not args.no_keras,
            min_box_score=args.min_box_score,
            flagged_box_score=args.flagged_box_score,
        )
    except (ExportError, DatasetError) as exc:
        LOGGER.error("export failed: %s", exc)
        return 1
    return 0


def evaluate_main(argv: list[str]) -> int:
    """``pacs-bridge evaluate``: metrics, plots and report of an exported model folder."""
    p = argparse.ArgumentParser(prog="pacs-bridge evaluate", description="Evaluate an exported model.")
    p.add_argument("--model", type=Path, required=True, help="model folder (model.onnx, model.json, splits.csv)")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: FracAtlas pool)")
    p.add_argument("--split-file", type=Path, default=None, help="default: <model>/splits.csv")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: the model folder)")
    p.add_argument("--history", type=Path, default=None, help="history.csv for training curves")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument(
        "--min-sensitivity",
        type=_fraction,
        default=0.90,
        help="threshold rule (default): the highest threshold with this validation sensitivity (default 0.90)",
    )
    rule.add_argument(
        "--min-specificity",
        type=_fraction,
        default=None,
        help="threshold rule instead: the lowest threshold with this validation specificity",
    )
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--no-update-manifest", action="store_true", help="do not write threshold/metrics to model.json")
    p.add_argument(
        "--compare", type=Path, default=None, help="another model folder: paired DeLong test on the same test images"
    )
    args = p.parse_args(argv)
    _setup_logging()
    from trainer.data import DatasetError
    from trainer.evaluate import evaluate

    try:
        evaluate(
            model_dir=args.model,
            data=args.data or default_data_dir(),
            split_file=args.split_file,
            out_dir=args.out,
            history=args.history,
            min_sensitivity=args.min_sensitivity,
            min_specificity=args.min_specificity,
            n_bootstrap=args.bootstrap,
            update_manifest=not args.no_update_manifest,
            command=_command("evaluate", argv),
            compare=args.compare,
        )
    except DatasetError as exc:
        LOGGER.error("dataset error: %s", exc)
        return 2
    return 0


def main(argv: list[str]) -> int:
    """Dispatch ``train|evaluate|export`` (used by ``python -m trainer``)."""
    commands = {"train": train_main, "evaluate": evaluate_main, "export": export_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m trainer {train,evaluate,export} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
