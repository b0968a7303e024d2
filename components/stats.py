"""Significance and uncertainty for small eval sets.

With test sets of tens to hundreds of rows, a one-point change in accuracy is
often noise; these numbers say how much of a difference is real.
"""

from __future__ import annotations

from math import comb
from typing import Any, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000


def mcnemar_exact(before_correct: Sequence[bool], after_correct: Sequence[bool]) -> dict[str, Any]:
    """McNemar's exact test on paired outcomes: two-sided binomial test on the discordant pairs."""
    if len(before_correct) != len(after_correct):
        raise ValueError("paired outcomes must have the same length")
    fixed = sum(1 for b, a in zip(before_correct, after_correct) if not b and a)
    broken = sum(1 for b, a in zip(before_correct, after_correct) if b and not a)
    n = fixed + broken
    k = min(fixed, broken)
    p_value = 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)
    return {"fixed": fixed, "broken": broken, "discordant": n, "p_value": p_value}


def bootstrap_ci(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    seed: int,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for accuracy and macro-F1 (rows resampled with replacement)."""
    index = {label: i for i, label in enumerate(labels)}
    t = np.array([index[y] for y in y_true])
    p = np.array([index[y] for y in y_pred])
    n, k = len(t), len(labels)
    if n == 0:
        return {"accuracy": (0.0, 0.0), "macro_f1": (0.0, 0.0)}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    acc = np.empty(resamples)
    f1 = np.empty(resamples)
    for r, rows in enumerate(draws):
        tt, pp = t[rows], p[rows]
        acc[r] = np.mean(tt == pp)
        tp = np.bincount(tt[tt == pp], minlength=k).astype(float)
        pred_n = np.bincount(pp, minlength=k)
        true_n = np.bincount(tt, minlength=k)
        denom = pred_n + true_n
        # sklearn's macro-F1 with zero_division=0 over the given labels
        f1[r] = np.mean(np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0))
    alpha = (1 - confidence) / 2
    return {
        "accuracy": (float(np.quantile(acc, alpha)), float(np.quantile(acc, 1 - alpha))),
        "macro_f1": (float(np.quantile(f1, alpha)), float(np.quantile(f1, 1 - alpha))),
    }


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE with equal-width bins over the top-label probability."""
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
