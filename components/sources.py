"""The loop's first stage: turn the configured data source into labeled examples.

Either labeled articles (questions are generated from them) or an existing
labeled-questions file (generation is skipped, rows keep ``origin: imported``).
"""

from __future__ import annotations

from pathlib import Path

from ftloop.components.config import RunConfig
from ftloop.components.errors import InputFileError
from ftloop.components.generate import generate_questions
from ftloop.components.records import Example, content_hash, label_counts, load_articles, load_questions, write_json, write_jsonl
from ftloop.components.split import check_splittable


def resolve_labels(found: list[str], configured: list[str] | None, source: str) -> list[str]:
    """The label set of the run: the configured list (in its order) or the sorted labels found."""
    if configured is None:
        labels = sorted(set(found))
        if len(labels) < 2:
            raise InputFileError(source, f"found only {len(labels)} distinct label(s); a classifier needs at least two")
        return labels
    missing = sorted(set(configured) - set(found))
    if missing:
        raise InputFileError(source, f"configured label(s) {missing} have no rows in the data")
    return list(configured)


def load_source(config: RunConfig, path: str | None = None) -> tuple[list[Example], list[str]]:
    """Load and validate the configured source; also checks that it can be split without leakage."""
    data = config.data
    path = path or data.source_path
    if data.articles is not None:
        articles = load_articles(path, data.labels)
        labels = resolve_labels([a.label for a in articles], data.labels, path)
        examples = generate_questions(articles, config.generate.backend, config.generate.questions_per_article, config.seed)
    else:
        examples = load_questions(path, data.labels)
        labels = resolve_labels([e.label for e in examples], data.labels, path)
    check_splittable(examples, config.split.dev, config.split.test, source=path)
    return examples, labels


def run_prepare(config: RunConfig, source_path: str, out_dir: str | Path) -> dict:
    """Stage entry point: source file -> examples.jsonl + labels.json; returns artifact metadata."""
    examples, labels = load_source(config, source_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "examples.jsonl", (e.to_dict() for e in examples))
    write_json(out / "labels.json", labels)
    return {
        "rows": len(examples),
        "labels": len(labels),
        "groups": len({e.group for e in examples}),
        "origin": "imported" if config.data.questions else "generated",
        "generator": config.generate.backend if config.data.articles else "none",
        "label_counts": label_counts(examples),
        "content_hash": content_hash([out / "examples.jsonl", out / "labels.json"]),
    }
