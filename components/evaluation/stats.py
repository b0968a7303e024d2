"""Significance and uncertainty for small eval sets.

With test sets of tens to hundreds of rows, a one-point change in accuracy is
often noise; these numbers say how much of a difference is real.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 1000


def mcnemar_exact(before_correct: Sequence[bool], after_correct: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test on paired outcomes: two-sided binomial test on the discordant pairs.

    ``fixed`` counts rows wrong before and right after, ``broken`` the reverse.
    """
    if len(before_correct) != len(after_correct):
        raise ValueError("paired outcomes must have the same length")
    fixed = sum(1 for b, a in zip(before_correct, after_correct) if not b and a)
    broken = sum(1 for b, a in zip(before_correct, after_correct) if b and not a)
    n = fixed + broken
    k = min(fixed, broken)
    p_value = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)
    return {"fixed": fixed, "broken": broken, "discordant": n, "p_value": p_value}


def _label_indices(values: Sequence[str | None], labels: Sequence[str], what: str) -> np.ndarray:
    """Index of each value in ``labels``; None (an unparseable generate-mode output) maps to len(labels)."""
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({str(v) for v in values if v is not None and v not in index})
    if unknown:
        raise ValueError(f"{what} not in the label set: {unknown}")
    return np.array([len(labels) if v is None else index[v] for v in values], dtype=int)


def resampled_scores(
    y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str], draws: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 of each resample (one row of ``draws`` = row indices), as metrics.py computes them.

    A None prediction is an extra class outside ``labels``: wrong for its row, a false
    negative for the true class and a false positive for no listed class, exactly as
    sklearn treats metrics.py's INVALID placeholder; macro-F1 averages over ``labels`` only.
    """
    t = _label_indices(y_true, labels, "gold labels")
    p = _label_indices(y_pred, labels, "predictions")
    draws = np.atleast_2d(np.asarray(draws, dtype=int))
    # Blocks of resamples keep memory bounded for large eval sets; the numbers do not depend on the block size.
    block = max(1, 4_000_000 // max(1, draws.shape[1]))
    parts = [_scores(t[d], p[d], len(labels)) for d in (draws[i : i + block] for i in range(0, len(draws), block))]
    return np.concatenate([a for a, _ in parts]), np.concatenate([f for _, f in parts])


def _scores(tt: np.ndarray, pp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and macro-F1 per row of (resamples, n) arrays of true and predicted class indices."""
    r = tt.shape[0]
    hit = tt == pp
    # Per-resample class counts in one bincount: resample i's class c lands in bin i * (k + 1) + c.
    offset = (np.arange(r) * (k + 1))[:, None]

    def counts(classes: np.ndarray) -> np.ndarray:
        return np.bincount(classes.ravel(), minlength=r * (k + 1)).reshape(r, k + 1)[:, :k].astype(float)

    tp, pred_n, true_n = counts((tt + offset)[hit]), counts(pp + offset), counts(tt + offset)
    denom = pred_n + true_n
    # sklearn's F1 with zero_division=0: 2 tp / (2 tp + fp + fn) = 2 tp / (predicted + true)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0).mean(axis=1) if k else np.zeros(r)
    return hit.mean(axis=1), f1


def bootstrap_ci(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    labels: Sequence[str],
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for accuracy and macro-F1 (rows resampled with replacement).

    Resample r is row ``np.random.default_rng(seed).integers(0, n, (resamples, n))[r]``, so
    the intervals are reproducible from the seed alone; bounds are numpy's default (linear)
    quantiles. A None prediction counts as wrong (see ``resampled_scores``).
    """
    n = len(y_true)
    if len(y_pred) != n:
        raise ValueError(f"y_true has {n} items but y_pred has {len(y_pred)}")
    if n == 0:
        return {"accuracy": (0.0, 0.0), "macro_f1": (0.0, 0.0)}
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    acc, f1 = resampled_scores(y_true, y_pred, labels, draws)
    alpha = (1 - confidence) / 2
    return {
        "accuracy": (float(np.quantile(acc, alpha)), float(np.quantile(acc, 1 - alpha))),
        "macro_f1": (float(np.quantile(f1, alpha)), float(np.quantile(f1, 1 - alpha))),
    }


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE with equal-width bins over the top-label probability, each bin weighted by its share of rows.

    Bins are right-closed, (lo, hi], as in Guo et al. (2017): a confidence of exactly 0.5
    falls in (0.4, 0.5]; 0.0 falls in the first bin.
    """
    conf = np.asarray(confidences, dtype=float)
    hit = np.asarray(correct, dtype=float)
    if conf.size == 0:
        return 0.0
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(hit[mask].mean() - conf[mask].mean())
    return float(ece)
