"""Stage `tfidf_baseline`: TF-IDF + logistic regression trained on the same train split."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftloop.components.artifacts import BaseModelProvenance, read_labels, read_split, write_base_model, write_predictions
from ftloop.components.config import RunConfig
from ftloop.components.modeling.tfidf import TfidfClassifier
from ftloop.components.records import SPLITS


def run(config: RunConfig, formatted_dir: str | Path, output_dir: str | Path, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit on train only; predict every split; same prediction files and metrics as the LLMs."""
    seed = config.seed
    formatted_dir = Path(formatted_dir)
    labels = read_labels(formatted_dir)
    splits = {split: read_split(formatted_dir, split, labels) for split in SPLITS}
    model = TfidfClassifier([r["text"] for r in splits["train"]], [r["label"] for r in splits["train"]], labels, seed)
    probabilities, timings = timed_scores(model, splits)
    metrics = write_predictions(splits, probabilities, labels, output_dir, progress, timings)
    write_base_model(output_dir, BaseModelProvenance(source="tfidf"))  # no base model: said so, like every evaluation
    return metrics


def timed_scores(model: TfidfClassifier, splits: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """Score every split and time it, with the same throughput metrics as the LLM evaluations.

    The classifier scores a whole split in one call, so each split is one batch: its
    ``mean_batch_seconds`` is the time for the split.
    """
    probabilities, timings = {}, {}
    for split, rows in splits.items():
        start = time.perf_counter()
        probabilities[split] = model.scores([r["text"] for r in rows])
        seconds = time.perf_counter() - start
        timings[split] = {"rows_per_second": len(rows) / seconds if seconds > 0 else 0.0, "mean_batch_seconds": seconds}
    return probabilities, timings
