"""TF-IDF + logistic regression on the same splits: the cheap model a fine-tune has to beat."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ftloop.components.finetune import read_labels, read_split
from ftloop.components.metrics import write_predictions
from ftloop.components.records import SPLITS


class TfidfClassifier:
    """TF-IDF (word 1-2 grams) + logistic regression; also the augmentation loop's cheap label judge."""

    def __init__(self, texts: list[str], targets: list[str], labels: list[str], seed: int):
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline

        self.labels = list(labels)
        self.model = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
            LogisticRegression(C=10.0, max_iter=2000, random_state=seed),
        )
        self.model.fit(texts, targets)
        self.classes = list(self.model.classes_)

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        """A probability per label for each text; labels absent from train get 0, so every label has a score."""
        proba = self.model.predict_proba(texts) if texts else []
        return [
            {label: float(p[self.classes.index(label)]) if label in self.classes else 0.0 for label in self.labels}
            for p in proba
        ]


def run_tfidf_baseline(formatted_dir: str | Path, output_dir: str | Path, seed: int, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit on train only; predict every split; same prediction files and metrics as the LLMs."""
    formatted_dir = Path(formatted_dir)
    labels = read_labels(formatted_dir)
    splits = {split: read_split(formatted_dir, split, labels) for split in SPLITS}
    model = TfidfClassifier([r["text"] for r in splits["train"]], [r["label"] for r in splits["train"]], labels, seed)
    probabilities, timings = timed_scores(model, splits)
    return write_predictions(splits, probabilities, labels, output_dir, progress, timings)


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
