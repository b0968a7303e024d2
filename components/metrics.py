"""Classification metrics from predictions, shared by every model and baseline.

Computed with scikit-learn so the numbers in summary.json are exactly what
anyone recomputing them from the predictions files gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ftloop.components.errors import FtloopError
from ftloop.components.records import write_json, write_jsonl


def compute_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro/weighted P/R/F1, per-class scores and the confusion matrix, as plain JSON types.

    Macro-F1 is the headline number: the splits are small and not always balanced.
    Confusion matrix rows are true labels, columns predictions, both in ``labels`` order.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    y_pred = [INVALID if p is None else p for p in y_pred]
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    unknown = sorted((set(y_true) | set(y_pred)) - set(labels) - {INVALID})
    if unknown:
        raise FtloopError(f"labels not in the label set: {unknown}")
    n = len(y_true)
    out: dict[str, Any] = {"n": n, "labels": labels}
    if n == 0:
        zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        out.update({"accuracy": 0.0, **{f"{avg}_{k}": 0.0 for avg in ("macro", "weighted") for k in zero}})
        out["per_class"] = {label: {**zero, "support": 0} for label in labels}
        out["confusion_matrix"] = [[0] * len(labels) for _ in labels]
        return out
    out["accuracy"] = float(accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out.update({f"{avg}_precision": float(p), f"{avg}_recall": float(r), f"{avg}_f1": float(f)})
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {
        label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, label in enumerate(labels)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist()
    return out


def write_predictions(
    splits: dict[str, list[dict[str, Any]]],
    probabilities: dict[str, list[dict[str, float]]],
    labels: list[str],
    output_dir: str | Path,
    progress: Callable[[str], None] = print,
    timings: dict[str, dict[str, float]] | None = None,
    generated: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """predictions/<split>.jsonl (argmax of the label probabilities) and metrics.json; returns {split: metrics}.

    ``timings`` (per split: rows_per_second, mean_batch_seconds) is merged into the metrics when given.
    ``generated`` (generate mode) holds per row the raw output and the parsed label, None when invalid.
    """
    from ftloop.components.stats import expected_calibration_error

    output_dir = Path(output_dir)
    results: dict[str, Any] = {}
    for split, rows in splits.items():
        predictions = []
        for i, (row, probs) in enumerate(zip(rows, probabilities[split])):
            prediction = max(labels, key=lambda label: probs[label])  # ties go to the first label
            extra = {}
            if generated is not None:
                prediction = generated[split][i]["prediction"]
                extra = {"raw": generated[split][i]["raw"]}
            predictions.append({
                "id": row["id"], "text": row["text"], "label": row["label"], "group": row.get("group"),
                "origin": row.get("origin"), "prediction": prediction, "scores": probs,
                "correct": prediction == row["label"], **extra,
            })
        write_jsonl(output_dir / "predictions" / f"{split}.jsonl", predictions)
        results[split] = compute_metrics([r["label"] for r in rows], [p["prediction"] for p in predictions], labels)
        m = results[split]
        # Label scoring always yields a label; generate-and-parse may not.
        m["invalid_rate"] = sum(p["prediction"] is None for p in predictions) / len(predictions) if predictions else 0.0
        m["ece"] = expected_calibration_error([max(p["scores"].values()) for p in predictions], [p["correct"] for p in predictions])
        m.update((timings or {}).get(split, {}))
        progress(f"eval {split}: n={m['n']} accuracy {m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f}")
    write_json(output_dir / "metrics.json", results)
    return results


INVALID = "<invalid>"  # an unparseable generate-mode output: wrong for every class, in no column
KFP_SCALARS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "ece", "rows_per_second")


def log_scalars(metrics_artifact: Any, all_metrics: dict[str, dict[str, Any]]) -> None:
    """Log ``<split>_<metric>`` scalars on a KFP Metrics artifact; one naming scheme so the Compare page lines runs up."""
    for split, m in all_metrics.items():
        for key in KFP_SCALARS:
            if key in m:
                metrics_artifact.log_metric(f"{split}_{key}", float(m[key]))
