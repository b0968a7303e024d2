"""Spliced prompt encoding must give exactly apply_chat_template's ids, or not be used.

Checked for Phi-3's template (``<|user|>`` ... ``<|end|>``) and for ChatML (SmolLM2: the role is text
between ``<|im_start|>`` and a newline, so the question's window starts with the role name).
"""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ftloop.components.modeling import prompt_tokens
from ftloop.components.modeling.prompt_tokens import encode_prompts
from ftloop.components.modeling.tiny import CHATML_CHAT_TEMPLATE, PHI3_CHAT_TEMPLATE
from ftloop.components.prompts import prompt_messages

LABELS = ["returns", "shipping", "payments", "support"]
QUESTIONS = [
    "where is my parcel?",
    " leading space",
    "trailing space ",
    "two\nlines\n",
    "a\ttab",
    "  ",
    "",
    "returns",
    "returns,shipping",
    "ends with <|end|>",
    "<|user|> in front",
    "x<|end|>y<|assistant|>z",
    "ends with <|im_end|>",
    "<|im_start|>user\nin front",
    "user\n",
    "émoji 🎉 and ünïcode",
    "\n",
    "can I pay with a gift card",
]
CORPUS = QUESTIONS * 3 + ["Classify the customer question into exactly one intent. Answer with the intent name only."] * 5
SPECIAL = ["<|endoftext|>", "<unk>", "<pad>"]
CHAT = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Each chat family: its template and the added tokens it tags turns with.
FAMILIES = {"phi3": (PHI3_CHAT_TEMPLATE, CHAT), "chatml": (CHATML_CHAT_TEMPLATE, ["<|im_start|>", "<|im_end|>"])}


def _tokenizer(kind: str, strip: dict[str, bool] | None = None, template: str = PHI3_CHAT_TEMPLATE, chat: list[str] = CHAT):
    """A small trained tokenizer in the style of a real model family."""
    if kind == "byte-level":  # GPT-2 / the tiny demo model
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
    else:  # Llama / Phi-3 SentencePiece style: metaspace, prefix space on the first piece only or always
        backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        backend.normalizer = normalizers.Sequence([normalizers.NFC()])
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=kind.split(":")[1])
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=kind.split(":")[1])
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    strip = strip or {}
    backend.add_special_tokens(
        [AddedToken(t, lstrip=strip.get("lstrip", False), rstrip=strip.get("rstrip", False), normalized=False, special=True) for t in chat]
    )
    backend.add_tokens([AddedToken(label, single_word=True, normalized=False) for label in LABELS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<pad>", additional_special_tokens=chat
    )
    tokenizer.chat_template = template
    return tokenizer


def _reference(tokenizer, prompts):
    encoded = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True)
    return [list(ids) for ids in encoded["input_ids"]]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["byte-level", "metaspace:first", "metaspace:always"])
@pytest.mark.parametrize("strip", [{}, {"rstrip": True}, {"lstrip": True, "rstrip": True}])
def test_spliced_ids_equal_the_full_tokenization(kind, strip, family, monkeypatch):
    template, chat = FAMILIES[family]
    tokenizer = _tokenizer(kind, strip, template, chat)
    prompts = [prompt_messages(q, LABELS) for q in QUESTIONS]
    plans = []
    real_plan = prompt_tokens._splice_plan
    monkeypatch.setattr(prompt_tokens, "_splice_plan", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    assert encode_prompts(tokenizer, prompts) == _reference(tokenizer, prompts)
    assert plans and plans[0] is not None, "the splice was not used"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_template_that_trims_the_question_takes_the_full_path(family, monkeypatch):
    template, chat = FAMILIES[family]
    trimming = template.replace("message['content']", "message['content'] | trim")
    assert trimming != template
    tokenizer = _tokenizer("byte-level", template=trimming, chat=chat)
    prompts = [prompt_messages(q, LABELS) for q in QUESTIONS]
    assert prompt_tokens._splice_plan(tokenizer, prompts[0][:-1], "user") is None
    assert encode_prompts(tokenizer, prompts) == _reference(tokenizer, prompts)


def test_prompts_that_differ_before_the_question_take_the_full_path(monkeypatch):
    tokenizer = _tokenizer("byte-level")
    prompts = [prompt_messages(q, LABELS if i % 2 else LABELS[::-1]) for i, q in enumerate(QUESTIONS)]
    calls = []
    monkeypatch.setattr(prompt_tokens, "_splice_plan", lambda *a: calls.append(a))
    assert encode_prompts(tokenizer, prompts) == _reference(tokenizer, prompts)
    assert calls == []
    assert encode_prompts(tokenizer, []) == []


def test_a_window_whose_boundary_token_moved_falls_back(monkeypatch):
    """If any question's window does not start and end with the boundary tokens, nothing is spliced."""
    tokenizer = _tokenizer("byte-level")
    prompts = [prompt_messages(q, LABELS) for q in QUESTIONS]
    real_windows = prompt_tokens._window_ids
    monkeypatch.setattr(
        prompt_tokens,
        "_window_ids",
        lambda tok, plan, qs: [w[1:] if len(qs) > 1 and i == 3 else w for i, w in enumerate(real_windows(tok, plan, qs))],
    )
    assert encode_prompts(tokenizer, prompts) == _reference(tokenizer, prompts)
