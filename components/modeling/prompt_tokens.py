"""Token ids of many chat prompts that differ only in the user's question, without re-tokenizing the rest.

Scoring a split renders and tokenizes every prompt in full, although all of them share
the system turn and the chat tags and only the question differs: on the tiny CPU model
that was about a third of label scoring's time. A fast (Rust) tokenizer splits its input
at added tokens (Phi-3's ``<|user|>`` and ``<|end|>``, ChatML's ``<|im_start|>`` and
``<|im_end|>``, ...) before normalizing and pre-tokenizing each piece on its own, so the
ids of a rendered prompt are the ids of the text up to the
last added token before the question, the ids of the window from that token to the first
added token after it, and the ids of the rest, with the two boundary tokens counted
once. The parts without the question are tokenized once per call and each question's
window in one batched call.

Whether a template and tokenizer keep that promise is checked, not assumed: the template
must render a probe question verbatim (no trimming or escaping, whitespace kept), and
the spliced ids of two probe questions must equal their full tokenization; otherwise,
and for prompts that differ elsewhere than in the last message, every prompt takes the
full ``apply_chat_template`` path.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]

# Probe questions: surrounding whitespace and a newline expose templates that trim or reformat content.
PROBES = ("  \n probe one: <x> &amp; 'q' \t ", "Probe-2 ends without whitespace")
# Below this many prompts the probe costs about what splicing saves.
MIN_PROMPTS = 8


def encode_prompts(tokenizer, prompts: list[list[Message]]) -> list[list[int]]:
    """Ids of each prompt with the generation prompt, identical to ``apply_chat_template(..., tokenize=True)``."""
    if not prompts:
        return []
    spliced = _spliced(tokenizer, prompts)
    if spliced is not None:
        return spliced
    encoded = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [list(ids) for ids in encoded["input_ids"]]


def _render(tokenizer, prompt: list[Message]) -> str:
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _only_last_content_differs(prompts: list[list[Message]]) -> bool:
    first = prompts[0]
    if not first or set(first[-1]) != {"role", "content"}:
        return False
    return all(
        len(p) == len(first)
        and p[:-1] == first[:-1]
        and set(p[-1]) == {"role", "content"}
        and p[-1]["role"] == first[-1]["role"]
        and isinstance(p[-1]["content"], str)
        for p in prompts
    )


def _boundary_tokens(tokenizer, head: str, tail: str) -> tuple[int, int, int, int] | None:
    """(start, end) of the last added token in ``head`` and of the first one in ``tail``, as character offsets."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if t.content]
    in_head = [(head.rfind(t), len(t)) for t in added if t in head]
    in_tail = [(tail.find(t), -len(t)) for t in added if t in tail]
    if not in_head or not in_tail:
        return None
    left, left_len = max(in_head)  # the last one; of two starting there, the longer
    right, minus_right_len = min(in_tail)  # the first one; of two starting there, the longer
    return left, left + left_len, right, right - minus_right_len


def _splice_plan(tokenizer, context: list[Message], role: str) -> dict[str, Any] | None:
    """The question-independent parts of the rendered prompt, or None when splicing would not be exact."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    rendered = [_render(tokenizer, [*context, {"role": role, "content": probe}]) for probe in PROBES]
    start = rendered[0].find(PROBES[0])
    if start < 0 or rendered[0].count(PROBES[0]) != 1:
        return None
    head, tail = rendered[0][:start], rendered[0][start + len(PROBES[0]) :]
    if rendered[1] != head + PROBES[1] + tail:
        return None  # the template does not insert the content verbatim
    bounds = _boundary_tokens(tokenizer, head, tail)
    if bounds is None:
        return None
    left_start, left_end, right_start, right_end = bounds
    head_ids, tail_ids = _ids(tokenizer, [head[:left_end], tail[right_start:]])
    plan = {"window_head": head[left_start:], "window_tail": tail[:right_end], "head_ids": head_ids, "tail_ids": tail_ids}
    for probe, full in zip(PROBES, rendered):
        if _join(plan, _window_ids(tokenizer, plan, [probe])[0]) != _ids(tokenizer, [full])[0]:
            return None
    return plan


def _window_ids(tokenizer, plan: dict[str, Any], questions: list[str]) -> list[list[int]]:
    texts = [plan["window_head"] + q + plan["window_tail"] for q in questions]
    encode_fast = getattr(getattr(tokenizer, "backend_tokenizer", None), "encode_batch_fast", None)
    if encode_fast is None:
        return _ids(tokenizer, texts)
    # The Rust tokenizer directly, without character offsets: ~30% of the windows' cost. The
    # plan's own ``tokenizer(...)`` calls have already switched off any backend truncation or
    # padding, and its probes compare this path against the full one.
    return [encoding.ids for encoding in encode_fast(texts, add_special_tokens=False)]


def _join(plan: dict[str, Any], window: list[int] | None) -> list[int] | None:
    """Head ids + the window without its two boundary tokens + tail ids; None if a boundary moved."""
    head, tail = plan["head_ids"], plan["tail_ids"]
    if window is None or len(window) < 2 or window[0] != head[-1] or window[-1] != tail[0]:
        return None
    return head + window[1:-1] + tail


def _spliced(tokenizer, prompts: list[list[Message]]) -> list[list[int]] | None:
    if len(prompts) < MIN_PROMPTS or not _only_last_content_differs(prompts):
        return None
    plan = _splice_plan(tokenizer, prompts[0][:-1], prompts[0][-1]["role"])
    if plan is None:
        return None
    windows = _window_ids(tokenizer, plan, [p[-1]["content"] for p in prompts])
    joined = [_join(plan, w) for w in windows]
    if any(ids is None for ids in joined):
        return None
    return joined  # type: ignore[return-value]
