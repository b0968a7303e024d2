"""Label scoring: one batched forward pass gives every label's probability (no generation, no parsing)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ftloop.components.errors import FtloopError
from ftloop.components.modeling.loading import (
    chat_token_ids,
)
from ftloop.components.modeling.prefix_cache import (
    MIN_SHARED_PREFIX,
    cache_argument,
    common_prefix_length,
    forward_params,
    shared_prefix_cache,
    supports_prefix_cache,
)
from ftloop.components.modeling.prompt_tokens import encode_prompts
from ftloop.components.prompts import Message


def _encode_prompt(tokenizer, prompt: list[Message]) -> list[int]:
    return chat_token_ids(tokenizer, prompt, add_generation_prompt=True)


def _encode_prompts(tokenizer, prompts: list[list[Message]]) -> list[list[int]]:
    """Token ids of many prompts, identical to ``chat_token_ids`` (what TRL tokenizes training rows with).

    Prompts that differ only in the question are spliced around one tokenization of the
    shared parts (components/modeling/prompt_tokens.py, ~3x faster); others take one batched
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
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    closing = list(answered[0])
    if closing[: len(prompt_ids)] != prompt_ids:
        raise FtloopError("chat template renders the prompt differently with and without an answer; cannot score labels")
    closing = closing[len(prompt_ids) :]
    out = []
    for label, full in zip(labels, answered[1:]):
        full = list(full)
        if full[: len(prompt_ids)] != prompt_ids:
            raise FtloopError(f"label {label!r} merges with the end of the prompt when tokenized; cannot score it")
        tail = full[len(prompt_ids) :]
        if closing and tail[-len(closing) :] == closing:
            tail = tail[: -len(closing)]
        if not tail:
            raise FtloopError(f"label {label!r} renders to no tokens")
        out.append(tail)
    return out


# Token-budget batches pad each batch's width up to a multiple of this, so a long evaluation
# repeats a few shapes (what CUDA graphs / torch.compile can reuse) instead of one per batch.
LENGTH_BUCKET = 16


def _bucketed(length: int, bucket: int) -> int:
    return -(-length // bucket) * bucket


def _pad_batch(seqs: list[list[int]], pad_id: int, padding_side: str, device, width: int | None = None) -> dict[str, torch.Tensor]:
    """Padded ids + mask + explicit positions, so padding never shifts a real token's position.

    ``width`` (at least the longest row) pads further, to a bucketed length.
    """
    width = max(width or 0, max(len(s) for s in seqs))
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


@contextlib.contextmanager
def contiguous_lm_head(model: nn.Module) -> Iterator[None]:
    """Hand the output head a contiguous input while scoring or generating.

    With ``logits_to_keep`` the model slices the last positions of the hidden states (a
    non-contiguous [rows, k, hidden] view) before the head. torch's matmul folds that into one
    matrix product only when the weight requires grad; for frozen weights (a merged or
    ``is_trainable=False`` adapter, a PEFT base) it falls back to a batched matmul that copies
    the whole head weight once per row: on SmolLM2 (49k x 576 head) label scoring of a fine-tuned
    model ran 12x slower than the same base model. The copy of the sliced input is tiny.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def contiguous_input(_module, args):
        return (args[0].contiguous(), *args[1:]) if args else None

    handle = head.register_forward_pre_hook(contiguous_input)
    try:
        yield
    finally:
        handle.remove()


def _batches(lengths: list[int], batch_size: int, batch_tokens: int | None, bucket: int = LENGTH_BUCKET) -> list[list[int]]:
    """Row indices of each batch, rows sorted shortest-first (less padding).

    Without ``batch_tokens``: ``batch_size`` rows per batch. With it: each batch takes the
    next rows while rows x (longest length rounded up to ``bucket``) stays within the budget,
    so batches of short rows hold more rows and padding per batch stays small; a row longer
    than the budget is a batch alone (``batch_size`` is then not used).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if batch_tokens is None:
        return [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]
    out: list[list[int]] = []
    for i in order:  # ascending lengths: the row being added is the batch's longest
        if out and (len(out[-1]) + 1) * _bucketed(lengths[i], bucket) <= batch_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


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
    batch_tokens: int | None = None,
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

    ``batch_tokens`` batches by a token budget instead of ``batch_size`` rows (``_batches``;
    counted on the tokens each row runs, i.e. after the shared prefix) and pads every batch
    to a multiple of ``LENGTH_BUCKET``; results come back in input order either way.
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
    batches = _batches([len(s) - shared for s in seqs], batch_size, batch_tokens)
    with contiguous_lm_head(model):
        for idx in batches:
            tails = [seqs[i][shared:] for i in idx]
            width = _bucketed(max(len(t) for t in tails), LENGTH_BUCKET) if batch_tokens is not None else None
            batch = _pad_batch(tails, pad_id, padding_side, device, width)
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
    batch_tokens: int | None = None,
) -> list[dict[str, float]]:
    """P(label | prompt) for every prompt: label log-likelihoods, softmaxed over the labels.

    When every label starts with a distinct token, the first token decides and
    one forward pass per prompt suffices; otherwise each (prompt, label) pair is
    scored by the summed log-probs of all the label's tokens. ``prefix_cache=False``
    forces the plain path (every token of every row through the model), which the
    tests compare the default, shared-prefix path against.

    ``batch_tokens`` (``eval.batch_tokens``): fill each forward pass up to this many tokens
    (rows x bucketed padded length) instead of ``batch_size`` rows; None keeps row batches.
    Same scores up to float rounding, in the input order (tests/unit/test_scoring_budget.py).
    """
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError("batch_tokens must be >= 1 or None")
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
        scores = _span_logprobs(model, pad_id, prompt_ids, spans, wanted, batch_size, padding_side, prefix_cache, batch_tokens)
    else:
        seqs, spans, targets, owner = [], [], [], []
        for p in prompt_ids:
            for ids in label_ids:
                owner += [len(seqs)] * len(ids)
                seqs.append(p + ids)
                spans.append((len(p) - 1, len(p) + len(ids) - 1))
                targets += ids
        wanted = torch.tensor(targets).unsqueeze(1)
        token_logprobs = _span_logprobs(model, pad_id, seqs, spans, wanted, batch_size, padding_side, prefix_cache, batch_tokens)
        summed = torch.zeros(len(seqs)).index_add_(0, torch.tensor(owner), token_logprobs[:, 0])
        scores = summed.view(len(prompts), len(labels))
    probs = torch.softmax(scores.double(), dim=-1)
    return [{label: float(p) for label, p in zip(labels, row)} for row in probs.tolist()]
