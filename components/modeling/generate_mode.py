"""The published evaluation method, generate-then-parse, kept for parity checks.

Common fine-tuning recipes evaluate a classifier by letting the model generate
free text and string-matching it against the labels (the slowest option: a decode
loop per row). ftloop evaluates by label scoring instead (``scoring.score_labels``):
one batched forward pass, no parsing, never an invalid label. This module
reproduces the generate path *correctly* (left padding, greedy, stopping at the chat
template's end of turn, Phi-3's ``<|end|>`` or ChatML's ``<|im_end|>``, as well as eos:
``stop_token_ids``) so the two can be compared on the same model
and rows: ``bench/eval_speed.py`` times both and measures their agreement, and
``eval.mode: generate`` in the run config evaluates the pipeline's models this way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

Message = dict[str, str]

# What ``parse_label`` strips from the end of an answer when the caller names no end tokens: the
# turn ends and eos tokens of the common chat families (Phi-3 <|end|> / <|endoftext|>, ChatML
# <|im_end|>, Llama-3 <|eot_id|> / <|end_of_text|>, Gemma <end_of_turn> / <eos>, Llama-2 and
# Mistral </s>). The generate paths pass the model's own (``end_strings``) instead.
END_TOKENS: tuple[str, ...] = (
    "<|end|>",
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<eos>",
    "</s>",
)
# An assistant message that no template changes (no whitespace to trim, nothing to escape).
_SENTINEL = "ftloopSentinelAnswer7q"


# ------------------------------------------------------------------- parsing


def parse_label(text: str, labels: Sequence[str], end_tokens: Sequence[str] = END_TOKENS) -> str | None:
    """The label ``text`` names, or None when the output is invalid.

    Strict: surrounding whitespace and trailing end tokens are removed, then the
    rest must equal one label exactly (case-sensitive). Anything else (wrong case,
    extra words, a second turn after the end token) is invalid.
    """
    answer = text
    while True:
        stripped = answer.strip()
        for tok in end_tokens:
            if tok and stripped.endswith(tok):
                stripped = stripped[: -len(tok)]
                break
        if stripped == answer:
            break
        answer = stripped
    return answer if answer in set(labels) else None


# ---------------------------------------------------------------- generating


def turn_end_token(tokenizer) -> str | None:
    """The token the chat template writes right after an assistant message, or None.

    A conversation whose assistant message is a sentinel is rendered, and the first token
    after the sentinel (surrounding whitespace skipped) is the turn end: ``<|end|>`` for
    Phi-3, ``<|im_end|>`` for ChatML (SmolLM2, Qwen), ``<|eot_id|>`` for Llama-3. None when
    the tokenizer has no chat template, the template fails on a user/assistant exchange,
    writes nothing after the answer, or writes something that is not one vocabulary entry
    (an added token or, failing that, the piece up to the next whitespace).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return None
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja and template-specific errors (role order, missing system turn)
        return None
    if not isinstance(rendered, str) or rendered.count(_SENTINEL) != 1:
        return None
    after = rendered.split(_SENTINEL, 1)[1].lstrip()
    if not after:
        return None
    vocab = tokenizer.get_vocab()
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.content]
    starts = [t for t in added if after.startswith(t) and t in vocab]
    if starts:
        return max(starts, key=len)  # of two added tokens starting there, the longer
    piece = after.split(maxsplit=1)[0]
    return piece if piece in vocab else None


def _generation_eos_ids(model) -> list[int]:
    """The eos id(s) of ``model``'s generation config (an int or a list in transformers), else []."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        return []
    return [int(i) for i in ([ids] if isinstance(ids, int) else ids)]


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an answer, without duplicates: eos, the chat template's turn end
    (``turn_end_token``) and, given the model, every eos id of its generation config.

    A runtime that stops on eos only runs past the answer whenever the template ends a turn
    with another token (Phi-3's ``<|end|>``, ChatML's ``<|im_end|>`` on a base tokenizer whose
    eos is ``<|endoftext|>``). Without a turn end in the vocabulary, eos (and the generation
    config) alone stop; with none of the three, generation could not stop and this raises.
    """
    ids: list[int] = []

    def add(token_id) -> None:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))

    add(getattr(tokenizer, "eos_token_id", None))
    end = turn_end_token(tokenizer)
    if end is not None:
        add(tokenizer.get_vocab().get(end))
    for token_id in _generation_eos_ids(model):
        add(token_id)
    if not ids:
        raise ValueError(
            "cannot tell when generation should stop: the tokenizer has no eos token, its chat template "
            "ends an assistant turn with no single token, and the model's generation config names no eos token"
        )
    return ids


def end_strings(tokenizer, stop_ids: Sequence[int]) -> tuple[str, ...]:
    """The text of each stop id and of the template's turn end: what ``parse_label`` strips from an answer."""
    out = [tokenizer.decode([token_id], skip_special_tokens=False) for token_id in stop_ids]
    end = turn_end_token(tokenizer)
    if end is not None:
        out.append(end)
    return tuple(dict.fromkeys(t for t in out if t and t.strip()))


@contextlib.contextmanager
def _padding_side(tokenizer, side: str) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _result(tokenizer, new_ids: list[int], stops: list[int], labels: Sequence[str], ends: Sequence[str]) -> dict[str, Any]:
    """Decode the generated ids up to and including the first stop token (the rest is padding)."""
    for k, tok in enumerate(new_ids):
        if tok in stops:
            new_ids = new_ids[: k + 1]
            break
    raw = tokenizer.decode(new_ids, skip_special_tokens=False)
    prediction = parse_label(raw, labels, ends)
    return {"raw": raw, "prediction": prediction, "valid": prediction is not None}


def _generate_kwargs(model, tokenizer, max_new_tokens: int) -> dict[str, Any]:
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "eos_token_id": stop_token_ids(tokenizer, model),
        "pad_token_id": _pad_id(tokenizer),
    }


@torch.no_grad()
def generate_predictions(
    model,
    tokenizer,
    prompts: list[list[Message]],
    labels: list[str],
    batch_size: int,
    max_new_tokens: int = 8,
) -> list[dict[str, Any]]:
    """Greedy batched ``generate`` + strict parse: one {"raw", "prediction", "valid"} per prompt, in order.

    Prompts are left-padded (decoder-only models continue from the last position,
    so right padding would put pad tokens between prompt and answer).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not prompts:
        return []
    from ftloop.components.modeling.scoring import contiguous_lm_head

    device = next(model.parameters()).device
    kwargs = _generate_kwargs(model, tokenizer, max_new_tokens)
    ends = end_strings(tokenizer, kwargs["eos_token_id"])
    out: list[dict[str, Any]] = []
    # generate() keeps only the last position's logits: the same sliced head input as label scoring.
    with _padding_side(tokenizer, "left"), contiguous_lm_head(model):
        for lo in range(0, len(prompts), batch_size):
            # transformers 5: apply_chat_template(return_dict=True) gives input_ids + attention_mask.
            enc = tokenizer.apply_chat_template(
                prompts[lo : lo + batch_size],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                padding=True,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            generated = model.generate(**enc, **kwargs)
            width = enc["input_ids"].shape[1]
            for row in generated[:, width:].tolist():
                out.append(_result(tokenizer, row, kwargs["eos_token_id"], labels, ends))
    return out


@torch.no_grad()
def per_row_generate(
    model,
    tokenizer,
    prompts: list[list[Message]],
    labels: list[str],
    max_new_tokens: int = 8,
) -> list[dict[str, Any]]:
    """The published loop: one prompt at a time, no padding, greedy ``generate``, parse. Bench only."""
    kwargs = _generate_kwargs(model, tokenizer, max_new_tokens)
    ends = end_strings(tokenizer, kwargs["eos_token_id"])
    out = []
    for prompt in prompts:
        enc, generated = _generate_one(model, tokenizer, prompt, kwargs)
        out.append(_result(tokenizer, generated[0, enc["input_ids"].shape[1] :].tolist(), kwargs["eos_token_id"], labels, ends))
    return out


def _generate_one(model, tokenizer, prompt: list[Message], kwargs: dict[str, Any]):
    """One unpadded prompt through ``generate``: (encoded prompt, generated ids incl. the prompt)."""
    device = next(model.parameters()).device
    enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    return enc, model.generate(**enc, **kwargs)


def invalid_rate(results: Sequence[dict[str, Any]]) -> float:
    """Share of outputs that named no label (0.0 for no results)."""
    return sum(not r["valid"] for r in results) / len(results) if results else 0.0


# ------------------------------------------------------- published recipe


PUBLISHED_MAX_NEW_TOKENS = 5


def parse_published(text: str, labels: Sequence[str]) -> str | None:
    """The published notebooks' parser (Part 1's ``FinetunedPhi3Model.invoke``): substring scan, last match wins.

    The labels are checked in list order for a case-sensitive substring match with no
    ``break``, so when the output names several labels the one listed last wins; no
    match was their "Unknown", None here. Loose where ``parse_label`` is strict: extra
    words pass, and a label that only appears inside a longer one (or in trailing
    tokens after the answer) can still be picked.
    """
    found = None
    for label in labels:
        if label in text:
            found = label
    return found


@torch.no_grad()
def published_generate(
    model,
    tokenizer,
    prompts: list[list[Message]],
    labels: list[str],
    max_new_tokens: int = PUBLISHED_MAX_NEW_TOKENS,
) -> list[dict[str, Any]]:
    """The published evaluation loop (``FinetunedPhi3Model.invoke``): per row, greedy ``generate`` of exactly
    ``max_new_tokens`` tokens, decode without special tokens, drop the prompt's characters,
    strip, ``parse_published``. Bench only.

    The published fine-tune set pad = eos, and its collator masked pad ids out of the
    loss, so that model never learned to emit eos and every call ran all 5 tokens.
    Stopping is disabled here (no eos id) to reproduce that cost on a model that did
    learn to stop; the first tokens are unchanged (greedy, no logit processors), only
    what follows the answer is extra. Prompts go through the chat template this project's
    model was trained with (the published plain-text template belongs to their model).
    """
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "num_beams": 1,
        "eos_token_id": None,
        "pad_token_id": _pad_id(tokenizer),
    }
    out = []
    for prompt in prompts:
        enc, generated = _generate_one(model, tokenizer, prompt, kwargs)
        # Theirs: decode the whole output, then cut the prompt off by its character count. The
        # prompt's length is taken from its own decoded text here, since the chat template's
        # special tokens are skipped in the decoded output.
        text = tokenizer.decode(generated[0], skip_special_tokens=True)
        prompt_text = tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True)
        raw = text[len(prompt_text) :].strip()
        prediction = parse_published(raw, labels)
        new_tokens = generated.shape[1] - enc["input_ids"].shape[1]
        out.append({"raw": raw, "prediction": prediction, "valid": prediction is not None, "new_tokens": new_tokens})
    return out
