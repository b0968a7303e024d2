"""TF-IDF + logistic regression: the classical baseline, also the augmentation's label judge."""

from __future__ import annotations


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
        return [{label: float(p[self.classes.index(label)]) if label in self.classes else 0.0 for label in self.labels} for p in proba]
