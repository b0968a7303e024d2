"""Quality filters for generated questions and rephrasings.

Every generator backend's rows go through the same checks, in this order:
normalisation (Unicode NFKC, list numbering and wrapping quotes stripped,
spacing collapsed); length bounds; garbage (mostly non-letters, too few words,
one word repeated); echoes of the generation prompt; label leakage (the answer
written into the question); exact duplicates; near-duplicates (Jaccard
similarity of character 4-gram shingles). Duplicates are checked within the new
rows and against every existing split, so a rephrasing near-identical to a test
question never reaches train. Each row removed is counted under one reason;
the counts go into the artifact metadata.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import replace

from ftloop.components.config import FiltersConfig
from ftloop.components.records import SPLITS, Example

SHINGLE = 4
QUALITY_REASONS = ("empty", "too_short", "too_long", "garbage", "prompt_echo", "label_leak")
DUPLICATE_REASONS = tuple(
    f"{kind}_{where}" for kind in ("duplicate", "near_duplicate") for where in ("within_new", *(f"of_{s}" for s in SPLITS))
)
REASONS = QUALITY_REASONS + DUPLICATE_REASONS

_SPACE = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")
_LIST_MARKER = re.compile(r"^\s*(?:\d{1,3}\s*[.):]|[-*\u2022])\s+")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
# Text a model writes when it talks about the task instead of doing it.
_ECHO = re.compile(
    r"\b(?:rephras\w*|paraphras\w*|reword\w*|here (?:are|is) (?:the|some|a|your)|json|numbered list|as an ai|"
    r"language model|customer questions?\s*:|the (?:original|given) (?:question|text|article))\b"
    r"|^(?:question|output|answer|input|response|article)\s*\d*\s*[:#]|<\||###|\{|\}",
    re.IGNORECASE,
)
_LEAK = re.compile(r"\b(?:label|intent|category|class)\s*[:=]", re.IGNORECASE)


def normalize_text(text: str) -> str:
    """The text a row keeps: NFKC, one list marker and wrapping quotes stripped, spacing collapsed."""
    text = unicodedata.normalize("NFKC", text)
    text = _SPACE.sub(" ", text).strip()
    text = _LIST_MARKER.sub("", text, count=1).strip()
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def dedup_key(text: str) -> str:
    """Key for exact-duplicate detection: case, punctuation and spacing ignored."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower())).strip()


def shingles(text: str, n: int = SHINGLE) -> frozenset[str]:
    key = dedup_key(text)
    if len(key) <= n:
        return frozenset({key}) if key else frozenset()
    return frozenset(key[i : i + n] for i in range(len(key) - n + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def quality_problem(text: str, labels: Iterable[str], cfg: FiltersConfig) -> str | None:
    """The first quality reason (see QUALITY_REASONS) this normalised text fails, or None."""
    if not dedup_key(text):
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    words = _WORD.findall(text.lower())
    visible = [ch for ch in text if not ch.isspace()]
    alpha = sum(ch.isalpha() for ch in visible) / len(visible)
    if len(words) < cfg.min_words or alpha < cfg.min_alpha_ratio:
        return "garbage"
    if len(words) >= 4 and Counter(words).most_common(1)[0][1] > len(words) / 2:
        return "garbage"
    if _ECHO.search(text):
        return "prompt_echo"
    lowered = text.lower().strip()
    for label in labels:
        name = label.lower()
        if lowered == name or lowered.startswith(f"{name}:") or f"[{name}]" in lowered or f"({name})" in lowered or f"<{name}>" in lowered:
            return "label_leak"
    if _LEAK.search(text):
        return "label_leak"
    return None


class NearDuplicateIndex:
    """Shingle sets with an inverted index, so a lookup only compares rows sharing a shingle."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self._sets: list[frozenset[str]] = []
        self._tags: list[str] = []
        self._postings: dict[str, list[int]] = defaultdict(list)

    def add(self, text: str, tag: str) -> None:
        idx = len(self._sets)
        s = shingles(text)
        self._sets.append(s)
        self._tags.append(tag)
        for sh in s:
            self._postings[sh].append(idx)

    def match(self, text: str) -> str | None:
        """Tag of the most similar indexed row at or above the threshold, else None."""
        s = shingles(text)
        if not s:
            return None
        overlap: Counter = Counter()
        for sh in s:
            overlap.update(self._postings.get(sh, ()))
        best, best_tag = 0.0, None
        for idx, inter in overlap.items():
            sim = inter / (len(s) + len(self._sets[idx]) - inter)
            if sim > best:
                best, best_tag = sim, self._tags[idx]
        return best_tag if best >= self.threshold else None


def empty_counts() -> dict[str, int]:
    return {reason: 0 for reason in REASONS}


def filter_rows(
    new_rows: list[Example],
    existing: dict[str, list[Example]],
    labels: list[str],
    cfg: FiltersConfig,
) -> tuple[list[Example], dict[str, int]]:
    """Normalise and filter ``new_rows``; returns the kept rows (normalised text) and removal counts per reason.

    ``existing`` maps a split name (train/dev/test) to its rows; a new row that
    duplicates or nearly duplicates any of them is dropped and counted per split.
    """
    counts = empty_counts()
    exact: dict[str, str] = {}
    near = NearDuplicateIndex(cfg.near_duplicate_threshold)
    for split, rows in existing.items():
        for row in rows:
            exact.setdefault(dedup_key(row.text), f"of_{split}")
            near.add(row.text, f"of_{split}")
    kept: list[Example] = []
    for row in new_rows:
        text = normalize_text(row.text)
        problem = quality_problem(text, labels, cfg)
        if problem:
            counts[problem] += 1
            continue
        key = dedup_key(text)
        if key in exact:
            counts[f"duplicate_{exact[key]}"] += 1
            continue
        similar = near.match(text)
        if similar:
            counts[f"near_duplicate_{similar}"] += 1
            continue
        exact[key] = "within_new"
        near.add(text, "within_new")
        kept.append(replace(row, text=text) if text != row.text else row)
    return kept, counts


def summarize_counts(counts: dict[str, int]) -> dict[str, int]:
    """Flat artifact-metadata view: ``filtered_<reason>`` plus a total."""
    return {**{f"filtered_{k}": v for k, v in counts.items()}, "filtered_total": sum(counts.values())}
