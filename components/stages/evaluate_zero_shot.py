"""Stage `evaluate_zero_shot`: the base model prompted with the same instruction, no fine-tuning (a baseline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftloop.components.artifacts import read_labels, read_split, write_base_model
from ftloop.components.config import RunConfig
from ftloop.components.modeling.loading import (
    cpu_threads_for,
    load_base_model,
    load_tokenizer,
    quiet_progress_bars,
)
from ftloop.components.modeling.provenance import describe_base_model
from ftloop.components.progress import Progress
from ftloop.components.records import SPLITS
from ftloop.components.stages.evaluate import predict_splits


def run(config: RunConfig, formatted_dir: str | Path, output_dir: str | Path, progress: Progress = print) -> dict[str, Any]:
    """The 'just prompt it' baseline: the base model, no adapter, same prompts and the same ``eval.mode``
    as the fine-tuned models (label scoring, or generate-and-parse), so the comparison is like for like."""
    formatted_dir = Path(formatted_dir)
    labels = read_labels(formatted_dir)
    splits = {split: read_split(formatted_dir, split, labels) for split in SPLITS}
    with quiet_progress_bars():
        model = load_base_model(config.model.name_or_path, config.model.revision, config.model.dtype)
        tokenizer = load_tokenizer(config.model.name_or_path, config.model.revision)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    with cpu_threads_for(model):
        metrics = predict_splits(config, model, tokenizer, splits, labels, output_dir, progress)
    write_base_model(output_dir, describe_base_model(config.model.name_or_path, config.model.revision))
    return metrics
