"""Classification metrics from gold and predicted labels (scikit-learn), with generate mode's invalid outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftloop.components.errors import FtloopError


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
        label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])} for i, label in enumerate(labels)
    }
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist()
    return out


INVALID = "<invalid>"  # an unparseable generate-mode output: wrong for every class, in no column
