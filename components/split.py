"""Train/dev/test split, stratified by label and grouped by source.

Grouping by source article is what makes the test score honest: every
question generated from (or rephrased from) one article stays in one split.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from ftloop.components.errors import FtloopError
from ftloop.components.records import (
    SPLITS,
    Example,
    content_hash,
    label_counts,
    load_examples,
    write_json,
    write_jsonl,
)


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
            f"{source}: cannot split without leaking: " + "; ".join(problems)
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
    """Group overlap between every pair of splits; all zero for a clean split."""
    groups = {name: {e.group for e in rows} for name, rows in splits.items()}
    names = list(splits)
    overlap = {
        f"{a}-{b}": sorted(groups[a] & groups[b]) for i, a in enumerate(names) for b in names[i + 1 :]
    }
    return {
        "group_overlap": {pair: len(shared) for pair, shared in overlap.items()},
        "shared_groups": {pair: shared[:20] for pair, shared in overlap.items() if shared},
        "groups": {name: len(g) for name, g in groups.items()},
        "rows": {name: len(rows) for name, rows in splits.items()},
        "labels": {name: label_counts(rows) for name, rows in splits.items()},
    }


def write_splits(splits: dict[str, list[Example]], labels: list[str], out_dir: str | Path, extra: dict | None = None) -> dict:
    """Write train/dev/test.jsonl, labels.json and report.json; return artifact metadata."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", (e.to_dict() for e in splits[name]))
    write_json(out / "labels.json", labels)
    report = {**leakage_report(splits), **(extra or {})}
    write_json(out / "report.json", report)
    return {
        "rows": sum(report["rows"].values()),
        **{f"{name}_rows": report["rows"][name] for name in SPLITS},
        "labels": len(labels),
        "test_group_overlap": report["group_overlap"]["train-test"] + report["group_overlap"]["dev-test"],
        "content_hash": content_hash([out / f"{name}.jsonl" for name in SPLITS] + [out / "labels.json"]),
    }


def read_splits(split_dir: str | Path) -> tuple[dict[str, list[Example]], list[str]]:
    d = Path(split_dir)
    labels = json.loads((d / "labels.json").read_text(encoding="utf-8"))
    return {name: load_examples(d / f"{name}.jsonl") for name in SPLITS}, labels


def run_split(examples_dir: str | Path, out_dir: str | Path, dev: float, test: float, seed: int) -> dict:
    """Stage entry point: examples.jsonl + labels.json -> train/dev/test."""
    d = Path(examples_dir)
    examples = load_examples(d / "examples.jsonl")
    labels = json.loads((d / "labels.json").read_text(encoding="utf-8"))
    splits = split_examples(examples, dev=dev, test=test, seed=seed)
    return write_splits(splits, labels, out_dir, extra={"seed": seed})
