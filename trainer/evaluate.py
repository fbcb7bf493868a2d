"""Evaluation of an exported model folder on the validation and test splits.

The model is run as the service runs it: images are read with
:func:`pacs_bridge.imaging.loader.load_display_image`, preprocessed with
:func:`pacs_bridge.imaging.preprocess.preprocess` using the manifest's
``preprocessing`` block, and the ONNX graph is executed through
:func:`pacs_bridge.inference.model.load_model` (which also validates the
manifest and the checksum). When that module is not importable, ONNX Runtime
is used directly with the same inputs.

Steps: choose the decision threshold on the validation split (highest
threshold with validation sensitivity >= ``min_sensitivity``), compute the
test-split metrics with bootstrap 95% intervals, per body region, the
localisation check of the heatmap against the fracture boxes, write PNG
plots, ``metrics.json`` and ``report.md``, and (optionally) record the
threshold and metrics in ``model.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pacs_bridge.imaging.loader import load_display_image
from pacs_bridge.imaging.preprocess import Letterbox, PreprocessSpec, preprocess, to_original
from trainer import BODY_PARTS
from trainer.data import Record, read_dataset, read_split_csv
from trainer.metrics import (
    binary_metrics,
    bootstrap_ci,
    box_area_fraction,
    choose_threshold,
    peak_in_boxes,
)
from trainer.plots import (
    plot_calibration,
    plot_confusion,
    plot_heatmaps,
    plot_pr,
    plot_roc,
    plot_training_curves,
)

LOGGER = logging.getLogger(__name__)

__all__ = ["Predictions", "evaluate", "predict_records"]


@dataclass
class Predictions:
    """Model outputs for a list of records, in order."""

    records: list[Record]
    probability: npt.NDArray[np.float32]
    heatmaps: list[npt.NDArray[np.float32]]
    body_part: npt.NDArray[np.float32] | None
    letterboxes: list[Letterbox]

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        """Ground-truth fracture labels."""
        return np.array([r.label for r in self.records], dtype=np.int64)


class _Runner:
    """The service's model loader when available, else a plain ONNX Runtime session."""

    def __init__(self, model_dir: Path) -> None:
        self.backend = "pacs_bridge.inference.model.load_model"
        self.session: Any = None
        loader: Any
        try:
            from pacs_bridge.inference.model import load_model as loader
        except ImportError:
            loader = None
        if loader is not None:
            self.model: Any = loader(model_dir, providers="cpu")
            self.spec: PreprocessSpec = self.model.manifest.preprocessing
            self.manifest: dict[str, Any] = dict(self.model.manifest.raw)
            return
        import onnxruntime as ort

        self.backend = "onnxruntime (direct)"
        self.manifest = json.loads((model_dir / "model.json").read_text())
        self.spec = PreprocessSpec.from_manifest(self.manifest["preprocessing"])
        self.session = ort.InferenceSession(
            str(model_dir / self.manifest["onnx_file"]), providers=["CPUExecutionProvider"]
        )
        self.model = None

    def predict(self, batch: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.float32]]:
        if self.model is not None:
            return dict(self.model.predict(batch))
        outs = self.manifest["outputs"]
        roles = [r for r in ("probability", "heatmap", "body_part") if outs.get(r)]
        values = self.session.run([outs[r] for r in roles], {self.manifest["input"]["name"]: batch})
        result = {role: np.asarray(v, dtype=np.float32) for role, v in zip(roles, values, strict=True)}
        result["probability"] = result["probability"].reshape(len(batch), -1)[:, 0]
        return result


def predict_records(runner: _Runner, records: Sequence[Record], batch_size: int = 32) -> Predictions:
    """Read, preprocess and run every record through the exported model."""
    probs: list[npt.NDArray[np.float32]] = []
    heatmaps: list[npt.NDArray[np.float32]] = []
    parts: list[npt.NDArray[np.float32]] = []
    boxes: list[Letterbox] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        tensors = []
        for rec in chunk:
            tensor, box = preprocess(load_display_image(rec.path), runner.spec)
            tensors.append(tensor)
            boxes.append(box)
        out = runner.predict(np.stack(tensors))
        probs.append(out["probability"])
        if "heatmap" in out:
            heatmaps.extend(np.asarray(h, dtype=np.float32) for h in out["heatmap"])
        if "body_part" in out:
            parts.append(out["body_part"])
    return Predictions(
        records=list(records),
        probability=np.concatenate(probs).astype(np.float32),
        heatmaps=heatmaps,
        body_part=np.concatenate(parts) if parts else None,
        letterboxes=boxes,
    )


def _per_region(pred: Predictions, threshold: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    labels = pred.labels
    groups: dict[str, npt.NDArray[np.bool_]] = {
        name: np.array([r.body_parts[i] == 1 for r in pred.records]) for i, name in enumerate(BODY_PARTS)
    }
    groups["mixed (several regions)"] = np.array([r.region == "mixed" for r in pred.records])
    for name, mask in groups.items():
        if not mask.any():
            continue
        m = binary_metrics(labels[mask], pred.probability[mask], threshold)
        out[name] = {k: m[k] for k in ("n", "positives", "roc_auc", "sensitivity", "specificity", "accuracy")}
    return out


def _body_part_accuracy(pred: Predictions) -> dict[str, Any] | None:
    if pred.body_part is None:
        return None
    single = [i for i, r in enumerate(pred.records) if sum(r.body_parts) == 1]
    if not single:
        return None
    truth = np.array([int(np.argmax(pred.records[i].body_parts)) for i in single])
    guess = np.argmax(pred.body_part[single], axis=1)
    return {"n_single_region": len(single), "accuracy": float(np.mean(truth == guess))}


def _localisation(pred: Predictions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    hits: list[bool] = []
    chance: list[float] = []
    examples: list[dict[str, Any]] = []
    if not pred.heatmaps:
        return {"available": False}, examples
    order = np.argsort(-pred.probability)
    for index in order:
        rec = pred.records[int(index)]
        if rec.label != 1 or not rec.boxes:
            continue
        full = to_original(pred.heatmaps[int(index)], pred.letterboxes[int(index)])
        hit = peak_in_boxes(full, rec.boxes)
        hits.append(hit)
        chance.append(box_area_fraction(full.shape, rec.boxes))
        if len(examples) < 4 and (hit or len(examples) >= 2):
            examples.append(
                {
                    "image": load_display_image(rec.path),
                    "heatmap": full,
                    "boxes": rec.boxes,
                    "probability": float(pred.probability[int(index)]),
                    "title": f"{rec.image_id} ({'hit' if hit else 'miss'})",
                }
            )
    if not hits:
        return {"available": True, "n": 0}, examples
    return {
        "available": True,
        "n": len(hits),
        "peak_in_box_rate": float(np.mean(hits)),
        "random_point_rate": float(np.mean(chance)),
    }, examples


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _report(summary: dict[str, Any], plots: dict[str, str]) -> str:
    test = summary["test"]
    ci = summary["test_ci95"]
    cm = test["confusion_matrix"]
    lines = [
        f"# Evaluation report: {summary['model']['name']} {summary['model']['version']}",
        "",
        "Not for clinical use. Research and engineering evaluation on FracAtlas (CC BY 4.0).",
        "",
        f"- Model: `{summary['model']['onnx_file']}` sha256 `{summary['model']['sha256']}`",
        f"- Inference path: {summary['backend']} (images read with `load_display_image`, "
        "preprocessed with `preprocess` from the manifest)",
        f"- Command: `{summary['command']}`",
        f"- Splits: validation {summary['validation']['n']} images ({summary['validation']['positives']} fractured), "
        f"test {test['n']} images ({test['positives']} fractured); `splits.csv`",
        f"- Threshold: **{summary['threshold']:.4f}**, rule: {summary['threshold_rule']}",
        "",
        "## Test split",
        "",
        "| metric | value | 95% CI (bootstrap) |",
        "| --- | --- | --- |",
    ]
    for key in ("roc_auc", "sensitivity", "specificity", "accuracy", "precision", "f1"):
        interval = ci.get(key)
        ci_text = f"{_fmt(interval[0])} - {_fmt(interval[1])}" if interval else ""
        lines.append(f"| {key.replace('_', ' ')} | {_fmt(test[key])} | {ci_text} |")
    lines += [
        f"| average precision | {_fmt(summary['test_average_precision'])} | |",
        "",
        f"Confusion matrix (threshold {summary['threshold']:.4f}): TP {cm['tp']}, FN {cm['fn']}, "
        f"FP {cm['fp']}, TN {cm['tn']}.",
        "",
        f"Validation split at the same threshold: sensitivity {_fmt(summary['validation']['sensitivity'])}, "
        f"specificity {_fmt(summary['validation']['specificity'])}, ROC AUC {_fmt(summary['validation']['roc_auc'])}.",
        "",
        "## Per body region (test split)",
        "",
        "Regions come from the FracAtlas flags; an image with several regions counts in each.",
        "",
        "| region | images | fractured | ROC AUC | sensitivity | specificity |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in summary["per_region"].items():
        lines.append(
            f"| {name} | {m['n']} | {m['positives']} | {_fmt(m['roc_auc'])} | {_fmt(m['sensitivity'])} | "
            f"{_fmt(m['specificity'])} |"
        )
    bp = summary.get("body_part")
    if bp:
        lines += [
            "",
            f"Body-region head accuracy on {bp['n_single_region']} single-region test images: {_fmt(bp['accuracy'])}.",
        ]
    loc = summary["localisation"]
    lines += ["", "## Localisation (test split)", ""]
    if loc.get("n"):
        lines.append(
            f"Of {loc['n']} fractured test images with boxes, the heatmap peak (mapped back to the image with "
            f"`to_original`) falls inside a fracture box in **{_fmt(loc['peak_in_box_rate'])}**; a uniformly random "
            f"point would land in a box in {_fmt(loc['random_point_rate'])} of cases on average (box area share)."
        )
    else:
        lines.append("No heatmap output or no boxes; not measured.")
    lines += ["", "## Plots", ""]
    for title, file_name in plots.items():
        lines.append(f"![{title}]({file_name})")
    return "\n".join(lines) + "\n"


def evaluate(
    model_dir: Path,
    data: Path,
    *,
    split_file: Path | None = None,
    out_dir: Path | None = None,
    history: Path | None = None,
    min_sensitivity: float = 0.90,
    n_bootstrap: int = 2000,
    update_manifest: bool = True,
    command: str = "",
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate the model folder; returns the summary written to ``metrics.json``."""
    started = time.monotonic()
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir
    out.mkdir(parents=True, exist_ok=True)
    split_path = Path(split_file) if split_file is not None else model_dir / "splits.csv"
    records = read_dataset(Path(data))
    splits = read_split_csv(split_path, records)
    runner = _Runner(model_dir)
    LOGGER.info("evaluating through %s", runner.backend)

    val = predict_records(runner, splits["val"])
    test = predict_records(runner, splits["test"])
    threshold = choose_threshold(val.labels, val.probability, min_sensitivity)
    rule = f"highest threshold with validation sensitivity >= {min_sensitivity:.2f}"
    val_metrics = binary_metrics(val.labels, val.probability, threshold)
    test_metrics = binary_metrics(test.labels, test.probability, threshold)
    ci = bootstrap_ci(test.labels, test.probability, threshold, n_resamples=n_bootstrap, seed=seed)
    from sklearn.metrics import average_precision_score

    loc, examples = _localisation(test)
    summary: dict[str, Any] = {
        "model": {k: runner.manifest.get(k) for k in ("name", "version", "onnx_file", "sha256")},
        "backend": runner.backend,
        "command": command,
        "threshold": threshold,
        "threshold_rule": rule,
        "validation": val_metrics,
        "test": test_metrics,
        "test_ci95": ci,
        "test_average_precision": float(average_precision_score(test.labels, test.probability)),
        "per_region": _per_region(test, threshold),
        "body_part": _body_part_accuracy(test),
        "localisation": loc,
    }

    plots: dict[str, str] = {}
    op = (1.0 - test_metrics["specificity"], test_metrics["sensitivity"])
    plot_roc(test.labels, test.probability, test_metrics["roc_auc"], ci["roc_auc"], op, path=out / "roc.png")
    plots["ROC curve"] = "roc.png"
    plot_pr(test.labels, test.probability, out / "pr.png")
    plots["Precision-recall curve"] = "pr.png"
    plot_confusion(test_metrics["confusion_matrix"], out / "confusion.png")
    plots["Confusion matrix"] = "confusion.png"
    plot_calibration(test.labels.astype(np.float64), test.probability.astype(np.float64), out / "calibration.png")
    plots["Calibration"] = "calibration.png"
    history_path = Path(history) if history is not None else model_dir / "history.csv"
    if plot_training_curves(history_path, out / "training_curves.png"):
        plots["Training curves"] = "training_curves.png"
    if plot_heatmaps(examples, out / "heatmaps.png"):
        plots["Heatmap examples (green: fracture boxes, red x: heatmap peak)"] = "heatmaps.png"

    summary["seconds"] = round(time.monotonic() - started, 1)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(_report(summary, plots))
    LOGGER.info(
        "test: AUC %.3f (%.3f-%.3f), sensitivity %.3f, specificity %.3f at threshold %.4f",
        test_metrics["roc_auc"],
        ci["roc_auc"][0],
        ci["roc_auc"][1],
        test_metrics["sensitivity"],
        test_metrics["specificity"],
        threshold,
    )

    if update_manifest:
        manifest_path = model_dir / "model.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["threshold"] = round(threshold, 6)
        manifest["threshold_rule"] = rule
        keys = ("roc_auc", "sensitivity", "specificity", "accuracy", "precision", "f1")
        manifest["metrics"] = {
            "test": {
                **{k: test_metrics[k] for k in keys},
                "roc_auc_ci95": ci["roc_auc"],
                "sensitivity_ci95": ci["sensitivity"],
                "specificity_ci95": ci["specificity"],
                "n": test_metrics["n"],
                "positives": test_metrics["positives"],
                "confusion_matrix": test_metrics["confusion_matrix"],
                "localisation_peak_in_box": loc.get("peak_in_box_rate"),
                "localisation_random_point": loc.get("random_point_rate"),
            },
            "validation": {k: val_metrics[k] for k in ("roc_auc", "sensitivity", "specificity", "n", "positives")},
            "report": "report.md",
        }
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        LOGGER.info("recorded threshold and metrics in %s", manifest_path)
    return summary
