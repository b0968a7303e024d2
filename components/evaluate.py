"""Evaluate a fine-tuned adapter by scoring every label, not by generating text.

Scoring the label tokens in one batched forward pass is exact, needs no output
parsing, never yields an invalid label, and gives a probability per label that
the error analysis and augmentation steps use. It is also orders of magnitude
faster than generate() (notes/finetune.md §4a).
"""

from __future__ import annotations

import copy
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
    check_adapter_dir,
    cpu_threads_for,
    load_base_model,
    peft_deprecation_silenced,
    quiet_progress_bars,
    read_labels,
    read_split,
)
from ftloop.components.metrics import write_predictions
from ftloop.components.prefix_cache import (
    MIN_SHARED_PREFIX,
    cache_argument,
    common_prefix_length,
    forward_params,
    shared_prefix_cache,
    supports_prefix_cache,
)
from ftloop.components.prompt_tokens import encode_prompts
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


def load_for_inference(
    model_dir: str | Path, base_model: str | None = None, merged: bool = False, merge_adapter: bool = True
):
    """The trained model in eval mode: the base (loaded by the same rules as for training) plus the adapter,
    or, with ``merged``, the merged export written by ``train.export_merged``.

    ``base_model`` overrides the recorded base path, for when the base was built
    or mounted at a different path than during training (e.g. another KFP step).
    ``merge_adapter`` folds the adapter into the base weights in memory (W + BA once)
    so every forward pass runs one matmul per layer instead of three; an NF4 base
    cannot take the merge exactly and keeps the adapter applied.
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
            check_adapter_dir(model_dir)  # before loading: PEFT would fall back to a pickled adapter_model.bin
            model = load_base_model(
                base_model or base["name_or_path"], base.get("revision"), base.get("dtype", "auto"),
                base.get("quantization", "none"),
            )
            model = PeftModel.from_pretrained(model, str(model_dir), is_trainable=False)
            if merge_adapter and base.get("quantization", "none") == "none":
                model = model.merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    model.eval()
    if torch.cuda.is_available() and (merged or base.get("quantization", "none") == "none"):
        model.to("cuda")  # a 4-bit base is placed on the GPU while loading
    return model, tokenizer


# ------------------------------------------------------------------- scoring

def _encode_prompt(tokenizer, prompt: list[Message]) -> list[int]:
    return chat_token_ids(tokenizer, prompt, add_generation_prompt=True)


def _encode_prompts(tokenizer, prompts: list[list[Message]]) -> list[list[int]]:
    """Token ids of many prompts, identical to ``chat_token_ids`` (what TRL tokenizes training rows with).

    Prompts that differ only in the question are spliced around one tokenization of the
    shared parts (components/prompt_tokens.py, ~3x faster); others take one batched
    ``apply_chat_template`` call.
    """
    return encode_prompts(tokenizer, prompts)


def label_token_ids(tokenizer, prompt: list[Message], labels: Sequence[str]) -> list[list[int]]:
    """Each label's content tokens exactly as the chat template renders them after this prompt.

    The completion tail is what follows the generation prompt; the template's
    own closing tokens (found by rendering an empty answer) are cut off.
    """
    prompt_ids = _encode_prompt(tokenizer, prompt)
    # One batched call for the empty answer and every label (the same call per conversation as chat_token_ids).
    answered = tokenizer.apply_chat_template(
        [[*prompt, {"role": "assistant", "content": answer}] for answer in ["", *labels]],
        tokenize=True, return_dict=True,
    )["input_ids"]
    closing = list(answered[0])
    if closing[: len(prompt_ids)] != prompt_ids:
        raise FtloopError("chat template renders the prompt differently with and without an answer; cannot score labels")
    closing = closing[len(prompt_ids):]
    out = []
    for label, full in zip(labels, answered[1:]):
        full = list(full)
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
    rows, masks = [], []
    for seq in seqs:  # plain lists, one tensor per batch: a tensor per row cost ~10 us each
        pad = width - len(seq)
        if padding_side == "left":
            rows.append([pad_id] * pad + list(seq))
            masks.append([0] * pad + [1] * len(seq))
        else:
            rows.append(list(seq) + [pad_id] * pad)
            masks.append([1] * len(seq) + [0] * pad)
    ids = torch.tensor(rows, dtype=torch.long)
    mask = torch.tensor(masks, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def _shared_prefix_length(model, seqs: list[list[int]], spans: list[tuple[int, int]]) -> int:
    """Leading tokens that can be run once and reused from a KV cache (``prefix_cache``); 0 means the plain path.

    The shared part ends before the first position whose logits are needed, since
    cached positions produce no logits.
    """
    if len(seqs) < 2 or not supports_prefix_cache(model, max(len(s) for s in seqs)):
        return 0
    shared = min(common_prefix_length(seqs), min(a for a, _ in spans))
    return shared if shared >= MIN_SHARED_PREFIX else 0


def _batch_cache(prefix_cache, batch: int):
    """A private copy of the one-row prefix cache, repeated to ``batch`` rows (the forward appends to it)."""
    cache = copy.deepcopy(prefix_cache)
    cache.batch_repeat_interleave(batch)
    return cache


@torch.no_grad()
def _span_logprobs(
    model,
    pad_id: int,
    seqs: list[list[int]],
    spans: list[tuple[int, int]],
    wanted: torch.Tensor,
    batch_size: int,
    padding_side: str,
    prefix_cache: bool = True,
) -> torch.Tensor:
    """Log-probs of chosen next tokens after every position in each sequence's span [a, b).

    ``wanted`` is [sum of span lengths, k]: row r holds the k token ids whose log-probs
    are wanted after the r-th span position, sequences in input order. Returns the
    [sum of span lengths, k] log-probs (float32, CPU) in the same order.

    Sequences are batched shortest-first (less padding). Three savings, all exact up to
    float rounding: with ``prefix_cache`` the tokens all sequences share are run once
    (``_shared_prefix_length``) and only each row's remainder is batched; the LM head
    runs only on the trailing positions that hold a requested span (``logits_to_keep``);
    and the span positions of a whole batch go through one gather and one log_softmax,
    not one per row (per-row slicing was ~10% of scoring on the tiny model).
    """
    device = next(model.parameters()).device
    params = forward_params(model)
    cache_arg = cache_argument(model)
    can_trim = "logits_to_keep" in params
    shared = _shared_prefix_length(model, seqs, spans) if prefix_cache else 0
    prefix = None
    if shared:
        prefix = shared_prefix_cache(model, torch.tensor([seqs[0][:shared]], device=device), batch=1)

    first_out_row = [0]
    for a, b in spans:
        first_out_row.append(first_out_row[-1] + b - a)
    if wanted.shape[0] != first_out_row[-1]:
        raise ValueError(f"wanted has {wanted.shape[0]} rows for {first_out_row[-1]} span positions")
    out = torch.empty(wanted.shape, dtype=torch.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for lo in range(0, len(order), batch_size):
        idx = order[lo: lo + batch_size]
        tails = [seqs[i][shared:] for i in idx]
        batch = _pad_batch(tails, pad_id, padding_side, device)
        width = batch["input_ids"].shape[1]
        offsets = [width - len(t) if padding_side == "left" else 0 for t in tails]
        # Column of each row's first requested position; logits are kept from the earliest on.
        starts = [off + spans[i][0] - shared for off, i in zip(offsets, idx)]
        first = min(starts) if can_trim else 0
        kwargs: dict[str, Any] = {"logits_to_keep": width - first} if can_trim else {}
        if prefix is not None:
            ones = torch.ones((len(idx), shared), dtype=batch["attention_mask"].dtype, device=device)
            batch["attention_mask"] = torch.cat([ones, batch["attention_mask"]], dim=1)
            batch["position_ids"] = batch["position_ids"] + shared
            kwargs[cache_arg] = _batch_cache(prefix, len(idx))
            kwargs["use_cache"] = True
        else:
            kwargs["use_cache"] = False
        logits = model(**batch, **kwargs).logits  # [rows, width - first, vocab]
        rows, cols, out_rows = [], [], []
        for row, (i, start) in enumerate(zip(idx, starts)):
            a, b = spans[i]
            rows += [row] * (b - a)
            cols += range(start - first, start - first + b - a)
            out_rows += range(first_out_row[i], first_out_row[i + 1])
        out_rows_t = torch.tensor(out_rows)
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # [positions, vocab]
        logprobs = torch.log_softmax(picked.float(), dim=-1)
        out[out_rows_t] = logprobs.gather(1, wanted[out_rows_t].to(device)).cpu()
    return out


def score_labels(
    model,
    tokenizer,
    prompts: list[list[Message]],
    labels: list[str],
    batch_size: int,
    padding_side: str = "right",
    prefix_cache: bool = True,
) -> list[dict[str, float]]:
    """P(label | prompt) for every prompt: label log-likelihoods, softmaxed over the labels.

    When every label starts with a distinct token, the first token decides and
    one forward pass per prompt suffices; otherwise each (prompt, label) pair is
    scored by the summed log-probs of all the label's tokens. ``prefix_cache=False``
    forces the plain path (every token of every row through the model), which the
    tests compare the default, shared-prefix path against.
    """
    if not prompts:
        return []
    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    label_ids = label_token_ids(tokenizer, prompts[0], labels)
    prompt_ids = _encode_prompts(tokenizer, prompts)
    firsts = [ids[0] for ids in label_ids]

    if len(set(firsts)) == len(firsts):
        spans = [(len(p) - 1, len(p)) for p in prompt_ids]
        wanted = torch.tensor(firsts).expand(len(prompt_ids), -1)
        scores = _span_logprobs(model, pad_id, prompt_ids, spans, wanted, batch_size, padding_side, prefix_cache)
    else:
        seqs, spans, targets, owner = [], [], [], []
        for p in prompt_ids:
            for ids in label_ids:
                owner += [len(seqs)] * len(ids)
                seqs.append(p + ids)
                spans.append((len(p) - 1, len(p) + len(ids) - 1))
                targets += ids
        wanted = torch.tensor(targets).unsqueeze(1)
        token_logprobs = _span_logprobs(model, pad_id, seqs, spans, wanted, batch_size, padding_side, prefix_cache)
        summed = torch.zeros(len(seqs)).index_add_(0, torch.tensor(owner), token_logprobs[:, 0])
        scores = summed.view(len(prompts), len(labels))
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
    model, tokenizer = load_for_inference(
        model_dir, _base_override(config, meta), merged=config.eval.use_merged, merge_adapter=config.eval.merge_adapter
    )

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
    """The 'just prompt it' baseline: the base model, no adapter, same prompts and the same ``eval.mode``
    as the fine-tuned models (label scoring, or generate-and-parse), so the comparison is like for like."""
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
        if config.eval.mode == "generate":
            return _evaluate_by_generation(config, model, tokenizer, splits, labels, output_dir, progress)
        probabilities, timings = timed_scoring(model, tokenizer, splits, labels, config.eval.batch_size)
    return write_predictions(splits, probabilities, labels, output_dir, progress, timings)
