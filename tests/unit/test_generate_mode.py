"""The published generate-and-parse evaluation: strict parsing, correct stopping, parity with label scoring.

The tests on a model run once per architecture (the tiny Phi-3 and the tiny Llama with a ChatML
template, tests/fixtures/ml.py): the turn end comes from the chat template, never from Phi-3's tags.
"""

from __future__ import annotations

import pytest
import torch

from ftloop.components.modeling.generate_mode import (
    end_strings,
    generate_predictions,
    invalid_rate,
    parse_label,
    parse_published,
    per_row_generate,
    published_generate,
    stop_token_ids,
    turn_end_token,
)
from ftloop.components.modeling.loading import load_for_inference
from ftloop.components.modeling.scoring import score_labels
from ftloop.components.prompts import prompt_messages
from tests.fixtures.ml import LABELS, synthetic_examples


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread, as the pipeline runs tiny models (loading.cpu_threads_for): two threads on a
    shared 2-core machine made each decode step many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "text, expected",
    [
        ("returns", "returns"),
        ("returns<|end|>", "returns"),
        ("  returns \n", "returns"),
        ("returns<|end|>\n", "returns"),
        ("returns<|end|>\n<|endoftext|>", "returns"),  # what a runtime stopping on eos only returns
        ("\nshipping <|endoftext|>", "shipping"),
        ("Returns", None),  # case-sensitive
        ("RETURNS<|end|>", None),
        ("returns please", None),  # extra words
        ("the answer is returns", None),
        ("returns.", None),
        ("returns<|end|>\n<|assistant|>\nreturns", None),  # kept generating past the turn
        ("<|end|>returns", None),
        ("", None),
        ("<|end|>", None),
        ("unknown_label", None),
        # the other families' end tokens are known to the default too
        ("returns<|im_end|>\n", "returns"),
        ("returns<|eot_id|>", "returns"),
        ("returns<end_of_turn>\n<eos>", "returns"),
        ("returns</s>", "returns"),
        ("returns<|im_end|>\n<|im_start|>assistant\nreturns", None),
    ],
)
def test_parse_label_is_strict(text, expected):
    assert parse_label(text, LABELS) == expected


def test_parse_label_only_knows_the_given_labels():
    assert parse_label("shipping", ["returns"]) is None
    assert parse_label("shipping delay<|end|>", ["shipping", "shipping delay"]) == "shipping delay"


def test_invalid_rate_counts_invalid_results():
    results = [
        {"raw": "a", "prediction": "a", "valid": True},
        {"raw": "x", "prediction": None, "valid": False},
        {"raw": "b", "prediction": "b", "valid": True},
        {"raw": "", "prediction": None, "valid": False},
    ]
    assert invalid_rate(results) == 0.5
    assert invalid_rate([]) == 0.0


# ------------------------------------------------------------- stopping


class _Tok:
    """A tokenizer with a vocabulary, an eos id and optionally a chat template (rendered by ``render``)."""

    def __init__(self, vocab, eos_token_id, render=None):
        self.vocab, self.eos_token_id, self.render = vocab, eos_token_id, render
        self.chat_template = None if render is None else "{{ rendered }}"
        self.added_tokens_decoder = {}

    def get_vocab(self):
        return self.vocab

    def apply_chat_template(self, messages, tokenize=False):
        return self.render(messages)


class _Model:
    def __init__(self, eos_token_id):
        self.generation_config = type("GenerationConfig", (), {"eos_token_id": eos_token_id})()


TURN_END = {"phi3": "<|end|>", "llama": "<|im_end|>"}


def test_stop_token_ids_include_the_templates_end_of_turn(tiny_arch_dir, architecture):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_arch_dir))
    assert turn_end_token(tok) == TURN_END[architecture]
    ids = stop_token_ids(tok)
    assert ids == [tok.eos_token_id, tok.convert_tokens_to_ids(TURN_END[architecture])]
    assert ids[0] != ids[1]
    assert stop_token_ids(tok, _Model(ids[0])) == ids  # the generation config's eos adds nothing new
    assert stop_token_ids(tok, _Model([ids[1], 5, ids[0]])) == [*ids, 5]


def test_stop_token_ids_without_a_turn_end_fall_back_to_eos():
    chatml = lambda messages: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)  # noqa: E731
    assert stop_token_ids(_Tok({"<|im_end|>": 7}, 5, chatml)) == [5, 7]
    assert stop_token_ids(_Tok({"<|endoftext|>": 5}, 5)) == [5]  # no chat template
    assert stop_token_ids(_Tok({"<|endoftext|>": 5}, 5, chatml)) == [5]  # its turn end is not in the vocabulary
    assert stop_token_ids(_Tok({"<|im_end|>": 5}, 5, chatml)) == [5]  # no duplicates (SmolLM2: eos is <|im_end|>)
    assert stop_token_ids(_Tok({}, 5, lambda m: m[-1]["content"])) == [5]  # nothing after the answer
    assert stop_token_ids(_Tok({"<|im_end|>": 7}, None, chatml)) == [7]  # no eos: the turn end alone
    assert stop_token_ids(_Tok({}, None), _Model(3)) == [3]  # the generation config alone

    def failing(messages):
        raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    assert stop_token_ids(_Tok({}, 5, failing)) == [5]  # a template that refuses the probe: eos only
    with pytest.raises(ValueError, match="cannot tell when generation should stop"):
        stop_token_ids(_Tok({}, None))
    with pytest.raises(ValueError, match="cannot tell when generation should stop"):
        stop_token_ids(_Tok({}, None, failing), _Model(None))


# ------------------------------------------------------ on a trained model


QUESTIONS = [r["text"] for r in synthetic_examples(3, 11, "generate-mode")]  # 24 rows, all 8 labels


@pytest.fixture(scope="module")
def model_and_tokenizer(trained_arch):
    model, tokenizer = load_for_inference(trained_arch["dir"])
    return model.to("cpu"), tokenizer


@pytest.fixture(scope="module")
def turn_end(model_and_tokenizer):
    return turn_end_token(model_and_tokenizer[1])


@pytest.fixture(scope="module")
def prompts():
    return [prompt_messages(q, LABELS) for q in QUESTIONS]


@pytest.fixture(scope="module")
def batched(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    tokenizer.padding_side = "right"
    out = generate_predictions(model, tokenizer, prompts, LABELS, batch_size=7)  # 7: last batch is partial
    assert tokenizer.padding_side == "right"  # restored after left-padded generation
    return out


def test_generate_predictions_one_result_per_prompt(batched, prompts, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    ends = end_strings(tokenizer, stop_token_ids(tokenizer))
    assert len(batched) == len(prompts)
    for r in batched:
        assert set(r) == {"raw", "prediction", "valid"}
        assert isinstance(r["raw"], str)
        assert r["valid"] == (r["prediction"] is not None)
        assert r["prediction"] is None or r["prediction"] in LABELS
        assert r["prediction"] == parse_label(r["raw"], LABELS, ends)


def test_generation_stops_at_end_of_turn(batched, model_and_tokenizer, turn_end):
    # Phi-3 was trained on label<|end|>\n<|endoftext|>, the Llama on label<|im_end|>\n with eos <|endoftext|>:
    # stopping on eos only would run on past the turn end (the Llama's answer never contains its eos).
    _, tokenizer = model_and_tokenizer
    for r in batched:
        assert tokenizer.eos_token not in r["raw"] and tokenizer.pad_token not in r["raw"]
        assert r["raw"].count(turn_end) <= 1
        if turn_end in r["raw"]:
            assert r["raw"].endswith(turn_end)
    assert sum(r["raw"].endswith(turn_end) for r in batched) >= len(batched) // 2
    assert sum(r["valid"] for r in batched) >= len(batched) // 2


def test_generate_agrees_with_label_scoring(model_and_tokenizer, prompts, batched):
    model, tokenizer = model_and_tokenizer
    scores = score_labels(model, tokenizer, prompts, LABELS, batch_size=16)
    scored = [max(LABELS, key=s.get) for s in scores]
    n_invalid = sum(r["prediction"] is None for r in batched)
    assert invalid_rate(batched) == n_invalid / len(batched)
    agree = sum(r["prediction"] == s for r, s in zip(batched, scored))
    # A model that ends after the label: greedy generation picks the top label token, which is
    # what scoring ranks first (up to the mass on non-label tokens). Most rows must agree.
    assert agree >= 0.75 * len(prompts), (agree, n_invalid)


def test_per_row_generate_matches_batched(model_and_tokenizer, prompts, batched):
    model, tokenizer = model_and_tokenizer
    per_row = per_row_generate(model, tokenizer, prompts, LABELS)
    assert len(per_row) == len(prompts)
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(per_row, batched))
    assert same >= 0.9 * len(prompts)  # left padding may flip a near-tie, nothing more


def test_generate_predictions_budget_and_edge_cases(model_and_tokenizer, prompts, turn_end):
    model, tokenizer = model_and_tokenizer
    assert generate_predictions(model, tokenizer, [], LABELS, batch_size=4) == []
    with pytest.raises(ValueError):
        generate_predictions(model, tokenizer, prompts[:2], LABELS, batch_size=0)
    # One new token: the (single-token) label without its turn end, still a valid answer.
    short = generate_predictions(model, tokenizer, prompts[:8], LABELS, batch_size=8, max_new_tokens=1)
    assert all(turn_end not in r["raw"] for r in short)
    assert sum(r["valid"] for r in short) >= 6


def test_untrained_model_outputs_are_counted_invalid(tiny_arch_dir, prompts):
    """A random base model rambles: its outputs must be parsed as invalid, never coerced to a label."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_arch_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_arch_dir))
    results = generate_predictions(model, tokenizer, prompts[:8], LABELS, batch_size=8, max_new_tokens=6)
    n_invalid = sum(not r["valid"] for r in results)
    assert n_invalid >= 1
    assert invalid_rate(results) == n_invalid / 8
    for r in results:
        assert r["valid"] == (parse_label(r["raw"], LABELS, end_strings(tokenizer, stop_token_ids(tokenizer, model))) is not None)


def test_padding_side_restored_when_generate_fails(tiny_model_dir, prompts):
    from transformers import AutoTokenizer

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, **kwargs):
            raise RuntimeError("boom")

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tokenizer.padding_side = "right"
    with pytest.raises(RuntimeError, match="boom"):
        generate_predictions(Broken(), tokenizer, prompts[:2], LABELS, batch_size=2)
    assert tokenizer.padding_side == "right"


# ------------------------------------------------------- published recipe


@pytest.mark.parametrize(
    "text, expected",
    [
        ("shipping", "shipping"),
        ("shipping\n", "shipping"),
        ("the answer is shipping!", "shipping"),  # extra words pass
        ("returns or shipping", "shipping"),  # several labels: the one listed last wins
        ("shipping or returns", "shipping"),  # ... whatever order the text names them in
        ("returnsx", "returns"),  # substring, no word boundary
        ("Returns", None),  # case-sensitive
        ("", None),
    ],
)
def test_parse_published_is_a_last_match_substring_scan(text, expected):
    assert parse_published(text, LABELS) == expected


def test_published_generate_always_runs_the_full_budget(model_and_tokenizer, prompts, turn_end):
    """Like the published model (never learned to stop), every call decodes exactly max_new_tokens tokens."""
    model, tokenizer = model_and_tokenizer
    out = published_generate(model, tokenizer, prompts, LABELS)
    assert len(out) == len(prompts)
    assert all(r["new_tokens"] == 5 for r in out)
    for r in out:
        assert turn_end not in r["raw"] and r["raw"] == r["raw"].strip()  # special tokens skipped, stripped
        assert r["prediction"] == parse_published(r["raw"], LABELS)
        assert r["valid"] == (r["prediction"] is not None)
    # Greedy and unconstrained: the first tokens are the strict loop's answer; only a label
    # word in the tokens decoded past the answer (last match wins) could change a prediction.
    strict = per_row_generate(model, tokenizer, prompts, LABELS)
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(out, strict) if b["valid"])
    assert same >= 0.9 * sum(b["valid"] for b in strict)
    assert len(published_generate(model, tokenizer, prompts[:2], LABELS, max_new_tokens=2)[0]["raw"]) > 0
