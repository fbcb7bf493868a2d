"""Evaluation of an exported model folder on the validation and test splits.

The model is run as the service runs it: images are read with
:func:`pacs_bridge.imaging.loader.load_display_image`, preprocessed with
:func:`pacs_bridge.imaging.preprocess.preprocess` using the manifest's
``preprocessing`` block, and the ONNX graph is executed through
:func:`pacs_bridge.inference.model.load_model` (which also validates the
manifest and the checksum). When that module is not importable, ONNX Runtime
is used directly with the same inputs.

Steps: choose the decision threshold on the validation split (by default the
highest threshold with validation sensitivity >= ``min_sensitivity``; with
``min_specificity`` instead, the lowest threshold with validation
specificity >= it), compute the
test-split metrics with bootstrap 95% intervals, per body region, the
localisation of the boxes and peaks the service would report (the same
functions: :func:`pacs_bridge.inference.boxes.centre_boxes` for ``centre``
heatmaps, :func:`pacs_bridge.inference.heatmap.locate` for ``cam`` ones)
against the fracture boxes, write PNG plots, ``metrics.json`` and
``report.md``, and (optionally) record the threshold and metrics in
``model.json``. With ``compare`` (another model folder), both models run on
the same test images and their ROC AUCs are compared with DeLong's test and
a paired bootstrap.
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
    box_iou,
    choose_threshold,
    choose_threshold_at_specificity,
    delong_test,
    paired_bootstrap_auc,
    point_in_boxes,
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

__all__ = ["Predictions", "compare_models", "evaluate", "locate_findings", "predict_records"]

BOX_THRESHOLD = 0.7
"""``[analysis] box_threshold`` default: how the service outlines a ``cam`` heatmap."""
PEAK_MARGIN = 0.10
"""A peak counts as inside a fracture box within this share of the image's shorter side."""


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
        self.kind = "cam"
        self.localisation: Any = None
        if loader is not None:
            self.model: Any = loader(model_dir, providers="cpu")
            self.spec: PreprocessSpec = self.model.manifest.preprocessing
            self.manifest: dict[str, Any] = dict(self.model.manifest.raw)
            self.kind = self.model.manifest.outputs.heatmap_kind
            self.localisation = self.model.manifest.localisation
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


def locate_findings(
    runner: _Runner, pred: Predictions, threshold: float | None = None
) -> tuple[list[list[tuple[tuple[int, int, int, int], float]]], list[tuple[int, int] | None]]:
    """The boxes (with scores) and peak the service would report for every prediction.

    ``threshold`` is the one the images are called at (the service uses the
    manifest's); a manifest whose localisation follows the call
    (``flagged_min_score``) needs it. ``None``: the manifest's own.
    """
    if threshold is None:
        threshold = float(runner.manifest.get("threshold", 0.5))
    from pacs_bridge.inference.boxes import centre_boxes
    from pacs_bridge.inference.heatmap import locate

    all_boxes: list[list[tuple[tuple[int, int, int, int], float]]] = []
    peaks: list[tuple[int, int] | None] = []
    for i, heat in enumerate(pred.heatmaps):
        if runner.kind == "centre":
            flagged = bool(pred.probability[i] >= threshold)
            found = centre_boxes(heat, pred.letterboxes[i], runner.localisation, flagged=flagged)
            all_boxes.append(found.boxes)
            peaks.append(found.peak)
        else:
            located = locate(heat, pred.letterboxes[i], BOX_THRESHOLD)
            box = located.box
            all_boxes.append([] if box is None else [((box[0], box[1], box[2], box[3]), float(pred.probability[i]))])
            peaks.append(located.peak)
    return all_boxes, peaks


def _localisation(runner: _Runner, pred: Predictions, threshold: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Peak-in-box (10 % margin), top-box area and IoU on fractured images with boxes; boxes on negatives."""
    examples: list[dict[str, Any]] = []
    if not pred.heatmaps:
        return {"available": False}, examples
    boxes, peaks = locate_findings(runner, pred, threshold)
    hits: list[bool] = []
    strict_hits: list[bool] = []
    chance: list[float] = []
    areas: list[float] = []
    ious: list[float] = []
    pointed: list[bool] = []
    negatives_with_box: list[bool] = []
    negatives_flagged_with_box: list[bool] = []
    order = np.argsort(-pred.probability)
    for index in (int(i) for i in order):
        rec = pred.records[index]
        rows, cols = pred.letterboxes[index].shape
        if rec.label == 0:
            negatives_with_box.append(bool(boxes[index]))
            if pred.probability[index] >= threshold:
                negatives_flagged_with_box.append(bool(boxes[index]))
            continue
        if not rec.boxes:
            continue
        peak = peaks[index]
        pointed.append(peak is not None)
        hit = peak is not None and point_in_boxes(peak, rec.boxes, PEAK_MARGIN * min(rows, cols))
        hits.append(hit)
        strict_hits.append(peak is not None and point_in_boxes(peak, rec.boxes))
        chance.append(box_area_fraction((rows, cols), rec.boxes))
        if boxes[index]:
            top = boxes[index][0][0]
            areas.append((top[2] - top[0]) * (top[3] - top[1]) / float(rows * cols))
            ious.append(max(box_iou(top, b) for b in rec.boxes))
        else:
            ious.append(0.0)
        if len(examples) < 4 and (hit or len(examples) >= 2):
            examples.append(
                {
                    "image": load_display_image(rec.path),
                    "heatmap": to_original(pred.heatmaps[index], pred.letterboxes[index]),
                    "boxes": rec.boxes,
                    "pred_boxes": [b for b, _ in boxes[index]],
                    "peak": peak,
                    "probability": float(pred.probability[index]),
                    "title": f"{rec.image_id} ({'hit' if hit else 'miss'})",
                }
            )
    if not hits:
        return {"available": True, "n": 0}, examples
    return {
        "available": True,
        "kind": runner.kind,
        "n": len(hits),
        "peak_in_box_rate": float(np.mean(hits)),
        "peak_in_box_margin": PEAK_MARGIN,
        "peak_in_box_strict_rate": float(np.mean(strict_hits)),
        "pointed_rate": float(np.mean(pointed)),
        "random_point_rate": float(np.mean(chance)),
        "top_box_area_median": float(np.median(areas)) if areas else None,
        "top_box_iou_mean": float(np.mean(ious)),
        "top_box_iou_median": float(np.median(ious)),
        "negatives_with_box_rate": float(np.mean(negatives_with_box)) if negatives_with_box else None,
        "flagged_negatives_with_box_rate": (
            float(np.mean(negatives_flagged_with_box)) if negatives_flagged_with_box else None
        ),
    }, examples


def compare_models(
    labels: npt.NDArray[Any], scores: npt.NDArray[Any], other: npt.NDArray[Any], n_bootstrap: int, seed: int
) -> dict[str, Any]:
    """DeLong's test and a paired bootstrap of ``AUC(this) - AUC(other)`` on the same images."""
    result: dict[str, Any] = dict(delong_test(labels, scores, other))
    result.update(paired_bootstrap_auc(labels, scores, other, n_resamples=n_bootstrap, seed=seed))
    return result


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
        lines += [
            f"On {loc['n']} fractured test images with fracture boxes, with the boxes and peak the service reports "
            f"(`{loc['kind']}` heatmap):",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| peak inside a fracture box (margin {loc['peak_in_box_margin']:.0%} of the shorter side) | "
            f"**{_fmt(loc['peak_in_box_rate'])}** |",
            f"| peak inside a fracture box (no margin) | {_fmt(loc['peak_in_box_strict_rate'])} |",
            f"| a uniformly random point inside a box (area share) | {_fmt(loc['random_point_rate'])} |",
            f"| images with a peak at all | {_fmt(loc['pointed_rate'])} |",
            f"| median area of the top box (share of the image) | {_fmt(loc['top_box_area_median'])} |",
            f"| IoU of the top box with the nearest fracture box: mean / median | {_fmt(loc['top_box_iou_mean'])} / "
            f"{_fmt(loc['top_box_iou_median'])} |",
            f"| non-fractured test images with any box | {_fmt(loc['negatives_with_box_rate'])} |",
            f"| false positives (at the threshold) with a box | {_fmt(loc['flagged_negatives_with_box_rate'])} |",
        ]
    else:
        lines.append("No heatmap output or no boxes; not measured.")
    comparison = summary.get("comparison")
    if comparison:
        lines += [
            "",
            f"## Compared with {comparison['other']} (same test images)",
            "",
            f"ROC AUC {_fmt(comparison['auc_a'])} against {_fmt(comparison['auc_b'])}: difference "
            f"{comparison['difference']:+.3f} (paired bootstrap 95% CI {comparison['difference_ci95'][0]:+.3f} to "
            f"{comparison['difference_ci95'][1]:+.3f}); DeLong z = {comparison['z']:.2f}, "
            f"two-sided p = {comparison['p_value']:.4f}.",
        ]
        other_loc = comparison.get("localisation") or {}
        if other_loc.get("n"):
            lines.append(
                f"Its peak lands in a box (same margin) in {_fmt(other_loc['peak_in_box_rate'])}, its top box "
                f"covers {_fmt(other_loc['top_box_area_median'])} of the image (median), "
                f"IoU {_fmt(other_loc['top_box_iou_mean'])}."
            )
        if comparison.get("at_threshold"):
            m = comparison["at_threshold"]
            lines.append(
                f"At its own manifest threshold ({m['threshold']:.4f}) on these images: sensitivity "
                f"{_fmt(m['sensitivity'])}, specificity {_fmt(m['specificity'])}."
            )
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
    min_specificity: float | None = None,
    n_bootstrap: int = 2000,
    update_manifest: bool = True,
    command: str = "",
    seed: int = 0,
    compare: Path | None = None,
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
    if min_specificity is not None:
        threshold = choose_threshold_at_specificity(val.labels, val.probability, min_specificity)
        rule = f"lowest threshold with validation specificity >= {min_specificity:.2f}"
    else:
        threshold = choose_threshold(val.labels, val.probability, min_sensitivity)
        rule = f"highest threshold with validation sensitivity >= {min_sensitivity:.2f}"
    val_metrics = binary_metrics(val.labels, val.probability, threshold)
    test_metrics = binary_metrics(test.labels, test.probability, threshold)
    ci = bootstrap_ci(test.labels, test.probability, threshold, n_resamples=n_bootstrap, seed=seed)
    from sklearn.metrics import average_precision_score

    loc, examples = _localisation(runner, test, threshold)
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
    if compare is not None:
        other = _Runner(Path(compare))
        other_test = predict_records(other, splits["test"])
        comparison = compare_models(test.labels, test.probability, other_test.probability, n_bootstrap, seed)
        other_threshold = float(other.manifest.get("threshold", 0.5))
        other_at = binary_metrics(test.labels, other_test.probability, other_threshold)
        comparison.update(
            {
                "other": f"{other.manifest.get('name')} {other.manifest.get('version')}",
                "localisation": _localisation(other, other_test, other_threshold)[0],
                "at_threshold": {k: other_at[k] for k in ("threshold", "sensitivity", "specificity", "roc_auc")},
            }
        )
        summary["comparison"] = comparison
        LOGGER.info(
            "against %s: AUC %.3f vs %.3f, DeLong p %.4f",
            comparison["other"],
            comparison["auc_a"],
            comparison["auc_b"],
            comparison["p_value"],
        )

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
                "localisation_peak_in_box_margin": loc.get("peak_in_box_margin"),
                "localisation_random_point": loc.get("random_point_rate"),
                "localisation_top_box_area_median": loc.get("top_box_area_median"),
                "localisation_top_box_iou_mean": loc.get("top_box_iou_mean"),
            },
            "validation": {k: val_metrics[k] for k in ("roc_auc", "sensitivity", "specificity", "n", "positives")},
            "report": "report.md",
        }
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        LOGGER.info("recorded threshold and metrics in %s", manifest_path)
    return summary
