"""Choosing a generator backend by name, and generating questions for a set of articles."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ftloop.components.records import Article, Example

if TYPE_CHECKING:
    from ftloop.components.config import RunConfig
from ftloop.components.generators.base import Generator
from ftloop.components.generators.offline import OfflineGenerator


def make_generator(backend: str, config: RunConfig, checkpoint_dir: str | Path | None = None) -> Generator:
    """The configured backend; prompted backends checkpoint completed requests under ``checkpoint_dir``."""
    checkpoint = Path(checkpoint_dir) / f"{backend}-requests.jsonl" if checkpoint_dir else None
    if backend == "offline":
        return OfflineGenerator(config.seed)
    if backend == "openai":
        from ftloop.components.generators.openai import OpenAIGenerator

        return OpenAIGenerator(config.generators.openai, config.seed, checkpoint)
    if backend == "hf":
        from ftloop.components.generators.hf import HFGenerator

        return HFGenerator(config.generators.hf, config.seed, checkpoint)
    if backend == "okareo":
        from ftloop.components.generators.okareo import OkareoGenerator

        return OkareoGenerator(config.generators.okareo, config.seed, checkpoint)
    raise ValueError(f"unknown generator backend {backend!r}")


def generate_questions(articles: list[Article], config: RunConfig, checkpoint_dir: str | Path | None = None) -> list[Example]:
    backend = config.generate.backend
    return make_generator(backend, config, checkpoint_dir).questions(articles, config.generate.questions_per_article)
