"""Stage `evaluate`: score a fine-tuned model on every split; predictions, metrics and timing."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ftloop.components.artifacts import labels_path, read_labels, read_model_meta, read_split, write_base_model, write_predictions
from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from ftloop.components.modeling.generate_mode import generate_predictions
from ftloop.components.modeling.loading import base_model_fallback, cpu_threads_for, load_for_inference
from ftloop.components.modeling.provenance import describe_base_model
from ftloop.components.modeling.scoring import score_labels
from ftloop.components.progress import Progress
from ftloop.components.records import SPLITS


def predict_splits(
    config: RunConfig,
    model,
    tokenizer,
    splits: dict[str, list[dict[str, Any]]],
    labels: list[str],
    output_dir: str | Path,
    progress: Progress,
) -> dict[str, Any]:
    """Predict every split in ``eval.mode``, timed per split; write predictions/<split>.jsonl and metrics.json.

    Label scoring gives every label's probability; generate mode (parity with the published
    method) generates, parses strictly, and scores one-hot on the parsed label.
    """
    batch_size = config.eval.batch_size
    generated: dict[str, list[dict[str, Any]]] | None = {} if config.eval.mode == "generate" else None
    probabilities, timings = {}, {}
    for split, rows in splits.items():
        prompts = [r["prompt"] for r in rows]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        if generated is None:
            probabilities[split] = score_labels(model, tokenizer, prompts, labels, batch_size, batch_tokens=config.eval.batch_tokens)
        else:
            generated[split] = generate_predictions(model, tokenizer, prompts, labels, batch_size, config.eval.max_new_tokens)
            probabilities[split] = [{label: float(label == g["prediction"]) for label in labels} for g in generated[split]]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        batches = max(1, math.ceil(len(rows) / batch_size))
        timings[split] = {"rows_per_second": len(rows) / seconds if seconds > 0 else 0.0, "mean_batch_seconds": seconds / batches}
    return write_predictions(splits, probabilities, labels, output_dir, progress, timings, generated)


def run(
    config: RunConfig,
    model_dir: str | Path,
    formatted_dir: str | Path,
    output_dir: str | Path,
    progress: Progress = print,
) -> dict[str, Any]:
    """Predict every split; write predictions/<split>.jsonl and metrics.json; return {split: metrics}."""
    formatted_dir, output_dir = Path(formatted_dir), Path(output_dir)
    labels = read_labels(formatted_dir)
    meta = read_model_meta(model_dir)
    if meta.labels is not None and meta.labels != labels:
        raise FtloopError(f"{labels_path(formatted_dir)} lists {labels} but the model in {model_dir} was trained on {meta.labels}")
    splits = {split: read_split(formatted_dir, split, labels) for split in SPLITS}
    recorded = meta.base_model.name_or_path
    fallback = base_model_fallback(recorded, config.model.name_or_path)
    model, tokenizer = load_for_inference(
        model_dir,
        fallback,
        merged=config.eval.use_merged,
        merge_adapter=config.eval.merge_adapter,
    )
    provenance = describe_base_model(fallback or recorded, meta.base_model.revision)
    trained_on = meta.base_model_provenance
    if trained_on and trained_on.weights_sha256 and provenance.weights_sha256 and trained_on.weights_sha256 != provenance.weights_sha256:
        progress(
            f"warning: the base model's weights differ from those the adapter in {model_dir} was trained on "
            f"(sha256 {provenance.weights_sha256[:12]} here, {trained_on.weights_sha256[:12]} when trained)"
        )
    with cpu_threads_for(model):
        metrics = predict_splits(config, model, tokenizer, splits, labels, output_dir, progress)
    write_base_model(output_dir, provenance)
    return metrics
