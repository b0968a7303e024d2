from collections import Counter

import pytest

from ftloop.components.config import RunConfig, load_config
from ftloop.components.errors import InputFileError
from ftloop.components.generators.offline import OFFLINE_QUESTIONS, OfflineGenerator
from ftloop.components.records import Article, Example, load_articles, read_jsonl
from ftloop.components.stages.format_chat import run as run_format
from ftloop.components.stages.prepare_examples import load_source, prepare_source
from ftloop.components.stages.prepare_examples import run as run_prepare
from ftloop.components.stages.split_examples import SplitError, check_splittable, leakage_report, split_examples
from ftloop.components.stages.split_examples import run as run_split
from tests.fixtures.data import CORPUS, corpus_subset, write_config, write_lines


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


def with_split(config: RunConfig, dev: float, test: float, seed: int | None = None) -> RunConfig:
    update = {"split": config.split.model_copy(update={"dev": dev, "test": test})}
    return config.model_copy(update=update if seed is None else {**update, "seed": seed})


def test_prepare_split_format_stage_files(tmp_path):
    path = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    config = load_config(write_config(tmp_path / "run.yaml", path, generate={"questions_per_article": 3}))
    meta = run_prepare(config, str(path), tmp_path / "examples")
    # 36 generated; the filters drop duplicates across articles (counted in the metadata)
    assert (
        meta["rows"] + meta["filtered_total"] == 36
        and meta["filtered_total"] == meta["filtered_duplicate_within_new"] + meta["filtered_near_duplicate_within_new"]
    )
    assert meta["labels"] == 3 and meta["groups"] == 12
    split_meta = run_split(with_split(config, 0.25, 0.25), tmp_path / "examples", tmp_path / "splits")
    assert split_meta["test_group_overlap"] == 0
    assert split_meta["train_rows"] + split_meta["dev_rows"] + split_meta["test_rows"] == meta["rows"]
    fmt_meta = run_format(config, tmp_path / "splits", tmp_path / "formatted")
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
        split_hash = run_split(with_split(config, 0.25, 0.25, seed=7), tmp_path / attempt / "examples", tmp_path / attempt / "splits")[
            "content_hash"
        ]
        format_hash = run_format(config, tmp_path / attempt / "splits", tmp_path / attempt / "formatted")["content_hash"]
        hashes.append((split_hash, format_hash))
    assert hashes[0] == hashes[1]


def test_imported_questions_skip_generation(tmp_path):
    lines = (
        ["text,label"]
        + [f"question {i} about refunds,returns" for i in range(6)]
        + [f"question {i} about parcels,shipping" for i in range(6)]
    )
    (tmp_path / "q.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "run.yaml").write_text("data:\n  questions: q.csv\n", encoding="utf-8")
    examples, labels = load_source(load_config(tmp_path / "run.yaml"))
    assert labels == ["returns", "shipping"]
    assert len(examples) == 12 and {e.origin for e in examples} == {"imported"}
    assert len({e.group for e in examples}) == 12


# ------------------------------------------------------------------ imported questions: text-level duplicates


def questions_run(tmp_path, rows, **data) -> tuple[RunConfig, str]:
    path = write_lines(tmp_path / "questions.jsonl", rows)
    (tmp_path / "run.yaml").write_text(
        "seed: 7\ndata:\n  questions: questions.jsonl\n" + "".join(f"  {k}: {v}\n" for k, v in data.items()), encoding="utf-8"
    )
    return load_config(tmp_path / "run.yaml"), str(path)


def distinct_questions(n_per_label: int = 8) -> list[dict]:
    topics = {"returns": ["a refund for {}", "sending back {}"], "shipping": ["the parcel with {}", "delivery of {}"]}
    things = ["shoes", "a lamp", "two shirts", "the blue kettle", "a gift card", "my old phone", "a sofa", "the headphones"]
    return [
        {"text": f"Question {i}: what about {topics[label][i % 2].format(things[i])}?", "label": label}
        for label in topics
        for i in range(n_per_label)
    ]


def test_imported_rows_each_twice_are_kept_once_and_counted(tmp_path):
    """Issue 16: every row twice under different ids used to put copies of test questions in train."""
    rows = distinct_questions()
    doubled = [{**r, "id": f"{kind}{i}"} for i, r in enumerate(rows) for kind in ("a", "b")]
    doubled[1]["text"] = "  QUESTION 0 : what about a refund for shoes  "  # still the same text after normalisation
    config, path = questions_run(tmp_path, doubled)
    meta = run_prepare(config, path, tmp_path / "examples")
    assert meta["rows"] == len(rows) == 16 and meta["groups"] == 16
    assert meta["dropped_duplicate_text"] == 16
    assert meta["dropped_near_duplicate_text"] == 0 and meta["dropped_conflicting_labels"] == 0
    kept = read_jsonl(tmp_path / "examples" / "examples.jsonl")
    assert [r["id"] for r in kept] == [f"a{i}" for i in range(16)]  # the first of each pair, in file order
    assert all(r["meta"] == {} for r in kept)  # line numbers are for messages only
    split_meta = run_split(with_split(config, 0.25, 0.25), tmp_path / "examples", tmp_path / "splits")
    assert split_meta["test_text_overlap"] == 0 and split_meta["test_group_overlap"] == 0


def test_imported_near_duplicates_use_the_filters_key_and_threshold(tmp_path):
    rows = distinct_questions()
    same = {"text": rows[0]["text"].replace("what about", "what about:)") + " !", "label": rows[0]["label"]}
    near = {"text": rows[0]["text"].replace("shoes", "shoess"), "label": rows[0]["label"]}  # Jaccard 0.97
    config, path = questions_run(tmp_path, rows + [same, near])
    examples, _, removed = prepare_source(config, path)  # default threshold 0.9
    assert removed == {"dropped_duplicate_text": 1, "dropped_near_duplicate_text": 1, "dropped_conflicting_labels": 0}
    assert len(examples) == 16
    strict = config.model_copy(update={"filters": config.filters.model_copy(update={"near_duplicate_threshold": 1.0})})
    examples, _, removed = prepare_source(strict, path)
    assert removed["dropped_near_duplicate_text"] == 0 and removed["dropped_duplicate_text"] == 1 and len(examples) == 17


def test_the_same_text_with_two_labels_is_an_error_naming_both_lines(tmp_path):
    rows = distinct_questions()
    rows.insert(5, {"text": rows[1]["text"].upper(), "label": "shipping"})  # line 6 repeats line 2 with another label
    config, path = questions_run(tmp_path, rows)
    with pytest.raises(InputFileError) as err:
        load_source(config)
    assert str(err.value).startswith(f"{path}:6: text also appears at line 2 with label 'returns' (here 'shipping'): conflicting labels")


def test_a_near_duplicate_with_another_label_is_an_error_too(tmp_path):
    rows = distinct_questions()
    rows.append({"text": rows[2]["text"].replace("shirts", "shirtss"), "label": "shipping"})
    config, path = questions_run(tmp_path, rows)
    with pytest.raises(InputFileError, match=r":17: text nearly duplicates line 3 \(label 'returns', here 'shipping'\)"):
        load_source(config)


def test_conflicting_labels_drop_removes_every_row_of_that_text(tmp_path):
    rows = distinct_questions()
    rows += [
        {"text": rows[1]["text"], "label": "shipping"},
        {"text": rows[1]["text"], "label": "returns"},
        {"text": rows[4]["text"], "label": "returns"},
    ]
    config, path = questions_run(tmp_path, rows, conflicting_labels="drop")
    meta = run_prepare(config, path, tmp_path / "examples")
    assert meta["dropped_conflicting_labels"] == 3  # rows 2, 17 and 18: neither label can be trusted
    assert meta["dropped_duplicate_text"] == 1 and meta["rows"] == 15
    texts = [r["text"] for r in read_jsonl(tmp_path / "examples" / "examples.jsonl")]
    assert rows[1]["text"] not in texts and texts.count(rows[4]["text"]) == 1
