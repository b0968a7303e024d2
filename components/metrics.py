"""Classification metrics from predictions, shared by every model and baseline.

Computed with scikit-learn so the numbers in summary.json are exactly what
anyone recomputing them from the predictions files gets.
"""

from __future__ import annotations

import re
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

# What every model-evaluating task (evaluate, evaluate_zero_shot, tfidf_baseline) logs for the KFP UI, per split,
# as ``<split>_<metric>``: one scheme, so the Compare page lines the tasks and the runs up. Bootstrap intervals are
# not here: they are computed once, over the rows of all models, when summary.json is built (comparison_scalars).
KFP_SCALARS = (
    "accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "ece", "invalid_rate",
    "rows_per_second", "mean_batch_seconds",
)
CONFUSION_MATRIX_SPLIT = "test"  # the split whose confusion matrix each evaluating task logs


def log_scalars(metrics_artifact: Any, all_metrics: dict[str, dict[str, Any]]) -> None:
    """Log ``<split>_<metric>`` scalars on a KFP Metrics artifact; every metric in ``KFP_SCALARS``, always.

    A missing metric is an error, not a silently shorter list: tasks that log different
    names cannot be lined up on the Compare page.
    """
    for split, m in all_metrics.items():
        missing = [key for key in KFP_SCALARS if key not in m]
        if missing:
            raise ValueError(f"{split} metrics lack {missing}: every evaluating task logs all of {list(KFP_SCALARS)}")
        for key in KFP_SCALARS:
            metrics_artifact.log_metric(f"{split}_{key}", float(m[key]))


def log_confusion_matrix(confusion_artifact: Any, all_metrics: dict[str, dict[str, Any]]) -> None:
    """Log the ``CONFUSION_MATRIX_SPLIT`` confusion matrix (rows true, columns predicted) on a KFP ClassificationMetrics artifact."""
    m = all_metrics[CONFUSION_MATRIX_SPLIT]
    confusion_artifact.log_confusion_matrix(list(m["labels"]), [[int(v) for v in row] for row in m["confusion_matrix"]])


def log_evaluation(metrics_artifact: Any, confusion_artifact: Any, all_metrics: dict[str, dict[str, Any]]) -> None:
    """What an evaluating task shows in the KFP UI: the scalars of every split and the test confusion matrix."""
    log_scalars(metrics_artifact, all_metrics)
    log_confusion_matrix(confusion_artifact, all_metrics)


# The compare task's scalars: every model side by side on one task, so the Compare page lines runs up on the
# final augmented model whichever evaluate-N task (or the base model, when the loop kept it) produced it.
COMPARISON_METRICS = ("accuracy", "macro_f1", "weighted_f1")
COMPARISON_SPLITS = ("dev", "test")
INTERVAL_METRICS = ("accuracy", "macro_f1")  # summary.json's ci95 (bootstrap 95% interval), on test


def kfp_model_name(name: str) -> str:
    """A summary.json model name as a scalar-name part: ``zero-shot`` -> ``zero_shot``."""
    return re.sub(r"[^0-9A-Za-z_]", "_", name)


def comparison_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The compare task's scalars, read from summary.json.

    ``<model>_<split>_<metric>`` for every model on dev and test; ``<model>_test_<metric>_ci95_low|high``;
    ``augmented_minus_base_test_<metric>`` (summary["deltas"]); ``<before>_vs_<after>_test_mcnemar_p_value``
    for every pair in summary["significance"].
    """
    scalars: dict[str, float] = {}
    for name, model in summary["models"].items():
        prefix = kfp_model_name(name)
        for split in COMPARISON_SPLITS:
            for metric in COMPARISON_METRICS:
                scalars[f"{prefix}_{split}_{metric}"] = float(model[split][metric])
        for metric in INTERVAL_METRICS:
            low, high = model["test"]["ci95"][metric]
            scalars[f"{prefix}_test_{metric}_ci95_low"] = float(low)
            scalars[f"{prefix}_test_{metric}_ci95_high"] = float(high)
    test_deltas = (summary.get("deltas") or {}).get("test", {})
    for metric in COMPARISON_METRICS:
        if metric in test_deltas:
            scalars[f"augmented_minus_base_test_{metric}"] = float(test_deltas[metric])
    for pair, result in (summary.get("significance") or {}).items():
        before, _, after = pair.partition("->")
        if after and isinstance(result, dict) and "p_value" in (result.get("test") or {}):
            scalars[f"{kfp_model_name(before)}_vs_{kfp_model_name(after)}_test_mcnemar_p_value"] = float(result["test"]["p_value"])
    return scalars


def log_comparison(metrics_artifact: Any, summary: dict[str, Any]) -> None:
    """Log ``comparison_scalars(summary)`` on a KFP Metrics artifact."""
    for name, value in comparison_scalars(summary).items():
        metrics_artifact.log_metric(name, value)
