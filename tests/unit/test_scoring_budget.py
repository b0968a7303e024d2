"""Token-budget batching of label scoring (eval.batch_tokens): same scores as row batches, input order kept."""

from __future__ import annotations

import pytest

from ftloop.components.modeling.loading import load_for_inference
from ftloop.components.modeling.scoring import LENGTH_BUCKET, _batches, _encode_prompts, score_labels
from ftloop.components.prompts import prompt_messages
from tests.fixtures.ml import LABELS

# Mixed lengths, unsorted: the longest is several buckets longer than the shortest.
QUESTIONS = [
    "how do I unsubscribe from the newsletter emails that fill my inbox every single day, I never signed up, thanks",
    "refund?",
    "where is my parcel, it was dispatched by express courier last week and has not arrived yet",
    "points",
    "is the battery certified safe",
    "my credit card was charged twice for one invoice",
    "ok",
    "can I speak to someone at the help desk about a complaint ticket",
]
MULTI_TOKEN_LABELS = ["shipping", "shipping delay", "returns", "return window x"]


@pytest.fixture(scope="module")
def model_and_tokenizer(trained):
    return load_for_inference(trained["dir"])


def _assert_close(got, want, labels, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(labels)
        for label in labels:
            assert g[label] == pytest.approx(w[label], abs=tol)


def test_batches_fill_a_token_budget_shortest_first():
    lengths = [40, 3, 17, 200, 5, 16]
    # rows x (longest, rounded up to 16) <= 64: 3 x 16, then 17 -> 32 and 40 -> 48 each alone; the 200-token row exceeds the budget and goes alone
    assert _batches(lengths, batch_size=2, batch_tokens=64) == [[1, 4, 5], [2], [0], [3]]
    assert _batches(lengths, batch_size=2, batch_tokens=96) == [[1, 4, 5], [2, 0], [3]]  # 2 x 48 fits
    assert _batches(lengths, batch_size=2, batch_tokens=None) == [[1, 4], [5, 2], [0, 3]]
    assert _batches(lengths, batch_size=2, batch_tokens=1) == [[i] for i in [1, 4, 5, 2, 0, 3]]
    assert sorted(i for b in _batches(lengths, 1, 10_000) for i in b) == list(range(len(lengths)))
    assert _batches([], 4, 64) == []


@pytest.mark.parametrize("multi_token", [False, True])
@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_budget_scores_equal_row_batches_in_input_order(model_and_tokenizer, multi_token, prefix_cache, padding_side):
    model, tokenizer = model_and_tokenizer
    labels = MULTI_TOKEN_LABELS if multi_token else LABELS
    prompts = [prompt_messages(q, labels) for q in QUESTIONS]
    lengths = [len(ids) for ids in _encode_prompts(tokenizer, prompts)]
    assert max(lengths) - min(lengths) > 2 * LENGTH_BUCKET  # mixed lengths, several buckets
    want = score_labels(model, tokenizer, prompts, labels, batch_size=3, padding_side=padding_side, prefix_cache=prefix_cache)
    alone = [score_labels(model, tokenizer, [p], labels, batch_size=1)[0] for p in prompts]
    # Budgets: smaller than one long row (the first question alone is over 16 tokens) (each row alone), a few rows per batch, everything in one batch.
    for budget in (LENGTH_BUCKET, 4 * LENGTH_BUCKET, 100_000):
        got = score_labels(
            model, tokenizer, prompts, labels, batch_size=3, padding_side=padding_side, prefix_cache=prefix_cache, batch_tokens=budget
        )
        _assert_close(got, want, labels)
        # Input order: row i's scores are prompt i's, scored on its own (no batching, no sorting).
        _assert_close(got, alone, labels)
    # The rows really differ, so a lost re-ordering would show.
    assert len({tuple(round(v, 4) for v in s.values()) for s in want}) == len(want)


def test_budget_must_be_positive(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="batch_tokens"):
        score_labels(model, tokenizer, [prompt_messages("refund?", LABELS)], LABELS, batch_size=4, batch_tokens=0)


def test_the_evaluate_stage_passes_the_configured_budget_on(monkeypatch):
    from ftloop.components.config import RunConfig
    from ftloop.components.stages import evaluate

    seen: list[int | None] = []

    def fake_score(model, tokenizer, prompts, labels, batch_size, batch_tokens=None):
        seen.append(batch_tokens)
        return [{label: 1.0 / len(labels) for label in labels} for _ in prompts]

    monkeypatch.setattr(evaluate, "score_labels", fake_score)
    monkeypatch.setattr(evaluate, "write_predictions", lambda *args, **kwargs: {})
    config = RunConfig.model_validate({"data": {"questions": "q.jsonl"}, "eval": {"batch_tokens": 4096}})
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}]
    evaluate.predict_splits(config, None, None, {"test": rows}, ["a", "b"], "unused", lambda _: None)
    assert seen == [4096]
