"""Shared fixtures: small article corpora and configs written to tmp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "webbizz" / "articles.jsonl"


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return path


def corpus_subset(labels: list[str], per_label: int) -> list[dict]:
    rows = [json.loads(l) for l in CORPUS.read_text(encoding="utf-8").splitlines() if l.strip()]
    out = []
    for label in labels:
        out += [r for r in rows if r["label"] == label][:per_label]
    return out


@pytest.fixture
def articles_file(tmp_path: Path) -> Path:
    return write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))


def write_config(path: Path, articles: Path | str, **sections) -> Path:
    import yaml

    config = {"name": "test-run", "seed": 7, "data": {"articles": str(articles)}, **sections}
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path
