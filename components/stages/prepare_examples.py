"""Stage `prepare_examples`, the loop's first: turn the configured data source into labeled examples.

Either labeled articles (questions are generated from them) or an existing
labeled-questions file (generation is skipped, rows keep ``origin: imported``).
Imported rows are deduplicated by text with the filters' normalisation and
near-duplicate index, so one question cannot sit in train and test under two ids;
the same text under two labels is an error (or dropped: ``data.conflicting_labels``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from ftloop.components.artifacts import examples_path, labels_path, write_labels
from ftloop.components.config import RunConfig
from ftloop.components.errors import InputFileError
from ftloop.components.generators.factory import generate_questions
from ftloop.components.generators.filters import NearDuplicateIndex, dedup_key, filter_rows, summarize_counts
from ftloop.components.records import Example, content_hash, label_counts, load_articles, load_questions, write_jsonl
from ftloop.components.stages.split_examples import check_splittable


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


DEDUPE_COUNTS = ("dropped_duplicate_text", "dropped_near_duplicate_text", "dropped_conflicting_labels")


def dedupe_questions(
    rows: list[Example], source: str, threshold: float, conflicting: Literal["error", "drop"] = "error"
) -> tuple[list[Example], dict[str, int]]:
    """Keep the first row (in file order) of each text; drop its exact and near-duplicates and count them.

    Exact duplicates share ``filters.dedup_key`` (case, punctuation, spacing
    ignored); near-duplicates are matched against the kept rows with the filters'
    ``NearDuplicateIndex`` at ``threshold`` (``filters.near_duplicate_threshold``).
    A duplicate with a different label is a conflict: an ``InputFileError`` naming
    both lines and labels, or with ``conflicting="drop"`` every row of that text
    (the first one too: neither label can be trusted) is dropped and counted.
    Rows carry their line in ``meta["line"]`` (``load_questions(keep_lines=True)``).
    """
    counts = dict.fromkeys(DEDUPE_COUNTS, 0)
    heads: list[Example] = []  # the first row of each text, in file order
    dropped: list[list[str]] = []  # per head: the count key of each of its dropped duplicates
    conflicted: set[int] = set()
    exact: dict[str, int] = {}
    near = NearDuplicateIndex(threshold)
    for row in rows:
        key = dedup_key(row.text)
        head, kind = exact.get(key), "duplicate"
        if head is None:
            tag = near.match(row.text)
            head, kind = (int(tag), "near_duplicate") if tag is not None else (None, kind)
        if head is None:
            exact[key] = len(heads)
            near.add(row.text, str(len(heads)))
            heads.append(row)
            dropped.append([])
            continue
        first = heads[head]
        if row.label != first.label:
            if conflicting == "error":
                where, line = first.meta.get("line"), row.meta.get("line")
                if kind == "duplicate":
                    raise InputFileError(
                        source,
                        f"text also appears at line {where} with label '{first.label}' (here '{row.label}'): "
                        "conflicting labels; correct the wrong one, or set data.conflicting_labels: drop",
                        line,
                    )
                raise InputFileError(
                    source,
                    f"text nearly duplicates line {where} (label '{first.label}', here '{row.label}'): "
                    "conflicting labels for near-identical questions; correct the wrong one, or set "
                    "data.conflicting_labels: drop",
                    line,
                )
            conflicted.add(head)
        dropped[head].append(f"dropped_{kind}_text")
    kept = []
    for i, head in enumerate(heads):
        if i in conflicted:
            counts["dropped_conflicting_labels"] += 1 + len(dropped[i])
            continue
        for reason in dropped[i]:
            counts[reason] += 1
        kept.append(head)
    return kept, counts


def load_source(config: RunConfig, path: str | None = None, generate: bool = True) -> tuple[list[Example], list[str]]:
    """Load and validate the configured source (see ``prepare_source``): examples and labels."""
    examples, labels, _ = prepare_source(config, path, generate=generate)
    return examples, labels


def prepare_source(
    config: RunConfig, path: str | None = None, checkpoint_dir: str | Path | None = None, generate: bool = True
) -> tuple[list[Example], list[str], dict[str, int]]:
    """Load and validate the configured source; also checks that it can be split without leakage.

    Generated questions go through the quality and duplicate filters, imported
    questions through ``dedupe_questions``; the third value is the artifact
    metadata of what was removed (``filtered_<reason>`` or ``dropped_<reason>``).
    ``generate=False`` validates articles without calling the generator: each
    article then stands for its questions (one row per article, its text).
    """
    data = config.data
    path = path or data.source_path
    if "://" in path:  # on the cluster the importer hands the stage a local copy
        key = "data.articles" if data.articles is not None else "data.questions"
        raise InputFileError(
            path, f"remote URIs are for cluster runs (ftloop submit); a local run reads a local file: download it and set {key} to its path"
        )
    counts: dict[str, int] = {}
    where = path
    if data.articles is not None:
        articles = load_articles(path, data.labels)
        labels = resolve_labels([a.label for a in articles], data.labels, path)
        if generate:
            generated = generate_questions(articles, config, checkpoint_dir)
            examples, filtered = filter_rows(generated, {}, labels, config.filters)
            if not examples:
                raise InputFileError(
                    path,
                    f"the {config.generate.backend} generator produced {len(generated)} question(s) and none passed the filters {filtered}",
                )
            counts = summarize_counts(filtered)
        else:
            examples = [Example(a.id, a.text, a.label, a.id, "imported") for a in articles]
    else:
        rows = load_questions(path, data.labels, keep_lines=True)
        examples, counts = dedupe_questions(rows, path, config.filters.near_duplicate_threshold, data.conflicting_labels)
        examples = [replace(e, meta={}) for e in examples]
        labels = resolve_labels([e.label for e in examples], data.labels, path)
        dropped = sum(counts.values())
        if dropped:  # a label can run short of groups because its rows were copies of each other
            where = f"{path} (after dropping {dropped} duplicate or conflicting question(s))"
    check_splittable(examples, config.split.dev, config.split.test, source=where)
    return examples, labels, counts


def run(config: RunConfig, source_path: str, out_dir: str | Path) -> dict:
    """Stage entry point: source file -> examples.jsonl + labels.json; returns artifact metadata."""
    out = Path(out_dir)
    examples, labels, removed = prepare_source(config, source_path, checkpoint_dir=out / "generation")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(examples_path(out), (e.to_dict() for e in examples))
    write_labels(out, labels)
    return {
        "rows": len(examples),
        "labels": len(labels),
        "groups": len({e.group for e in examples}),
        "origin": "imported" if config.data.questions else "generated",
        "generator": config.generate.backend if config.data.articles else "none",
        "label_counts": label_counts(examples),
        **removed,
        "content_hash": content_hash([examples_path(out), labels_path(out)]),
    }
