"""The loop's first stage: turn the configured data source into labeled examples.

Either labeled articles (questions are generated from them) or an existing
labeled-questions file (generation is skipped, rows keep ``origin: imported``).
"""

from __future__ import annotations

from pathlib import Path

from ftloop.components.config import RunConfig
from ftloop.components.errors import InputFileError
from ftloop.components.filters import filter_rows, summarize_counts
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


def load_source(config: RunConfig, path: str | None = None, generate: bool = True) -> tuple[list[Example], list[str]]:
    """Load and validate the configured source (see ``prepare_source``): examples and labels."""
    examples, labels, _ = prepare_source(config, path, generate=generate)
    return examples, labels


def prepare_source(
    config: RunConfig, path: str | None = None, checkpoint_dir: str | Path | None = None, generate: bool = True
) -> tuple[list[Example], list[str], dict[str, int]]:
    """Load and validate the configured source; also checks that it can be split without leakage.

    Generated questions go through the quality and duplicate filters (the
    third value: removal counts per reason; empty for imported questions).
    ``generate=False`` validates articles without calling the generator: each
    article then stands for its questions (one row per article, its text).
    """
    data = config.data
    path = path or data.source_path
    if "://" in path:  # on the cluster the importer hands the stage a local copy
        key = "data.articles" if data.articles is not None else "data.questions"
        raise InputFileError(path, f"remote URIs are for cluster runs (ftloop submit); a local run reads a local file: "
                                   f"download it and set {key} to its path")
    counts: dict[str, int] = {}
    if data.articles is not None:
        articles = load_articles(path, data.labels)
        labels = resolve_labels([a.label for a in articles], data.labels, path)
        if generate:
            generated = generate_questions(articles, config, checkpoint_dir)
            examples, counts = filter_rows(generated, {}, labels, config.filters)
            if not examples:
                raise InputFileError(
                    path, f"the {config.generate.backend} generator produced {len(generated)} question(s) and none passed the filters {counts}"
                )
        else:
            examples = [Example(a.id, a.text, a.label, a.id, "imported") for a in articles]
    else:
        examples = load_questions(path, data.labels)
        labels = resolve_labels([e.label for e in examples], data.labels, path)
    check_splittable(examples, config.split.dev, config.split.test, source=path)
    return examples, labels, counts


def run_prepare(config: RunConfig, source_path: str, out_dir: str | Path) -> dict:
    """Stage entry point: source file -> examples.jsonl + labels.json; returns artifact metadata."""
    out = Path(out_dir)
    examples, labels, filtered = prepare_source(config, source_path, checkpoint_dir=out / "generation")
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
        **(summarize_counts(filtered) if filtered else {}),
        "content_hash": content_hash([out / "examples.jsonl", out / "labels.json"]),
    }
