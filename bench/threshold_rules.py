"""Which validation threshold rule carries its operating point to unseen images, over the cross-validation folds.

Every fold model is scored on its own validation split and on the common test
split (each model's ``splits.csv``). Each rule picks a threshold from
validation scores only (``trainer.metrics.choose_threshold`` for a
sensitivity floor, ``choose_threshold_at_specificity`` for a specificity
floor). Two readings per rule:

- *validation halves*: the rule chooses on a random stratified half of a
  fold's validation split and is scored on the other half (200 splits per
  fold): an estimate that never touches the test split, used to choose;
- *test*: the rule chooses on the whole validation split, scored on test.

The last row, *test oracle*, is the highest test sensitivity any threshold
reaches with test specificity >= 0.70: where the model's test ROC curve
passes, not a threshold that could be shipped.

    python bench/threshold_rules.py models/fracatlas-cnn runs/model-lite0-1 ... \
        [--data ../shared/data/fracatlas] [--out models/fracatlas-cnn/2.1.0-threshold-rules.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.data import read_dataset, read_split_csv  # noqa: E402
from trainer.evaluate import _Runner, predict_records  # noqa: E402
from trainer.metrics import binary_metrics, choose_threshold, choose_threshold_at_specificity  # noqa: E402

Rule = Callable[[np.ndarray, np.ndarray], float]
TARGET_SENSITIVITY = 0.90
TARGET_SPECIFICITY = 0.70


def _rules() -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    for q in (0.90, 0.92, 0.94):
        rules[f"validation sensitivity >= {q:.2f}"] = lambda y, s, q=q: choose_threshold(y, s, q)
    for p in (0.70, 0.72, 0.74, 0.76):
        rules[f"validation specificity >= {p:.2f}"] = lambda y, s, p=p: choose_threshold_at_specificity(y, s, p)
    return rules


def _rates(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    m = binary_metrics(labels, scores, threshold)
    return float(m["sensitivity"]), float(m["specificity"])


def _oracle(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    best = (0.0, 1.0)
    for t in np.unique(scores):
        sens, spec = _rates(labels, scores, float(t))
        if spec >= TARGET_SPECIFICITY and sens > best[0]:
            best = (sens, spec)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="fold model folders")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "fracatlas")
    parser.add_argument("--halves", type=int, default=200, help="random validation halves per fold")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    records = read_dataset(args.data)
    folds = []
    for folder in args.models:
        splits = read_split_csv(folder / "splits.csv", records)
        runner = _Runner(folder)
        val, test = predict_records(runner, splits["val"]), predict_records(runner, splits["test"])
        folds.append(
            (np.asarray(val.labels, int), np.asarray(val.probability), np.asarray(test.labels, int), test.probability)
        )
        print(f"{folder}: {len(val.labels)} validation, {len(test.labels)} test images", flush=True)

    rng = np.random.default_rng(0)
    result: dict[str, object] = {"models": [str(m) for m in args.models], "rules": {}}
    header = f"{'rule':34s} | {'halves sens / spec / both met':30s} | test sens / spec per fold"
    print(header)
    for name, rule in _rules().items():
        halves = []
        for vl, vs, _, _ in folds:
            pos, neg = np.flatnonzero(vl == 1), np.flatnonzero(vl == 0)
            for _ in range(args.halves):
                pick = np.zeros(vl.size, bool)
                pick[rng.permutation(pos)[: pos.size // 2]] = True
                pick[rng.permutation(neg)[: neg.size // 2]] = True
                halves.append(_rates(vl[~pick], vs[~pick], rule(vl[pick], vs[pick])))
        h = np.array(halves)
        met = float(np.mean((h[:, 0] >= TARGET_SENSITIVITY) & (h[:, 1] >= TARGET_SPECIFICITY)))
        test = [_rates(tl, ts, rule(vl, vs)) for vl, vs, tl, ts in folds]
        t = np.array(test)
        result["rules"][name] = {  # type: ignore[index]
            "halves_sensitivity": float(h[:, 0].mean()),
            "halves_specificity": float(h[:, 1].mean()),
            "halves_both_met": met,
            "test": [{"sensitivity": a, "specificity": b} for a, b in test],
            "test_mean": [float(t[:, 0].mean()), float(t[:, 1].mean())],
            "test_sd": [float(t[:, 0].std(ddof=1)), float(t[:, 1].std(ddof=1))] if len(test) > 1 else None,
        }
        per_fold = " ".join(f"{a:.3f}/{b:.3f}" for a, b in test)
        print(f"{name:34s} | {h[:, 0].mean():.3f} / {h[:, 1].mean():.3f} / {met:.3f}        | {per_fold}", flush=True)
    oracle = [_oracle(tl, ts) for _, _, tl, ts in folds]
    result["test_oracle_at_specificity_0.70"] = [{"sensitivity": a, "specificity": b} for a, b in oracle]
    print(f"{'test oracle (spec >= 0.70 on test)':34s} | {'':30s} | " + " ".join(f"{a:.3f}/{b:.3f}" for a, b in oracle))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
