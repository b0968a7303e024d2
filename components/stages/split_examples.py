"""Stage `split_examples`: train/dev/test split, stratified by label and grouped by source.

Grouping by source article is what makes the test score honest: every
question generated from (or rephrased from) one article stays in one split.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

from ftloop.components.artifacts import (
    examples_path,
    labels_path,
    read_labels,
    split_path,
    write_labels,
    write_split_report,
)
from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from ftloop.components.generators.filters import dedup_key
from ftloop.components.records import (
    SPLITS,
    Example,
    content_hash,
    label_counts,
    load_examples,
    write_jsonl,
)

SHOWN_SHARED = 20  # shared groups/texts named per pair in report.json


class SplitError(FtloopError):
    """The data cannot be split as configured."""


def group_labels(examples: list[Example]) -> dict[str, str]:
    """Each group's label for stratification: its most common label (ties: alphabetical)."""
    by_group: dict[str, Counter] = defaultdict(Counter)
    for example in examples:
        by_group[example.group][example.label] += 1
    return {g: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for g, c in by_group.items()}


def split_sizes(n_groups: int, dev: float, test: float) -> tuple[int, int, int]:
    """Groups per split for one label: at least one group in each split."""
    n_test = max(1, round(n_groups * test))
    n_dev = max(1, round(n_groups * dev))
    return n_groups - n_dev - n_test, n_dev, n_test


def check_splittable(examples: list[Example], dev: float, test: float, source: str = "data") -> None:
    """Raise a clear error for every label that has too few groups to appear in all three splits."""
    groups_per_label = Counter(group_labels(examples).values())
    problems = []
    for label, n_groups in sorted(groups_per_label.items()):
        n_train, _, _ = split_sizes(n_groups, dev, test)
        if n_train < 1:
            problems.append(
                f"label '{label}' has {n_groups} source group(s) (articles); at least "
                f"{n_groups - n_train + 1} are needed so train, dev and test each get one"
            )
    if problems:
        raise SplitError(
            f"{source}: cannot split without leaking: "
            + "; ".join(problems)
            + ". Add more articles (or question groups) for these labels, or remove them."
        )


def split_examples(examples: list[Example], dev: float, test: float, seed: int) -> dict[str, list[Example]]:
    """Deterministic grouped, stratified split: same rows and seed -> same split, whatever the input order."""
    check_splittable(examples, dev, test)
    labels_of_group = group_labels(examples)
    groups_by_label: dict[str, list[str]] = defaultdict(list)
    for group, label in sorted(labels_of_group.items()):
        groups_by_label[label].append(group)
    split_of_group: dict[str, str] = {}
    for label, groups in sorted(groups_by_label.items()):
        rng = random.Random(f"{seed}:{label}")
        groups = sorted(groups)
        rng.shuffle(groups)
        n_train, n_dev, _ = split_sizes(len(groups), dev, test)
        for i, group in enumerate(groups):
            split_of_group[group] = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
    result: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for example in sorted(examples, key=lambda e: e.id):
        result[split_of_group[example.group]].append(example)
    return result


def leakage_report(splits: dict[str, list[Example]]) -> dict:
    """What two splits share, for every pair: source groups and question texts; all zero for a clean split.

    ``group_overlap``/``text_overlap`` count the shared groups and the shared
    texts (compared as the filters compare them: ``filters.dedup_key``, so case,
    punctuation and spacing are ignored); ``shared_groups``/``shared_texts`` name
    up to ``SHOWN_SHARED`` of them for every pair that shares any.
    """
    groups = {name: {e.group for e in rows} for name, rows in splits.items()}
    texts: dict[str, dict[str, str]] = {name: {} for name in splits}  # split -> dedup key -> the text of its first row
    for name, rows in splits.items():
        for e in sorted(rows, key=lambda e: e.id):
            texts[name].setdefault(dedup_key(e.text), e.text)
    names = list(splits)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    shared_groups = {f"{a}-{b}": sorted(groups[a] & groups[b]) for a, b in pairs}
    shared_texts = {f"{a}-{b}": [texts[a][k] for k in sorted(texts[a].keys() & texts[b].keys())] for a, b in pairs}
    return {
        "group_overlap": {pair: len(shared) for pair, shared in shared_groups.items()},
        "shared_groups": {pair: shared[:SHOWN_SHARED] for pair, shared in shared_groups.items() if shared},
        "text_overlap": {pair: len(shared) for pair, shared in shared_texts.items()},
        "shared_texts": {pair: shared[:SHOWN_SHARED] for pair, shared in shared_texts.items() if shared},
        "groups": {name: len(g) for name, g in groups.items()},
        "rows": {name: len(rows) for name, rows in splits.items()},
        "labels": {name: label_counts(rows) for name, rows in splits.items()},
    }


def write_splits(splits: dict[str, list[Example]], labels: list[str], out_dir: str | Path, extra: dict | None = None) -> dict:
    """Write train/dev/test.jsonl, labels.json and report.json; return artifact metadata."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        write_jsonl(split_path(out, name), (e.to_dict() for e in splits[name]))
    write_labels(out, labels, minimum=1)  # a classifier needs two; format_chat and training check that
    report = write_split_report(out, {**leakage_report(splits), **(extra or {})})
    return {
        "rows": sum(report.rows.values()),
        **{f"{name}_rows": report.rows[name] for name in SPLITS},
        "labels": len(labels),
        "test_group_overlap": report.group_overlap["train-test"] + report.group_overlap["dev-test"],
        "test_text_overlap": report.text_overlap["train-test"] + report.text_overlap["dev-test"],
        "content_hash": content_hash([split_path(out, name) for name in SPLITS] + [labels_path(out)]),
    }


def read_splits(split_dir: str | Path) -> tuple[dict[str, list[Example]], list[str]]:
    labels = read_labels(split_dir, minimum=1)
    return {name: load_examples(split_path(split_dir, name)) for name in SPLITS}, labels


def run(config: RunConfig, examples_dir: str | Path, out_dir: str | Path) -> dict:
    """Stage entry point: examples.jsonl + labels.json -> train/dev/test."""
    dev, test, seed = config.split.dev, config.split.test, config.seed
    examples = load_examples(examples_path(examples_dir))
    labels = read_labels(examples_dir)
    splits = split_examples(examples, dev=dev, test=test, seed=seed)
    return write_splits(splits, labels, out_dir, extra={"seed": seed})
