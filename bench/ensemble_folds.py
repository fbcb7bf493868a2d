"""What an ensemble of the cross-validation folds would buy on the test split, against one model.

Each fold model is scored on the same test images (the split file of the
first model names them); the ensemble's score is the mean of the fold
probabilities. ROC AUC and average precision need no threshold, which the
ensemble could not choose fairly here: every fold's validation images are
training images of the other folds. The paired comparison is DeLong's test
plus a paired bootstrap, as ``pacs-bridge evaluate --compare``.

    python bench/ensemble_folds.py models/fracatlas-cnn runs/model-cv2 runs/model-cv3 runs/model-cv4 \
        [--data ../shared/data/fracatlas] [--out docs/ensemble-folds.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.data import read_dataset, read_split_csv  # noqa: E402
from trainer.evaluate import _Runner, compare_models, predict_records  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="model folders; the first is the reference")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fracatlas")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    from sklearn.metrics import average_precision_score, roc_auc_score

    records = read_dataset(args.data)
    test = read_split_csv(args.models[0] / "splits.csv", records)["test"]
    scores = []
    seconds = []
    for folder in args.models:
        runner = _Runner(folder)
        started = time.perf_counter()
        pred = predict_records(runner, test)
        seconds.append(time.perf_counter() - started)
        scores.append(pred.probability)
        labels = pred.labels
        print(f"{folder}: test AUC {roc_auc_score(labels, pred.probability):.3f}", flush=True)
    mean = np.mean(np.stack(scores), axis=0)
    comparison = compare_models(labels, mean, scores[0], args.bootstrap, 0)
    result = {
        "models": [str(m) for m in args.models],
        "test_images": len(test),
        "single_auc": [float(roc_auc_score(labels, s)) for s in scores],
        "single_average_precision": [float(average_precision_score(labels, s)) for s in scores],
        "ensemble_auc": float(roc_auc_score(labels, mean)),
        "ensemble_average_precision": float(average_precision_score(labels, mean)),
        "ensemble_vs_first": comparison,
        "seconds_per_model": seconds,
    }
    print(
        f"ensemble of {len(scores)}: test AUC {result['ensemble_auc']:.3f} against {result['single_auc'][0]:.3f} "
        f"(DeLong p {comparison['p_value']:.3f}, difference 95 % CI "
        f"{comparison['difference_ci95'][0]:+.3f} to {comparison['difference_ci95'][1]:+.3f})"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
