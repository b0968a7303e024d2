"""The split's leakage report: groups and question texts shared between splits, counted and named (issues 16, 17)."""

from __future__ import annotations

from ftloop.components.artifacts import read_split_report
from ftloop.components.config import load_config
from ftloop.components.records import Example, load_questions
from ftloop.components.stages.prepare_examples import run as run_prepare
from ftloop.components.stages.split_examples import leakage_report, read_splits, split_examples, write_splits
from ftloop.components.stages.split_examples import run as run_split
from tests.fixtures.data import CORPUS, corpus_subset, write_config, write_lines

PAIRS = ("train-dev", "train-test", "dev-test")


def ex(ident: str, text: str, group: str, label: str = "returns") -> Example:
    return Example(ident, text, label, group, "imported")


def leaky_splits() -> dict[str, list[Example]]:
    """Deliberately leaky: a text in train and test (other groups, other case and punctuation), a group in train and test."""
    return {
        "train": [
            ex("t1", "Where is my refund?", "g-refund"),
            ex("t2", "Can I send shoes back", "g-shoes"),
            ex("t3", "How long does a parcel take", "g-parcel", "shipping"),
        ],
        "dev": [ex("d1", "Do you ship to Norway", "g-norway", "shipping")],
        "test": [
            ex("x1", "  where is my REFUND ", "g-other"),
            ex("x2", "Are boots free to return?", "g-shoes"),
            ex("x3", "Do you ship to norway?!", "g-norway2", "shipping"),
        ],
    }


def test_a_leaky_split_is_flagged_with_the_shared_texts_and_groups():
    report = leakage_report(leaky_splits())
    assert report["group_overlap"] == {"train-dev": 0, "train-test": 1, "dev-test": 0}
    assert report["shared_groups"] == {"train-test": ["g-shoes"]}
    assert report["text_overlap"] == {"train-dev": 0, "train-test": 1, "dev-test": 1}
    assert report["shared_texts"] == {"train-test": ["Where is my refund?"], "dev-test": ["Do you ship to Norway"]}


def test_the_split_stage_writes_the_text_check_to_report_json_and_metadata(tmp_path):
    meta = write_splits(leaky_splits(), ["returns", "shipping"], tmp_path, extra={"seed": 1})
    assert meta["test_group_overlap"] == 1 and meta["test_text_overlap"] == 2
    report = read_split_report(tmp_path)
    assert report.text_overlap == {"train-dev": 0, "train-test": 1, "dev-test": 1}
    assert report.shared_texts == {"train-test": ["Where is my refund?"], "dev-test": ["Do you ship to Norway"]}
    assert report.shared_groups == {"train-test": ["g-shoes"]}


def test_a_clean_split_shares_nothing_and_names_nothing():
    rows = [
        ex(f"{label}{i}", f"question number {i} about {label}", f"{label}-{i}", label)
        for label in ("returns", "shipping")
        for i in range(6)
    ]
    report = leakage_report(split_examples(rows, 0.2, 0.2, seed=1))
    assert report["group_overlap"] == report["text_overlap"] == dict.fromkeys(PAIRS, 0)
    assert report["shared_groups"] == report["shared_texts"] == {}


def test_at_most_twenty_shared_texts_are_named_but_all_are_counted():
    splits = {
        "train": [ex(f"t{i}", f"same question {i:02d}", f"a{i}") for i in range(30)],
        "dev": [],
        "test": [ex(f"x{i}", f"Same question {i:02d}?", f"b{i}") for i in range(30)],
    }
    report = leakage_report(splits)
    assert report["text_overlap"]["train-test"] == 30 and report["group_overlap"]["train-test"] == 0
    assert report["shared_texts"]["train-test"] == [f"same question {i:02d}" for i in range(20)]


def doubled_questions(tmp_path):
    """Issue 16's file: every question twice, under two ids (so two groups)."""
    rows = [
        {"text": f"question {i} about {label}: what happens to order {i * 7}", "label": label}
        for label in ("returns", "shipping", "payments")
        for i in range(10)
    ]
    lines = [{**r, "id": f"{copy}-{i}"} for i, r in enumerate(rows) for copy in ("first", "second")]
    path = write_lines(tmp_path / "questions.jsonl", lines)
    (tmp_path / "run.yaml").write_text("seed: 3\ndata:\n  questions: questions.jsonl\nsplit: {train: 0.6, dev: 0.2, test: 0.2}\n")
    return load_config(tmp_path / "run.yaml"), path


def test_the_text_check_sees_duplicates_that_the_group_check_misses(tmp_path):
    """Split the doubled file as it was before deduplication: groups look clean, texts do not."""
    _, path = doubled_questions(tmp_path)
    report = leakage_report(split_examples(load_questions(path), 0.2, 0.2, seed=3))
    assert sum(report["group_overlap"].values()) == 0
    assert report["text_overlap"]["train-test"] > 0 and report["shared_texts"]["train-test"]


def test_imported_duplicates_no_longer_reach_two_splits(tmp_path):
    config, path = doubled_questions(tmp_path)
    meta = run_prepare(config, str(path), tmp_path / "examples")
    assert meta["rows"] == 30 and meta["dropped_duplicate_text"] == 30
    split_meta = run_split(config, tmp_path / "examples", tmp_path / "splits")
    assert split_meta["test_text_overlap"] == 0
    assert read_split_report(tmp_path / "splits").text_overlap == dict.fromkeys(PAIRS, 0)


def test_generated_questions_share_no_text_between_splits(tmp_path):
    """Articles mode: the filters drop duplicates and near-duplicates across all generated rows, so no text leaks."""
    articles = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments", "membership"], 5))
    config = load_config(write_config(tmp_path / "run.yaml", articles, generate={"questions_per_article": 8}))
    meta = run_prepare(config, str(articles), tmp_path / "examples")
    assert meta["filtered_duplicate_within_new"] + meta["filtered_near_duplicate_within_new"] > 0  # there were some
    run_split(config, tmp_path / "examples", tmp_path / "splits")
    report = read_split_report(tmp_path / "splits")
    assert report.text_overlap == report.group_overlap == dict.fromkeys(PAIRS, 0)
    splits, _ = read_splits(tmp_path / "splits")
    assert sum(len(rows) for rows in splits.values()) == meta["rows"]


def test_the_whole_sample_corpus_shares_no_text_between_splits(tmp_path):
    config = load_config(write_config(tmp_path / "run.yaml", CORPUS))
    run_prepare(config, str(CORPUS), tmp_path / "examples")
    meta = run_split(config, tmp_path / "examples", tmp_path / "splits")
    assert meta["test_text_overlap"] == 0 and read_split_report(tmp_path / "splits").shared_texts == {}
