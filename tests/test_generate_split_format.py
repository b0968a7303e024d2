from collections import Counter

import pytest

from ftloop.components.chat_format import run_format
from ftloop.components.config import load_config
from ftloop.components.generate import OFFLINE_QUESTIONS, OfflineGenerator
from ftloop.components.records import Article, Example, load_articles, read_jsonl
from ftloop.components.sources import load_source, run_prepare
from ftloop.components.split import SplitError, check_splittable, leakage_report, run_split, split_examples

from conftest import CORPUS, corpus_subset, write_config, write_lines


@pytest.fixture(scope="module")
def corpus_examples():
    return OfflineGenerator(seed=3).questions(load_articles(CORPUS), 6)


def test_offline_generation_is_deterministic_and_has_provenance(corpus_examples):
    again = OfflineGenerator(seed=3).questions(load_articles(CORPUS), 6)
    assert again == corpus_examples
    assert OfflineGenerator(seed=4).questions(load_articles(CORPUS), 6) != corpus_examples
    per_article = Counter(e.group for e in corpus_examples)
    assert set(per_article.values()) == {6}
    for e in corpus_examples:
        assert e.origin == "generated" and e.generator == OFFLINE_QUESTIONS and e.round == 0
        assert e.parent_id == e.group and e.id.startswith(e.group)
    assert len({e.text.lower() for e in corpus_examples if e.group == "wb-returns-01"}) == 6


def test_offline_questions_are_built_from_the_article_content():
    article = Article("a", "Parcel lockers hold parcels for seven days. Parcel lockers are free.", "shipping", "Parcel lockers")
    other = Article("b", "Refunds reach your card in five days.", "returns", "Refunds")
    questions = OfflineGenerator(seed=0).questions([article, other], 4)
    for q in questions:
        source = article if q.group == "a" else other
        content_words = {w.lower().strip(".") for w in source.text.split() + (source.title or "").split()}
        assert any(w in q.text.lower() for w in content_words if len(w) > 3), q.text


def test_rephrase_keeps_label_group_and_links_the_parent(corpus_examples):
    parents = corpus_examples[:5]
    rows = OfflineGenerator(seed=1).rephrase(parents, 3, hint={parents[0].id: "shipping"})
    assert len(rows) == 15
    by_parent = {p.id: p for p in parents}
    for r in rows:
        parent = by_parent[r.parent_id]
        assert (r.label, r.group, r.origin, r.round) == (parent.label, parent.group, "rephrased", 1)
        assert r.text.lower() != parent.text.lower()
    assert rows[0].meta == {"confused_with": "shipping"}


def test_split_never_shares_a_group_and_covers_every_label(corpus_examples):
    splits = split_examples(corpus_examples, dev=0.2, test=0.2, seed=42)
    report = leakage_report(splits)
    assert report["group_overlap"] == {"train-dev": 0, "train-test": 0, "dev-test": 0}
    labels = {e.label for e in corpus_examples}
    for name, rows in splits.items():
        assert {e.label for e in rows} == labels, name
    assert sum(len(r) for r in splits.values()) == len(corpus_examples)
    # 5 articles per label with 0.2/0.2 -> 3/1/1 articles per label
    assert report["groups"] == {"train": 24, "dev": 8, "test": 8}


def test_split_is_deterministic_and_independent_of_input_order(corpus_examples):
    a = split_examples(corpus_examples, 0.2, 0.2, seed=42)
    b = split_examples(list(reversed(corpus_examples)), 0.2, 0.2, seed=42)
    c = split_examples(corpus_examples, 0.2, 0.2, seed=43)
    assert a == b
    assert a != c


def test_split_refuses_a_label_with_too_few_groups():
    rows = [Example(f"r{i}", "t", "returns", f"g{i % 4}", "generated") for i in range(8)]
    rows += [Example("s1", "t", "shipping", "only-article", "generated")]
    with pytest.raises(SplitError, match="label 'shipping' has 1 source group"):
        check_splittable(rows, 0.2, 0.2, source="articles.jsonl")


def test_prepare_split_format_stage_files(tmp_path):
    path = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    config = load_config(write_config(tmp_path / "run.yaml", path, generate={"questions_per_article": 3}))
    meta = run_prepare(config, str(path), tmp_path / "examples")
    # 36 generated; the filters drop duplicates across articles (counted in the metadata)
    assert meta["rows"] + meta["filtered_total"] == 36 and meta["filtered_total"] == meta["filtered_duplicate_within_new"] + meta["filtered_near_duplicate_within_new"]
    assert meta["labels"] == 3 and meta["groups"] == 12
    split_meta = run_split(tmp_path / "examples", tmp_path / "splits", 0.25, 0.25, config.seed)
    assert split_meta["test_group_overlap"] == 0
    assert split_meta["train_rows"] + split_meta["dev_rows"] + split_meta["test_rows"] == meta["rows"]
    fmt_meta = run_format(tmp_path / "splits", tmp_path / "formatted")
    assert fmt_meta["labels"] == 3
    row = read_jsonl(tmp_path / "formatted" / "test.jsonl")[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert "payments, returns, shipping" in row["prompt"][0]["content"]
    assert row["prompt"][1]["content"] == row["text"]
    assert row["completion"] == [{"role": "assistant", "content": row["label"]}]


def test_same_config_twice_gives_identical_artifacts(tmp_path):
    path = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    config = load_config(write_config(tmp_path / "run.yaml", path))
    hashes = []
    for attempt in ("a", "b"):
        run_prepare(config, str(path), tmp_path / attempt / "examples")
        split_hash = run_split(tmp_path / attempt / "examples", tmp_path / attempt / "splits", 0.25, 0.25, 7)["content_hash"]
        format_hash = run_format(tmp_path / attempt / "splits", tmp_path / attempt / "formatted")["content_hash"]
        hashes.append((split_hash, format_hash))
    assert hashes[0] == hashes[1]


def test_imported_questions_skip_generation(tmp_path):
    lines = ["text,label"] + [f"question {i} about refunds,returns" for i in range(6)] + [
        f"question {i} about parcels,shipping" for i in range(6)
    ]
    (tmp_path / "q.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "run.yaml").write_text("data:\n  questions: q.csv\n", encoding="utf-8")
    examples, labels = load_source(load_config(tmp_path / "run.yaml"))
    assert labels == ["returns", "shipping"]
    assert len(examples) == 12 and {e.origin for e in examples} == {"imported"}
    assert len({e.group for e in examples}) == 12
