"""bench/hf_generator.py's accounting: every row asked for is either accepted or counted once, under the step that removed it.

A fake prompted generator with canned replies drives the bench's generation and rephrasing runs
(the real ``PromptedGenerator`` parsing, re-asking and checkpoint, the real filters, label filter
and class cap), so a break in the per-filter counts fails here. One smoke run of ``main`` on the
offline tiny model (random init: it writes no list) checks the whole path to the JSON report.
The benchmark itself, on SmolLM2, is run by hand (bench/README.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import hf_generator  # noqa: E402

from ftloop.components.config import FiltersConfig
from ftloop.components.generators.base import PromptedGenerator
from ftloop.components.generators.filters import REASONS, filter_rows
from ftloop.components.records import Article, Example

LABELS = ["returns", "shipping"]
ARTICLES = [
    Article("a1", "Refunds reach your card within five days after the parcel arrives back.", "returns", "Refunds"),
    Article("a2", "Express delivery arrives the next day; tracking numbers come by email.", "shipping", "Delivery"),
    Article("a3", "Returns are free within thirty days of delivery.", "returns", "Returning"),
]


class Canned(PromptedGenerator):
    """Replies chosen by a marker in the request; a marker absent from ``replies`` gets an unparseable reply."""

    name = "canned"

    def __init__(self, replies: dict[str, str], max_attempts: int = 2):
        super().__init__("canned-model", seed=0, max_attempts=max_attempts)
        self.replies = replies
        self.calls = 0

    def complete(self, requests, attempt):
        self.calls += 1
        out = []
        for messages in requests:
            text = messages[-1]["content"]
            out.append(next((reply for marker, reply in self.replies.items() if marker in text), "I am not sure what you mean."))
        return out


def steps(result: dict) -> dict[str, int]:
    return {s["step"]: s["removed"] for s in result["funnel"] if s["removed"]}


def check_conserved(result: dict) -> None:
    funnel = result["funnel"]
    assert funnel[0]["in"] == result["requested_rows"]
    assert all(a["out"] == b["in"] for a, b in zip(funnel, funnel[1:]))
    assert funnel[-1]["out"] == result["accepted"] == result["requested_rows"] - sum(s["removed"] for s in funnel)


def test_generation_counts_each_lost_row_once_in_pipeline_order():
    gen = Canned(
        {
            "five days": "1. how long until my refund arrives?\n2. How long until my refund arrives??\n"
            "3. can you rephrase this for me\n4. ok",
            "thirty days": '["are returns free of charge?", "how many days do I have to send it back?"]',
            # "Express delivery" (a2) never parses: its request fails after max_attempts
        }
    )
    result = hf_generator.run_generation(gen, ARTICLES, 4, LABELS, FiltersConfig(), None, 0.1, seed=0)
    assert result["requests_failed"] == 1 and result["requested_rows"] == 12 and result["produced_rows"] == 6
    # parse: a2's 4 rows and the 2 missing from a3's short list; then quality in REASONS order, then duplicates
    assert steps(result) == {"parse": 6, "too_short": 1, "prompt_echo": 1, "duplicate_within_new": 1}
    assert [s["step"] for s in result["funnel"]] == ["parse", *REASONS]
    assert result["accepted"] == 3
    check_conserved(result)
    # the failed request was asked max_attempts times, the completed ones were not asked again
    assert gen.calls == 2 and result["generator_stats"] == {"reused_from_checkpoint": 0, "malformed_replies": 2}
    rejected = {r["reason"]: r["text"] for r in result["examples"]["rejected"]}
    assert rejected == {
        "too_short": "ok",
        "prompt_echo": "can you rephrase this for me",
        "duplicate_within_new": "How long until my refund arrives??",
    }
    assert {r["text"] for r in result["examples"]["accepted"]} == {
        "how long until my refund arrives?",
        "are returns free of charge?",
        "how many days do I have to send it back?",
    }


def test_generation_reports_the_label_judge_beside_the_funnel_not_in_it():
    gen = Canned({"five days": "1. where is my refund money?\n2. where is the courier with my box?"})

    def judge(texts):
        return [{"returns": 0.9, "shipping": 0.1} if "refund" in t else {"returns": 0.2, "shipping": 0.8} for t in texts]

    result = hf_generator.run_generation(gen, ARTICLES[:1], 2, LABELS, FiltersConfig(), judge, 0.1, seed=0)
    assert result["accepted"] == 2 and not steps(result)
    assert result["label_judge_agrees"]["kept"] == 1 and result["label_judge_agrees"]["of"] == 2


def parent(i: str, text: str, label: str) -> Example:
    return Example(i, text, label, f"g-{i}", "generated")


def test_rephrasing_counts_split_duplicates_label_filter_and_class_cap():
    splits = {
        "train": [parent("t1", "when does my parcel arrive?", "shipping")],
        "dev": [],
        "test": [parent("x1", "Is the return label free?", "returns")],
    }
    parents = [parent("e1", "how do I send a jumper back?", "returns"), parent("e2", "tracking number please", "shipping")]
    gen = Canned(
        {
            "jumper": "1. is the return label free\n2. how do i return a jumper?\n3. can I send back my jumper for money?\n"
            "4. my jumper is wrong, where does it go",
            "tracking": "1. When does my parcel arrive\n2. where can I see my tracking number?\n3. intent: shipping",
        }
    )

    def judge(texts):  # jumper rows are returns, unless they sound wrong; the rest are shipping
        return [
            {"returns": 0.9, "shipping": 0.1} if "jumper" in t and "wrong" not in t else {"returns": 0.3, "shipping": 0.7} for t in texts
        ]

    hint = {"e1": "shipping", "e2": "returns"}
    result = hf_generator.run_rephrasing(gen, parents, hint, 4, splits, LABELS, FiltersConfig(), judge, 0.1, max_per_class=1, seed=0)
    assert result["requested_rows"] == 8 and result["produced_rows"] == 7
    assert steps(result) == {
        "parse": 1,  # e2's list was one short
        "label_leak": 1,
        "duplicate_of_train": 1,
        "duplicate_of_test": 1,
        "label_inconsistent": 1,
        "class_cap": 1,  # returns kept two, the cap is one
    }
    assert [s["step"] for s in result["funnel"]] == ["parse", *REASONS, "label_inconsistent", "class_cap"]
    assert result["accepted"] == 2
    check_conserved(result)
    rejected = {r["text"]: r["reason"] for r in result["examples"]["rejected"]}
    assert rejected == {
        "intent: shipping": "label_leak",
        "When does my parcel arrive": "duplicate_of_train",
        "is the return label free": "duplicate_of_test",
        "my jumper is wrong, where does it go": "label_inconsistent",
        "can I send back my jumper for money?": "class_cap",
    }
    assert all(r["confused_with"] == hint[r["id"].split("-")[0]] for r in result["examples"]["accepted"] + result["examples"]["rejected"])


def test_per_row_reasons_agree_with_filter_rows():
    rows = [
        parent(f"r{i}", text, "returns")
        for i, text in enumerate(["where is my refund?", "Where is my refund", "x", "{the json please}", "my refund, where is it?"])
    ]
    kept, counts, reasons = hf_generator.filter_reasons(rows, {}, LABELS, FiltersConfig())
    assert (kept, counts) == filter_rows(rows, {}, LABELS, FiltersConfig())
    assert reasons == [None, "duplicate_within_new", "too_short", "prompt_echo", None]


def test_funnel_refuses_counts_that_do_not_add_up():
    with pytest.raises(ValueError, match="produced"):
        hf_generator.funnel(4, 5, {})
    with pytest.raises(ValueError, match="removed 3 of only 2"):
        hf_generator.funnel(4, 2, {"garbage": 3})
    with pytest.raises(ValueError, match="not in filters.REASONS"):
        hf_generator.funnel(4, 4, {"made_up": 1})


def test_articles_and_errors_are_spread_over_labels_and_seeded():
    articles = [Article(f"{label}-{i}", f"text {i}", label) for label in ("a", "b", "c") for i in range(3)]
    picked = hf_generator.pick_articles(articles, 4, seed=1)
    assert [a.label for a in picked] == ["a", "b", "c", "a"]
    assert picked == hf_generator.pick_articles(list(reversed(articles)), 4, seed=1)
    assert len(hf_generator.pick_articles(articles, 20, seed=1)) == 9

    splits = {"train": [parent(f"t{i}", f"q{i}", LABELS[i % 2]) for i in range(6)], "dev": [], "test": []}

    def judge(texts):  # says shipping to everything: the even rows (returns) are its errors
        return [{"returns": 0.1, "shipping": 0.9} for _ in texts]

    errors, hint = hf_generator.pick_errors(splits, judge, 10, seed=0)
    assert {e.id for e in errors} == {"t0", "t2", "t4"} and all(hint[e.id] == "shipping" for e in errors)


def test_main_runs_end_to_end_on_the_tiny_model(tmp_path):
    from ftloop.components.modeling.tiny import build_tiny_model
    from ftloop.components.records import load_articles

    texts = [a.text for a in load_articles(str(hf_generator.ARTICLES))]
    model = build_tiny_model(tmp_path / "tiny", texts, sorted({a.label for a in load_articles(str(hf_generator.ARTICLES))}), seed=0)
    out = tmp_path / "r.json"
    hf_generator.main(
        [
            "--model",
            str(model),
            "--articles",
            "2",
            "--questions-per-article",
            "2",
            "--errors",
            "2",
            "--max-new-tokens",
            "6",
            "--json",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    for run in ("generation", "rephrasing"):
        assert result[run]["requested_rows"] == (4 if run == "generation" else 2 * 3)
        check_conserved(result[run])
    assert result["settings"]["max_new_tokens"] == 6 and len(result["rephrasing"]["errors"]) == 2


def test_the_hf_backend_asks_with_its_worked_example_and_the_others_keep_theirs():
    from ftloop.components.config import HFGeneratorConfig
    from ftloop.components.generators import base, hf
    from ftloop.components.generators.openai import OpenAIGenerator

    gen = hf.HFGenerator(HFGeneratorConfig(), seed=0)  # nothing loads until the first completion
    article = Article("a9", "Cards are charged at dispatch.", "card_payments", "Charges")
    messages = gen.question_messages(article, 4)
    assert messages == hf.question_messages(article, 4)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert base.parse_list(messages[2]["content"], 3) == list(hf.EXAMPLE_QUESTIONS)  # the example reply is what parse_list reads
    assert messages[-1]["content"] == (
        "Help-center article about card payments:\nTitle: Charges\nCards are charged at dispatch.\n\n"
        "Write 4 different questions a customer could ask about card payments that this article answers. One per line, numbered."
    )
    row = parent("e9", "money taken twice", "card_payments")
    assert gen.rephrase_messages(row, 3, "refund_status")[-1]["content"] == (
        'Customer message about card payments: "money taken twice" It is about card payments, not refund status.\n'
        "Write 3 other ways a customer could ask this. One per line, numbered."
    )
    assert "It is about" not in gen.rephrase_messages(row, 3, None)[-1]["content"]
    # every other prompted backend still asks with the shared prompts
    assert OpenAIGenerator.question_messages is base.PromptedGenerator.question_messages
    assert Canned({}).rephrase_messages(row, 3, "x") == base.rephrase_messages(row, 3, "x")
