"""Evaluate a fine-tuned adapter by scoring every label, not by generating text.

Scoring the label tokens in one batched forward pass is exact, needs no output
parsing, never yields an invalid label, and gives a probability per label that
the error analysis and augmentation steps use. It is also orders of magnitude
faster than generate() (notes/finetune.md §4a).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from ftloop.components.finetune import (
    MODEL_META,
    Progress,
    chat_token_ids,
    cpu_threads_for,
    load_base_model,
    peft_deprecation_silenced,
    quiet_progress_bars,
    read_labels,
    read_split,
)
from ftloop.components.metrics import write_predictions
from ftloop.components.records import SPLITS

Message = dict[str, str]


# ------------------------------------------------------------------- loading


def read_model_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_META
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FtloopError(f"{path}: not found; is {model_dir} a directory written by the finetune step?") from None
    except json.JSONDecodeError as exc:
        raise FtloopError(f"{path}: not valid JSON: {exc.msg}") from None


def load_for_inference(model_dir: str | Path, base_model: str | None = None, merged: bool = False):
    """The trained model in eval mode: the base (loaded by the same rules as for training) plus the adapter,
    or, with ``merged``, the merged export written by ``train.export_merged``.

    ``base_model`` overrides the recorded base path, for when the base was built
    or mounted at a different path than during training (e.g. another KFP step).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    meta = read_model_meta(model_dir)
    base = meta["base_model"]
    with quiet_progress_bars(), peft_deprecation_silenced():
        if merged:
            from ftloop.components.model_export import MERGED_DIR

            if not (model_dir / MERGED_DIR).is_dir():
                raise FtloopError(
                    f"eval.use_merged is set but {model_dir} has no {MERGED_DIR}/ export; "
                    "train with train.export_merged: true"
                )
            model = load_base_model(str(model_dir / MERGED_DIR), None, meta.get("merged", {}).get("dtype", base.get("dtype", "auto")))
        else:
            model = load_base_model(
                base_model or base["name_or_path"], base.get("revision"), base.get("dtype", "auto"),
                base.get("quantization", "none"),
            )
            model = PeftModel.from_pretrained(model, str(model_dir), is_trainable=False)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    model.eval()
    if torch.cuda.is_available() and (merged or base.get("quantization", "none") == "none"):
        model.to("cuda")  # a 4-bit base is placed on the GPU while loading
    return model, tokenizer


# ------------------------------------------------------------------- scoring


def _encode_prompt(tokenizer, prompt: list[Message]) -> list[int]:
    return chat_token_ids(tokenizer, prompt, add_generation_prompt=True)


def _encode_conversation(tokenizer, messages: list[Message]) -> list[int]:
    return chat_token_ids(tokenizer, messages)


def label_token_ids(tokenizer, prompt: list[Message], labels: Sequence[str]) -> list[list[int]]:
    """Each label's content tokens exactly as the chat template renders them after this prompt.

    The completion tail is what follows the generation prompt; the template's
    own closing tokens (found by rendering an empty answer) are cut off.
    """
    prompt_ids = _encode_prompt(tokenizer, prompt)
    closing = _encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": ""}])
    if closing[: len(prompt_ids)] != prompt_ids:
        raise FtloopError("chat template renders the prompt differently with and without an answer; cannot score labels")
    closing = closing[len(prompt_ids):]
    out = []
    for label in labels:
        full = _encode_conversation(tokenizer, [*prompt, {"role": "assistant", "content": label}])
        if full[: len(prompt_ids)] != prompt_ids:
            raise FtloopError(f"label {label!r} merges with the end of the prompt when tokenized; cannot score it")
        tail = full[len(prompt_ids):]
        if closing and tail[-len(closing):] == closing:
            tail = tail[: -len(closing)]
        if not tail:
            raise FtloopError(f"label {label!r} renders to no tokens")
        out.append(tail)
    return out


def _pad_batch(seqs: list[list[int]], pad_id: int, padding_side: str, device) -> dict[str, torch.Tensor]:
    """Padded ids + mask + explicit positions, so padding never shifts a real token's position."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        if padding_side == "left":
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        else:
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


@torch.no_grad()
def _next_token_logprobs(
    model, pad_id: int, seqs: list[list[int]], spans: list[tuple[int, int]], batch_size: int, padding_side: str
) -> list[torch.Tensor]:
    """Per sequence, log-probs over the vocabulary of the token after each position in span [a, b).

    Sequences are batched shortest-first (less padding) and returned in input order.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        batch = _pad_batch([seqs[i] for i in idx], pad_id, padding_side, device)
        logits = model(**batch, use_cache=False).logits
        width = logits.shape[1]
        for row, i in enumerate(idx):
            offset = width - len(seqs[i]) if padding_side == "left" else 0
            a, b = spans[i]
            out[i] = torch.log_softmax(logits[row, offset + a: offset + b].float(), dim=-1).cpu()
    return out  # type: ignore[return-value]


def score_labels(
    model,
    tokenizer,
    prompts: list[list[Message]],
    labels: list[str],
    batch_size: int,
    padding_side: str = "right",
) -> list[dict[str, float]]:
    """P(label | prompt) for every prompt: label log-likelihoods, softmaxed over the labels.

    When every label starts with a distinct token, the first token decides and
    one forward pass per prompt suffices; otherwise each (prompt, label) pair is
    scored by the summed log-probs of all the label's tokens.
    """
    if not prompts:
        return []
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    label_ids = label_token_ids(tokenizer, prompts[0], labels)
    prompt_ids = [_encode_prompt(tokenizer, p) for p in prompts]
    firsts = [ids[0] for ids in label_ids]

    if len(set(firsts)) == len(firsts):
        spans = [(len(p) - 1, len(p)) for p in prompt_ids]
        logps = _next_token_logprobs(model, pad_id, prompt_ids, spans, batch_size, padding_side)
        scores = torch.stack([lp[0, firsts] for lp in logps])
    else:
        seqs, spans, targets = [], [], []
        for p in prompt_ids:
            for ids in label_ids:
                seqs.append(p + ids)
                spans.append((len(p) - 1, len(p) + len(ids) - 1))
                targets.append(ids)
        logps = _next_token_logprobs(model, pad_id, seqs, spans, batch_size, padding_side)
        flat = [lp.gather(1, torch.tensor(t).unsqueeze(1)).sum() for lp, t in zip(logps, targets)]
        scores = torch.stack(flat).view(len(prompts), len(labels))
    probs = torch.softmax(scores.double(), dim=-1)
    return [{label: float(p) for label, p in zip(labels, row)} for row in probs.tolist()]


# ------------------------------------------------------------------- metrics


# ---------------------------------------------------------------- evaluation


def _base_override(config: RunConfig, meta: dict[str, Any]) -> str | None:
    """Use the run config's base when the recorded local base path is gone (artifacts move between steps)."""
    recorded = meta["base_model"]["name_or_path"]
    if Path(recorded).is_dir() or not Path(recorded).is_absolute():
        return None
    return config.model.name_or_path


def timed_scoring(model, tokenizer, splits, labels, batch_size):
    """Score every split and measure throughput, so speed regressions show up in the metrics."""
    probabilities, timings = {}, {}
    for split, rows in splits.items():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        probabilities[split] = score_labels(model, tokenizer, [r["prompt"] for r in rows], labels, batch_size)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        batches = max(1, math.ceil(len(rows) / batch_size))
        timings[split] = {
            "rows_per_second": len(rows) / seconds if seconds > 0 else 0.0,
            "mean_batch_seconds": seconds / batches,
        }
    return probabilities, timings


def evaluate_model(
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
    if meta.get("labels") is not None and meta["labels"] != labels:
        raise FtloopError(
            f"{formatted_dir / 'labels.json'} lists {labels} but the model in {model_dir} was trained on {meta['labels']}"
        )
    splits = {split: read_split(formatted_dir, split, labels) for split in SPLITS}
    model, tokenizer = load_for_inference(model_dir, _base_override(config, meta), merged=config.eval.use_merged)

    with cpu_threads_for(model):
        if config.eval.mode == "generate":
            return _evaluate_by_generation(config, model, tokenizer, splits, labels, output_dir, progress)
        probabilities, timings = timed_scoring(model, tokenizer, splits, labels, config.eval.batch_size)
    return write_predictions(splits, probabilities, labels, output_dir, progress, timings)


def _evaluate_by_generation(config, model, tokenizer, splits, labels, output_dir, progress) -> dict[str, Any]:
    """Parity mode: batched greedy generation + strict parsing; scores are one-hot on the parsed label."""
    from ftloop.components.generate_mode import generate_predictions

    generated, probabilities, timings = {}, {}, {}
    for split, rows in splits.items():
        start = time.perf_counter()
        generated[split] = generate_predictions(
            model, tokenizer, [r["prompt"] for r in rows], labels, config.eval.batch_size, config.eval.max_new_tokens
        )
        seconds = time.perf_counter() - start
        probabilities[split] = [{l: float(l == g["prediction"]) for l in labels} for g in generated[split]]
        batches = max(1, math.ceil(len(rows) / config.eval.batch_size))
        timings[split] = {"rows_per_second": len(rows) / seconds if seconds > 0 else 0.0, "mean_batch_seconds": seconds / batches}
    return write_predictions(splits, probabilities, labels, output_dir, progress, timings, generated)


def evaluate_zero_shot(config: RunConfig, formatted_dir: str | Path, output_dir: str | Path, progress: Progress = print) -> dict[str, Any]:
    """The 'just prompt it' baseline: the base model, no adapter, same prompts and label scoring."""
    from ftloop.components.finetune import load_tokenizer

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
        probabilities, timings = timed_scoring(model, tokenizer, splits, labels, config.eval.batch_size)
    return write_predictions(splits, probabilities, labels, output_dir, progress, timings)
