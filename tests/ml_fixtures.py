"""Shared ML test fixtures: synthetic intent data, a tiny Phi-3, one fine-tuned adapter.

Import the fixtures into a test module (``from ml_fixtures import ...``); the
expensive artifacts are cached per process, so a fine-tune runs once per test
session however many modules use it. Not a conftest: tests/conftest.py belongs
to the data/pipeline tests.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

from ftloop.components.prompts import chat_row
from ftloop.components.records import write_json, write_jsonl

KEYWORDS: dict[str, list[str]] = {
    "returns": ["return", "refund", "exchange", "send it back", "receipt", "unworn", "return label",
                "restocking fee", "wrong size", "money back"],
    "shipping": ["delivery", "parcel", "tracking number", "courier", "arrive", "dispatch", "express",
                 "international", "postage", "package"],
    "sustainability": ["recycled", "organic", "carbon", "eco-friendly", "packaging waste", "ethical",
                       "renewable", "footprint", "biodegradable", "fair trade"],
    "membership": ["member", "loyalty", "points", "tier", "rewards", "perks", "annual fee",
                   "sign up", "club", "vip"],
    "support": ["agent", "contact", "live chat", "phone number", "opening hours", "ticket", "complaint",
                "representative", "speak to someone", "help desk"],
    "safety": ["safe", "recall", "hazard", "allergy", "battery", "fire", "certified", "choking",
               "warning", "toxic"],
    "newsletter": ["newsletter", "unsubscribe", "emails", "inbox", "weekly digest", "mailing list",
                   "promotions", "spam", "subscribe", "updates"],
    "payments": ["pay", "credit card", "invoice", "charged twice", "paypal", "installments", "billing",
                 "declined", "currency", "gift card"],
}
LABELS = sorted(KEYWORDS)
OPENERS = ["hi, I wanted to ask about", "could you tell me about the", "I need some information on",
           "quick question regarding", "hello team, what about", "can you explain the", "I am confused about",
           "please help me with", "what is your policy on", "I would like to know about"]
FILLERS = ["for my order", "from last week", "on the website", "with my account", "for a gift",
           "in the app", "for my family", "this month", "on my last purchase", "as soon as possible"]
CLOSERS = ["thanks", "please", "thank you so much", "any advice", "cheers", "kind regards"]


def synthetic_examples(n_per_label: int, seed: int, split: str) -> list[dict[str, Any]]:
    """Short questions whose label is carried by 2 of its 10 keywords amid shared filler (10-20 words)."""
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for label in LABELS:
        for i in range(n_per_label):
            kw1, kw2 = rng.sample(KEYWORDS[label], 2)
            text = f"{rng.choice(OPENERS)} {kw1} {rng.choice(FILLERS)} and the {kw2}, {rng.choice(CLOSERS)}"
            rows.append({"id": f"{split}-{label}-{i}", "text": text, "label": label,
                         "group": f"{label}-{i % 5}", "origin": "generated"})
    rng.shuffle(rows)
    return rows


def write_formatted(path: Path, n_train: int = 25, n_dev: int = 8, n_test: int = 12, seed: int = 0) -> Path:
    """A formatted-data directory exactly as the format step writes it."""
    path.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        write_jsonl(path / f"{split}.jsonl", [chat_row(r, LABELS) for r in synthetic_examples(n, seed, split)])
    write_json(path / "labels.json", LABELS)
    return path


def build_tiny(path: Path, formatted: Path, seed: int = 0, **size: Any) -> Path:
    from ftloop.components.records import read_jsonl
    from ftloop.components.tiny_model import build_tiny_model

    texts = [r["text"] for split in ("train", "dev", "test") for r in read_jsonl(formatted / f"{split}.jsonl")]
    return build_tiny_model(path, texts, LABELS, seed=seed, **size)


def demo_config(model_path: Path, **train: Any):
    """The recommended CPU demo settings (configs/demo.yaml) pointed at a local tiny model."""
    from ftloop.components.config import RunConfig

    train_cfg = {"epochs": 20, "learning_rate": 5e-3, "batch_size": 8, "warmup_ratio": 0.05,
                 "lr_scheduler": "linear", "logging_steps": 25, "max_length": 256, **train}
    return RunConfig.model_validate({
        "seed": 0,
        "data": {"questions": "unused.jsonl"},
        "model": {"name_or_path": str(model_path), "dtype": "float32"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": train_cfg,
        "eval": {"batch_size": 32},
    })


_CACHE: dict[str, Any] = {}


@pytest.fixture(scope="session")
def formatted_dir(tmp_path_factory) -> Path:
    if "formatted" not in _CACHE:
        _CACHE["formatted"] = write_formatted(tmp_path_factory.mktemp("formatted"))
    return _CACHE["formatted"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, formatted_dir) -> Path:
    if "tiny" not in _CACHE:
        _CACHE["tiny"] = build_tiny(tmp_path_factory.mktemp("tiny"), formatted_dir)
    return _CACHE["tiny"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, formatted_dir, tiny_model_dir) -> dict[str, Any]:
    """One real fine-tune shared by the finetune and evaluate tests: {dir, meta, lines, config}."""
    if "trained" not in _CACHE:
        from ftloop.components.finetune import finetune

        out = tmp_path_factory.mktemp("adapter")
        config = demo_config(tiny_model_dir)
        lines: list[str] = []
        meta = finetune(config, formatted_dir, out, progress=lines.append)
        _CACHE["trained"] = {"dir": out, "meta": meta, "lines": lines, "config": config}
    return _CACHE["trained"]
