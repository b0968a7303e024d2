"""TF-IDF + logistic regression on the same splits: the cheap model a fine-tune has to beat."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ftloop.components.finetune import read_labels, read_split
from ftloop.components.metrics import write_predictions
from ftloop.components.records import SPLITS


def run_tfidf_baseline(formatted_dir: str | Path, output_dir: str | Path, seed: int, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit on train only; predict every split; same prediction files and metrics as the LLMs."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    formatted_dir = Path(formatted_dir)
    labels = read_labels(formatted_dir)
    splits = {split: read_split(formatted_dir, split, labels) for split in SPLITS}
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True),
        LogisticRegression(C=10.0, max_iter=2000, random_state=seed),
    )
    model.fit([r["text"] for r in splits["train"]], [r["label"] for r in splits["train"]])
    classes = list(model.classes_)
    probabilities = {}
    for split, rows in splits.items():
        proba = model.predict_proba([r["text"] for r in rows]) if rows else []
        # Labels absent from train get probability 0, so every label has a score.
        probabilities[split] = [
            {label: float(p[classes.index(label)]) if label in classes else 0.0 for label in labels} for p in proba
        ]
    return write_predictions(splits, probabilities, labels, output_dir, progress)
