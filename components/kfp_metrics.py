"""What each task logs to the KFP UI: scalars, the test confusion matrix, and the comparison task's scalars."""

from __future__ import annotations

import re
from typing import Any

from ftloop.components.reports.escape import kfp_label

# What every model-evaluating task (evaluate, evaluate_zero_shot, tfidf_baseline) logs for the KFP UI, per split,
# as ``<split>_<metric>``: one scheme, so the Compare page lines the tasks and the runs up. Bootstrap intervals are
# not here: they are computed once, over the rows of all models, when summary.json is built (comparison_scalars).
KFP_SCALARS = (
    "accuracy",
    "macro_f1",
    "weighted_f1",
    "macro_precision",
    "macro_recall",
    "ece",
    "invalid_rate",
    "rows_per_second",
    "mean_batch_seconds",
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
    """Log the ``CONFUSION_MATRIX_SPLIT`` confusion matrix (rows true, columns predicted) on a KFP ClassificationMetrics artifact.

    The category names are the labels as the KFP UI can show them (``escape.kfp_label``): one line each, no control
    characters, bidi controls isolated, shortened to fit a matrix cell and still distinct. The UI draws them as text.
    """
    m = all_metrics[CONFUSION_MATRIX_SPLIT]
    confusion_artifact.log_confusion_matrix(kfp_label(list(m["labels"])), [[int(v) for v in row] for row in m["confusion_matrix"]])


def log_evaluation(metrics_artifact: Any, confusion_artifact: Any, all_metrics: dict[str, dict[str, Any]]) -> None:
    """What an evaluating task shows in the KFP UI: the scalars of every split and the test confusion matrix."""
    log_scalars(metrics_artifact, all_metrics)
    log_confusion_matrix(confusion_artifact, all_metrics)
    write_metadata_files(metrics_artifact, confusion_artifact)


def write_metadata_files(*artifacts: Any) -> None:
    """Write each UI artifact's metadata to its file too. KFP keeps the values in the metadata; the file
    is what kfp.local's cache checks for (a cached output whose file is missing is a miss), so without
    it a cached evaluation would rerun every time."""
    import json
    from pathlib import Path

    for artifact in artifacts:
        path = Path(artifact.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(artifact.metadata, sort_keys=True), encoding="utf-8")


# The compare task's scalars: every model side by side on one task, so the Compare page lines runs up on the
# final augmented model whichever evaluate-N task (or the base model, when the loop kept it) produced it.
COMPARISON_METRICS = ("accuracy", "macro_f1", "weighted_f1")


COMPARISON_SPLITS = ("dev", "test")


INTERVAL_METRICS = ("accuracy", "macro_f1")  # summary.json's ci95 (bootstrap 95% interval), on test


def kfp_model_name(name: str) -> str:
    """A summary.json model name as a scalar-name part (``[0-9A-Za-z_]`` only, whatever the name): ``zero-shot`` -> ``zero_shot``."""
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
