import pytest

from ftloop.components.config import FiltersConfig
from ftloop.components.generators.filters import (
    REASONS,
    NearDuplicateIndex,
    dedup_key,
    filter_rows,
    jaccard,
    normalize_text,
    quality_problem,
    shingles,
    summarize_counts,
)
from ftloop.components.records import Example

LABELS = ["returns", "shipping"]
CFG = FiltersConfig()


def row(i, text, label="returns"):
    return Example(f"n{i}", text, label, f"g{i}", "rephrased", parent_id="p")


def test_normalisation_strips_list_markers_quotes_and_spacing():
    assert normalize_text('  2.  "Where is   my parcel?"  ') == "Where is my parcel?"
    assert normalize_text("- can I return it?") == "can I return it?"
    assert normalize_text("\uff37here is my parcel") == "Where is my parcel"  # NFKC folds full-width letters
    assert dedup_key(" Where  is my PARCEL?! ") == "where is my parcel"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("?!?", "empty"),
        ("refund", "too_short"),
        ("x" * 301, "too_long"),
        ("12345 6789 ###", "garbage"),
        ("refund?????????", "garbage"),  # one word
        ("refund refund refund refund please", "garbage"),
        ("Here are 3 rephrasings of the question", "prompt_echo"),
        ('{"text": "where is my refund"}', "prompt_echo"),
        ("Question 1: where is my refund?", "prompt_echo"),
        ("intent: returns, where is my refund", "label_leak"),
        ("where is my refund [returns]", "label_leak"),
        ("shipping: when does my parcel come", "label_leak"),
        ("how do returns work for shoes?", None),  # a label word used naturally is fine
    ],
)
def test_quality_reasons(text, reason):
    assert quality_problem(normalize_text(text), LABELS, CFG) == reason


def test_near_duplicates_use_character_shingle_jaccard():
    a, b = shingles("where is my parcel right now?"), shingles("where is my parcel right now??")
    assert jaccard(a, b) == 1.0  # punctuation is ignored
    index = NearDuplicateIndex(0.8)
    index.add("where is my parcel right now", "of_test")
    assert index.match("hey, where is my parcel right now") == "of_test"
    assert index.match("how do I send these shoes back") is None


def test_filter_rows_drops_duplicates_of_every_split_and_counts_each_reason():
    existing = {
        "train": [Example("t1", "How do refunds work for sale items?", "returns", "a", "generated")],
        "dev": [],
        "test": [Example("x1", "When will my refund reach my card?", "returns", "b", "generated")],
    }
    new = [
        row(1, "1. when will my refund reach my card"),  # exact duplicate of a test question
        row(2, "hey, when will my refund reach my card?"),  # near-duplicate of a test question
        row(3, "how do refunds work for sale items"),  # exact duplicate of train
        row(4, "Can I send back shoes that do not fit?"),
        row(5, "can i send back shoes that do not fit"),  # duplicate within the new rows
        row(6, "Can I send back the shoes that do not fit?"),  # near-duplicate within the new rows
        row(7, "Here are some rephrasings: what is the refund policy"),
        row(8, "???"),
        row(9, '"Is there a fee for returning an opened box?"'),
    ]
    kept, counts = filter_rows(new, existing, LABELS, FiltersConfig(near_duplicate_threshold=0.75))
    assert [r.id for r in kept] == ["n4", "n9"]
    assert kept[1].text == "Is there a fee for returning an opened box?"  # kept rows carry the normalised text
    assert {k: v for k, v in counts.items() if v} == {
        "duplicate_of_test": 1,
        "near_duplicate_of_test": 1,
        "duplicate_of_train": 1,
        "duplicate_within_new": 1,
        "near_duplicate_within_new": 1,
        "prompt_echo": 1,
        "empty": 1,
    }
    assert set(counts) == set(REASONS)
    flat = summarize_counts(counts)
    assert flat["filtered_total"] == 7 and flat["filtered_near_duplicate_of_test"] == 1


def test_threshold_is_configurable():
    existing = {"test": [Example("x1", "where is my parcel right now", "shipping", "b", "generated")]}
    candidate = [row(1, "hi, where is my parcel right now please", "shipping")]
    assert filter_rows(candidate, existing, LABELS, FiltersConfig(near_duplicate_threshold=0.6))[0] == []
    assert len(filter_rows(candidate, existing, LABELS, FiltersConfig(near_duplicate_threshold=0.95))[0]) == 1


def test_bad_filter_config_is_rejected():
    with pytest.raises(ValueError, match="min_chars must be <= max_chars"):
        FiltersConfig(min_chars=50, max_chars=10)


def test_imported_questions_are_deduplicated_by_the_same_rules_as_generated_ones():
    """prepare_examples reuses dedup_key and NearDuplicateIndex: both paths call the same rows duplicates."""
    from ftloop.components.stages.prepare_examples import dedupe_questions

    rows = [
        row(1, "Can I send back shoes that do not fit?"),
        row(2, "can i send back shoes that do not fit"),  # exact, by the filters' key
        row(3, "Can I send back the shoes that do not fit?"),  # near at 0.75
        row(4, "Is there a fee for returning an opened box?"),
        row(5, "is there a fee for returning an opened box ??"),
    ]
    cfg = FiltersConfig(near_duplicate_threshold=0.75)
    kept, counts = filter_rows(rows, {}, LABELS, cfg)
    imported, dropped = dedupe_questions(rows, "q.jsonl", cfg.near_duplicate_threshold)
    assert [r.id for r in imported] == [r.id for r in kept] == ["n1", "n4"]
    assert (
        (dropped["dropped_duplicate_text"], dropped["dropped_near_duplicate_text"])
        == (counts["duplicate_within_new"], counts["near_duplicate_within_new"])
        == (2, 1)
    )
