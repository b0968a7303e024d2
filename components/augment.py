"""Error-driven augmentation: rephrase what the model got wrong, filtered, into the train split.

Errors are mined from train and dev only: mining test would turn the test
score into a training signal. Rephrasings keep their parent's group, so a
mined dev question's rephrasings make the augmented model's dev score
optimistic; the report says so and test remains the honest number.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ftloop.components.generate import make_generator
from ftloop.components.records import Example, read_jsonl
from ftloop.components.split import read_splits, write_splits

MINED_SPLITS = ("train", "dev")
_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Key for exact-duplicate detection: case, punctuation and spacing ignored."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def mine_errors(predictions: dict[str, list[dict]]) -> list[dict]:
    """Misclassified rows of the mined splits; refuses to look at test."""
    if "test" in predictions:
        raise ValueError("error mining must never see the test split")
    return [row for split in MINED_SPLITS for row in predictions.get(split, []) if row["prediction"] != row["label"]]


def filter_new_rows(
    new_rows: list[Example], existing: list[Example], max_per_class: int, min_chars: int = 3, max_chars: int = 500
) -> tuple[list[Example], dict[str, int]]:
    """Drop empty/out-of-bounds text and exact duplicates (within the new rows and against all splits); cap per class."""
    seen = {normalize(e.text) for e in existing}
    per_class: Counter = Counter()
    kept: list[Example] = []
    removed = Counter({"empty_or_length": 0, "duplicate": 0, "class_cap": 0})
    for row in new_rows:
        key = normalize(row.text)
        if not key or not (min_chars <= len(row.text.strip()) <= max_chars):
            removed["empty_or_length"] += 1
        elif key in seen:
            removed["duplicate"] += 1
        elif per_class[row.label] >= max_per_class:
            removed["class_cap"] += 1
        else:
            seen.add(key)
            per_class[row.label] += 1
            kept.append(row)
    return kept, dict(removed)


def run_augment(
    split_dir: str | Path,
    eval_dir: str | Path,
    out_dir: str | Path,
    backend: str,
    rephrasings_per_error: int,
    max_per_class: int,
    seed: int,
) -> dict:
    """Stage entry point: splits + the model's train/dev predictions -> splits with an augmented train."""
    splits, labels = read_splits(split_dir)
    predictions = {split: read_jsonl(Path(eval_dir) / "predictions" / f"{split}.jsonl") for split in MINED_SPLITS}
    errors = mine_errors(predictions)
    by_id = {e.id: e for split in MINED_SPLITS for e in splits[split]}
    parents = [by_id[row["id"]] for row in errors]
    hint = {row["id"]: row["prediction"] for row in errors}
    generated = make_generator(backend, seed).rephrase(parents, rephrasings_per_error, hint)
    existing = [e for rows in splits.values() for e in rows]
    kept, removed = filter_new_rows(generated, existing, max_per_class)
    augmented = {**splits, "train": splits["train"] + kept}
    confusions = Counter(f"{row['label']}->{row['prediction']}" for row in errors)
    ids_of = {split: {e.id for e in splits[split]} for split in MINED_SPLITS}
    extra = {
        "augmentation": {
            "errors_mined": {split: sum(1 for r in errors if r["id"] in ids_of[split]) for split in MINED_SPLITS},
            "confusions": dict(confusions.most_common()),
            "generated": len(generated),
            "removed": removed,
            "added": len(kept),
            "added_per_class": dict(sorted(Counter(e.label for e in kept).items())),
            "dev_groups_in_train": len({e.group for e in kept} & {e.group for e in splits["dev"]}),
            "backend": backend,
        }
    }
    meta = write_splits(augmented, labels, out_dir, extra=extra)
    return {
        **meta,
        "errors_mined": len(errors),
        "rows_generated": len(generated),
        "rows_added": len(kept),
        **{f"removed_{k}": v for k, v in removed.items()},
    }
