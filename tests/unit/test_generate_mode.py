"""The published generate-and-parse evaluation: strict parsing, correct stopping, parity with label scoring."""

from __future__ import annotations

import pytest
import torch

from ftloop.components.modeling.generate_mode import (
    generate_predictions,
    invalid_rate,
    parse_label,
    parse_published,
    per_row_generate,
    published_generate,
    stop_token_ids,
)
from ftloop.components.modeling.loading import load_for_inference
from ftloop.components.modeling.scoring import score_labels
from ftloop.components.prompts import prompt_messages
from tests.fixtures.ml import LABELS, synthetic_examples

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
    def __init__(self, vocab, eos_token_id):
        self.vocab, self.eos_token_id = vocab, eos_token_id

    def get_vocab(self):
        return self.vocab


def test_stop_token_ids_include_end_of_turn_when_present(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids = stop_token_ids(tok)
    assert ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")]
    assert ids[0] != ids[1]
    assert stop_token_ids(_Tok({"<|endoftext|>": 5}, 5)) == [5]  # no <|end|> in the vocabulary
    assert stop_token_ids(_Tok({"<|end|>": 5}, 5)) == [5]  # no duplicates
    with pytest.raises(ValueError):
        stop_token_ids(_Tok({}, None))


# ------------------------------------------------------ on a trained model


QUESTIONS = [r["text"] for r in synthetic_examples(3, 11, "generate-mode")]  # 24 rows, all 8 labels


@pytest.fixture(scope="module")
def model_and_tokenizer(trained):
    model, tokenizer = load_for_inference(trained["dir"])
    return model.to("cpu"), tokenizer


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


def test_generate_predictions_one_result_per_prompt(batched, prompts):
    assert len(batched) == len(prompts)
    for r in batched:
        assert set(r) == {"raw", "prediction", "valid"}
        assert isinstance(r["raw"], str)
        assert r["valid"] == (r["prediction"] is not None)
        assert r["prediction"] is None or r["prediction"] in LABELS
        assert r["prediction"] == parse_label(r["raw"], LABELS)


def test_generation_stops_at_end_of_turn(batched):
    # The model was trained on label<|end|>\n<|endoftext|>: stopping on eos only would return all of it.
    for r in batched:
        assert "<|endoftext|>" not in r["raw"] and "<|pad|>" not in r["raw"]
        assert r["raw"].count("<|end|>") <= 1
        if "<|end|>" in r["raw"]:
            assert r["raw"].endswith("<|end|>")
    assert sum(r["raw"].endswith("<|end|>") for r in batched) >= len(batched) // 2


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


def test_generate_predictions_budget_and_edge_cases(model_and_tokenizer, prompts):
    model, tokenizer = model_and_tokenizer
    assert generate_predictions(model, tokenizer, [], LABELS, batch_size=4) == []
    with pytest.raises(ValueError):
        generate_predictions(model, tokenizer, prompts[:2], LABELS, batch_size=0)
    # One new token: the (single-token) label without its <|end|>, still a valid answer.
    short = generate_predictions(model, tokenizer, prompts[:8], LABELS, batch_size=8, max_new_tokens=1)
    assert all("<|end|>" not in r["raw"] for r in short)
    assert sum(r["valid"] for r in short) >= 6


def test_untrained_model_outputs_are_counted_invalid(tiny_model_dir, prompts):
    """A random base model rambles: its outputs must be parsed as invalid, never coerced to a label."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    results = generate_predictions(model, tokenizer, prompts[:8], LABELS, batch_size=8, max_new_tokens=6)
    n_invalid = sum(not r["valid"] for r in results)
    assert n_invalid >= 1
    assert invalid_rate(results) == n_invalid / 8
    for r in results:
        assert r["valid"] == (parse_label(r["raw"], LABELS) is not None)


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


def test_published_generate_always_runs_the_full_budget(model_and_tokenizer, prompts):
    """Like the published model (never learned to stop), every call decodes exactly max_new_tokens tokens."""
    model, tokenizer = model_and_tokenizer
    out = published_generate(model, tokenizer, prompts, LABELS)
    assert len(out) == len(prompts)
    assert all(r["new_tokens"] == 5 for r in out)
    for r in out:
        assert "<|end|>" not in r["raw"] and r["raw"] == r["raw"].strip()  # special tokens skipped, stripped
        assert r["prediction"] == parse_published(r["raw"], LABELS)
        assert r["valid"] == (r["prediction"] is not None)
    # Greedy and unconstrained: the first tokens are the strict loop's answer; only a label
    # word in the tokens decoded past the answer (last match wins) could change a prediction.
    strict = per_row_generate(model, tokenizer, prompts, LABELS)
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(out, strict) if b["valid"])
    assert same >= 0.9 * sum(b["valid"] for b in strict)
    assert len(published_generate(model, tokenizer, prompts[:2], LABELS, max_new_tokens=2)[0]["raw"]) > 0
