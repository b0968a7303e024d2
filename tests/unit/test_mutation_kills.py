"""Tests written to kill surviving mutants of `make mutation` (bench/README.md, Mutation testing).

Each test names the behaviour it pins; the mutants it was written for are in bench/README.md.
"""

from __future__ import annotations

import pytest

from ftloop.components.config import RunConfig
from ftloop.components.evaluation.stats import bootstrap_ci, expected_calibration_error, mcnemar_exact

# ---------------------------------------------------------------- evaluation/stats.py


def test_mcnemar_rejects_unpaired_outcomes_with_a_clear_message():
    with pytest.raises(ValueError, match=r"^paired outcomes must have the same length$"):
        mcnemar_exact([True, False], [True])


def test_mcnemar_single_discordant_pair():
    assert mcnemar_exact([False], [True]) == {"fixed": 1, "broken": 0, "discordant": 1, "p_value": 1.0}
    assert mcnemar_exact([], []) == {"fixed": 0, "broken": 0, "discordant": 0, "p_value": 1.0}


def test_bootstrap_rejects_unpaired_rows_with_a_clear_message():
    with pytest.raises(ValueError, match=r"^y_true has 2 items but y_pred has 1$"):
        bootstrap_ci(["a", "b"], ["a"], ["a", "b"], seed=0)


def test_bootstrap_of_no_rows_is_zero_and_of_one_row_is_that_row():
    assert bootstrap_ci([], [], ["a", "b"], seed=0) == {"accuracy": (0.0, 0.0), "macro_f1": (0.0, 0.0)}
    one = bootstrap_ci(["a"], ["a"], ["a"], seed=0, resamples=20)
    assert one == {"accuracy": (1.0, 1.0), "macro_f1": (1.0, 1.0)}


def test_ece_of_one_row_and_of_none():
    assert expected_calibration_error([], []) == 0.0
    assert expected_calibration_error([0.9], [False]) == pytest.approx(0.9)
    assert expected_calibration_error([0.25], [True]) == pytest.approx(0.75)


# ------------------------------------------------------------- evaluation/metrics.py


def test_compute_metrics_by_hand():
    """3 rows of a, 1 of b; one a predicted b, one a unparseable (None: wrong, in no column)."""
    from ftloop.components.evaluation.metrics import compute_metrics

    m = compute_metrics(["a", "a", "a", "b"], ["a", "b", None, "b"], ["a", "b"])
    assert m["n"] == 4 and m["labels"] == ["a", "b"]
    assert m["accuracy"] == 0.5
    # a: P 1/1, R 1/3, F1 0.5; b: P 1/2, R 1/1, F1 2/3
    assert m["per_class"] == {
        "a": {"precision": 1.0, "recall": pytest.approx(1 / 3), "f1": pytest.approx(0.5), "support": 3},
        "b": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1},
    }
    assert m["macro_precision"] == pytest.approx(0.75) and m["macro_recall"] == pytest.approx(2 / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["weighted_precision"] == pytest.approx(0.875) and m["weighted_recall"] == pytest.approx(0.5)
    assert m["weighted_f1"] == pytest.approx((3 * 0.5 + 2 / 3) / 4)
    assert m["confusion_matrix"] == [[1, 1], [0, 1]]
    assert all(type(v) is float for k, v in m.items() if k.startswith(("macro", "weighted", "accuracy")))
    assert all(type(row[0]) is int for row in m["confusion_matrix"])


def test_compute_metrics_of_no_rows_has_every_key_at_zero():
    from ftloop.components.evaluation.metrics import compute_metrics

    zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert compute_metrics([], [], ["a", "b"]) == {
        "n": 0,
        "labels": ["a", "b"],
        "accuracy": 0.0,
        **{f"{avg}_{k}": 0.0 for avg in ("macro", "weighted") for k in zero},
        "per_class": {"a": {**zero, "support": 0}, "b": {**zero, "support": 0}},
        "confusion_matrix": [[0, 0], [0, 0]],
    }


def test_compute_metrics_errors_name_the_problem():
    from ftloop.components.errors import FtloopError
    from ftloop.components.evaluation.metrics import INVALID, compute_metrics

    with pytest.raises(ValueError, match=r"^y_true has 2 items but y_pred has 1$"):
        compute_metrics(["a", "b"], ["a"], ["a", "b"])
    with pytest.raises(FtloopError, match=r"labels not in the label set: \['x', 'zzz'\]"):
        compute_metrics(["a", "x"], ["zzz", "a"], ["a", "b"])
    assert compute_metrics(["a"], [INVALID], ["a", "b"])["accuracy"] == 0.0  # the placeholder itself is allowed


# ---------------------------------------------------- generators/openai.py: retries and redaction


def _openai(server, sleeps, **extra):
    from tests.unit.test_survivors import openai_backend

    return openai_backend(server, sleeps, **extra)


def test_openai_backoff_doubles_and_retry_after_is_capped():
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    sleeps: list[float] = []
    with FakeOpenAIWithHeaders() as server:
        server.faults = [
            ("status_headers", (503, {})),
            ("status_headers", (503, {"Retry-After": "soon"})),
            ("status_headers", (429, {"Retry-After": "120"})),
            ("status_headers", (502, {"Retry-After": "0.5"})),
        ]
        gen = _openai(server, sleeps, backoff_seconds=0.25, max_retries=4)
        assert len(gen.questions(ARTICLE, 1)) == 1
    # no header: 0.25 * 2**0; unparseable header: 0.25 * 2**1; 120 s capped at 60; a decimal header as given
    assert sleeps == [0.25, 0.5, 60.0, 0.5]
    assert gen.stats["http_retries"] == 4


def test_openai_gives_up_after_max_retries_with_the_last_problem():
    from ftloop.components.generators.base import GeneratorError
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    sleeps: list[float] = []
    with FakeOpenAIWithHeaders() as server:
        server.faults = [("status_headers", (500, {}))] * 3
        gen = _openai(server, sleeps, backoff_seconds=1.0, max_retries=2)
        with pytest.raises(GeneratorError, match=r"/v1/chat/completions: gave up after 3 tries: HTTP 500: .*scripted 500"):
            gen.questions(ARTICLE, 1)
    assert sleeps == [1.0, 2.0] and len(server.requests) == 3  # no sleep after the last try
    assert gen.stats["http_retries"] == 2


def test_openai_refusals_name_the_status_and_mask_the_key(monkeypatch):
    from ftloop.components.generators.base import GeneratorError
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    monkeypatch.setenv("FTLOOP_SURVIVOR_KEY", "key-abc-123")
    with FakeOpenAIWithHeaders() as server:
        server.faults = [("reply", (404, b"no model key-abc-123 " + b"x" * 400))]
        with pytest.raises(GeneratorError) as err:
            _openai(server, []).questions(ARTICLE, 1)
        server.faults = [("reply", (403, b"forbidden"))]
        with pytest.raises(GeneratorError, match=r"HTTP 403 \(is FTLOOP_SURVIVOR_KEY set\?\): forbidden"):
            _openai(server, []).questions(ARTICLE, 1)
    message = str(err.value)
    assert "HTTP 404: no model <FTLOOP_SURVIVOR_KEY> xxx" in message and "is FTLOOP_SURVIVOR_KEY set" not in message
    assert "key-abc-123" not in message
    assert "<FTLOOP_SURVIVOR_KEY> " + "x" * 169 + ";" in message  # the masked detail, cut at 200 characters


def test_openai_without_a_key_sends_none_and_redacts_nothing(monkeypatch):
    from ftloop.components.generators.base import GeneratorError
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    monkeypatch.delenv("FTLOOP_SURVIVOR_KEY", raising=False)
    with FakeOpenAIWithHeaders() as server:
        server.faults = [("raw", b'{"oops": "Bearer none"}')] * 3
        with pytest.raises(GeneratorError, match=r"malformed chat completion: b'\{\"oops\": \"Bearer none\"\}'"):
            _openai(server, [], max_retries=1).questions(ARTICLE, 1)
    assert {r["auth"] for r in server.requests} == {None}


def test_openai_request_body_and_headers(monkeypatch):
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    monkeypatch.delenv("FTLOOP_SURVIVOR_KEY", raising=False)

    with FakeOpenAIWithHeaders() as server:
        gen = _openai(server, [], temperature=0.3, max_tokens=77)
        gen.questions(ARTICLE, 2)
    body = server.requests[0]["body"]
    assert body["model"] == "served-model" and body["temperature"] == 0.3 and body["max_tokens"] == 77
    assert body["seed"] == 3 * 1_000_003 and body["messages"][0]["role"] == "system"
    assert server.requests[0]["path"] == "/v1/chat/completions"
    sent = server.headers[0]
    assert sent["content-type"] == "application/json" and sent["accept"] == "application/json"
    assert "authorization" not in sent  # FTLOOP_SURVIVOR_KEY is unset here: no key, no header


# ------------------------------------------------------------- generators/okareo.py: redaction


def test_okareo_clean_masks_the_key_and_keeps_one_line(monkeypatch):
    from ftloop.components.config import OkareoConfig
    from ftloop.components.generators.okareo import OkareoSession

    monkeypatch.setenv("OKAREO_API_KEY", "ok-secret-key")
    session = OkareoSession(OkareoConfig())
    assert session._clean("denied:\n  key ok-secret-key\tagain ok-secret-key") == ("denied: key <OKAREO_API_KEY> again <OKAREO_API_KEY>")
    assert session._clean(b"api-key: ok-secret-key\n") == "b'api-key: <OKAREO_API_KEY>\\n'"
    assert session._clean(ValueError("bad ok-secret-key")) == "bad <OKAREO_API_KEY>"


def test_okareo_refusal_that_echoes_the_key_is_masked(monkeypatch):
    from ftloop.components.generators.base import GeneratorError
    from ftloop.components.generators.factory import make_generator
    from ftloop.components.records import Article
    from tests.fixtures.fake_servers import FakeOkareo

    monkeypatch.setenv("OKAREO_API_KEY", "ok-secret-key")
    articles = [Article("a1", "Refunds reach your card within five days.", "returns", "Refunds")]
    with FakeOkareo() as server:
        config = RunConfig.model_validate(
            {
                "seed": 1,
                "data": {"questions": "q.jsonl"},
                "generate": {"backend": "okareo"},
                "generators": {"okareo": {"base_url": server.url, "backoff_seconds": 0.0, "max_retries": 1}},
            }
        )
        server.faults = [None, ("reply", (403, b'{"detail": "key ok-secret-key\\nis not allowed"}'))]
        with pytest.raises(GeneratorError) as err:
            make_generator("okareo", config).questions(articles, 2)
    message = str(err.value)
    assert "ok-secret-key" not in message and "<OKAREO_API_KEY>" in message and "403" in message


def test_compute_metrics_scores_an_unpredicted_or_absent_class_zero_without_warnings():
    """b is never predicted (precision 0/0) and c neither occurs nor is predicted: 0, not 1, and no sklearn warning."""
    import warnings

    from ftloop.components.evaluation.metrics import compute_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics(["a", "b"], ["a", "a"], ["a", "b", "c"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_precision"] == pytest.approx(0.5 / 3) and m["macro_recall"] == pytest.approx(1 / 3)
    assert m["weighted_precision"] == pytest.approx(0.25)


def test_openai_sampling_seed_per_request_and_attempt():
    """seed * 1_000_003 + request index * 101 + attempt: reproducible, and a re-ask of a bad reply samples anew."""
    from ftloop.components.records import Article
    from tests.unit.test_survivors import FakeOpenAIWithHeaders

    articles = [Article(f"a{i}", f"Article {i} explains refunds to the card.", "returns", f"T{i}") for i in range(2)]
    calls = {"n": 0}

    def reply(body):
        calls["n"] += 1
        return "no list here" if calls["n"] <= 2 else FakeOpenAIWithHeaders.reply(body)

    with FakeOpenAIWithHeaders() as server:
        server.reply = reply
        _openai(server, [], max_attempts=2).questions(articles, 1)
    base = 3 * 1_000_003
    assert sorted(r["body"]["seed"] for r in server.requests) == [base, base + 1, base + 101, base + 102]


def test_openai_error_body_that_is_not_utf8_is_reported_not_raised():
    from ftloop.components.generators.base import GeneratorError
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    with FakeOpenAIWithHeaders() as server:
        server.faults = [("reply", (400, b"\xff\xfe bad request"))]
        with pytest.raises(GeneratorError, match="HTTP 400: \ufffd\ufffd bad request"):
            _openai(server, []).questions(ARTICLE, 1)


# ------------------------------------------------------------- stages/split_examples.py


def _ex(i, label, group, text=None):
    from ftloop.components.records import Example

    return Example(f"e{i:03d}", text or f"question {i} about {label}", label, group, "generated")


def test_group_label_is_the_majority_then_alphabetical():
    from ftloop.components.stages.split_examples import group_labels

    rows = [_ex(1, "b", "g1"), _ex(2, "a", "g1"), _ex(3, "c", "g2"), _ex(4, "c", "g2"), _ex(5, "a", "g2")]
    assert group_labels(rows) == {"g1": "a", "g2": "c"}


@pytest.mark.parametrize(
    "n, dev, test, expected",
    [(10, 0.15, 0.15, (6, 2, 2)), (3, 0.15, 0.15, (1, 1, 1)), (20, 0.1, 0.2, (14, 2, 4)), (2, 0.15, 0.15, (0, 1, 1))],
)
def test_split_sizes(n, dev, test, expected):
    from ftloop.components.stages.split_examples import split_sizes

    assert split_sizes(n, dev, test) == expected


def test_unsplittable_labels_are_all_named_in_one_message():
    from ftloop.components.stages.split_examples import SplitError, check_splittable

    rows = [_ex(1, "x", "g1"), _ex(2, "y", "g2"), _ex(3, "y", "g3")] + [_ex(10 + i, "z", f"z{i}") for i in range(3)]
    with pytest.raises(SplitError) as err:
        check_splittable(rows, dev=0.15, test=0.15, source="examples.jsonl")
    assert str(err.value) == (
        "examples.jsonl: cannot split without leaking: "
        "label 'x' has 1 source group(s) (articles); at least 3 are needed so train, dev and test each get one; "
        "label 'y' has 2 source group(s) (articles); at least 3 are needed so train, dev and test each get one. "
        "Add more articles (or question groups) for these labels, or remove them."
    )


def test_split_assigns_whole_groups_in_the_planned_sizes():
    from ftloop.components.stages.split_examples import split_examples

    rows = [_ex(10 * g + k, "a", f"a{g}") for g in range(10) for k in range(2)]
    rows += [_ex(500 + g, "b", f"b{g}") for g in range(3)]
    splits = split_examples(rows, dev=0.15, test=0.15, seed=4)
    groups = {name: {e.group for e in part} for name, part in splits.items()}
    assert [len({g for g in groups[n] if g.startswith("a")}) for n in ("train", "dev", "test")] == [6, 2, 2]
    assert [len({g for g in groups[n] if g.startswith("b")}) for n in ("train", "dev", "test")] == [1, 1, 1]
    assert sum(len(p) for p in splits.values()) == len(rows)
    assert all(part == sorted(part, key=lambda e: e.id) for part in splits.values())
    assert split_examples(list(reversed(rows)), dev=0.15, test=0.15, seed=4) == splits
    assert split_examples(rows, dev=0.15, test=0.15, seed=5) != splits


def test_leakage_report_counts_and_names_at_most_twenty_groups():
    from ftloop.components.stages.split_examples import leakage_report

    shared = [f"g{i:02d}" for i in range(25)]
    splits = {
        "train": [_ex(i, "a", g) for i, g in enumerate(shared)] + [_ex(99, "b", "only-train")],
        "dev": [_ex(100 + i, "a", g) for i, g in enumerate(shared)],
        "test": [_ex(200, "b", "t1")],
    }
    report = leakage_report(splits)
    assert report["group_overlap"] == {"train-dev": 25, "train-test": 0, "dev-test": 0}
    assert report["shared_groups"] == {"train-dev": shared[:20]}
    assert report["groups"] == {"train": 26, "dev": 25, "test": 1}
    assert report["rows"] == {"train": 26, "dev": 25, "test": 1}
    assert report["labels"]["train"] == {"a": 25, "b": 1} and report["labels"]["test"] == {"b": 1}


def test_write_splits_metadata_counts_only_leaks_into_test(tmp_path):
    from ftloop.components.stages.split_examples import read_splits, write_splits

    splits = {
        "train": [_ex(1, "a", "g1"), _ex(2, "b", "g2")],
        "dev": [_ex(3, "a", "g1")],  # train-dev leak: not a test leak
        "test": [_ex(4, "b", "g2"), _ex(5, "a", "g3"), _ex(6, "a", "g1")],  # train-test leaks g2 and g1, dev-test g1
    }
    meta = write_splits(splits, ["a", "b"], tmp_path / "out", extra={"seed": 7})
    assert (meta["rows"], meta["train_rows"], meta["dev_rows"], meta["test_rows"], meta["labels"]) == (6, 2, 1, 3, 2)
    assert meta["test_group_overlap"] == 2 + 1
    assert read_splits(tmp_path / "out") == (splits, ["a", "b"])


# ------------------------------------------------------------- generators/filters.py


@pytest.mark.parametrize(
    "text, reason",
    [
        ("refund?!", None),  # exactly min_chars (8) and 1 word: garbage only by word count below
        ("ab cd ef", None),  # 8 characters, 3 words
        ("ab cd e", "too_short"),  # 7 characters
        ("abcd efgh ijkl mnopq", None),  # exactly max_chars (20) is allowed
        ("abc 12 de4 f5", None),  # alpha ratio exactly 0.6 (6 of 10 visible) is allowed
        ("abcd efgh ijkl mnopqr", "too_long"),  # 21 characters
        ("a1 b2 c3", "garbage"),  # alpha ratio 0.5 < 0.6
        ("ab1 cd2 x", None),  # alpha ratio 5/7 >= 0.6 (spaces ignored)
        ("abc 12 de", None),  # ratio exactly 5/7... and two words
        ("go go go no", "garbage"),  # one word is 3 of 4 (> half)
        ("go go no no", None),  # exactly half: not garbage
        ("go go no", None),  # fewer than 4 words: repetition not checked
        ("### abc def gh", "prompt_echo"),
        ("what label: ab", "label_leak"),
    ],
)
def test_quality_boundaries(text, reason):
    from ftloop.components.config import FiltersConfig
    from ftloop.components.generators.filters import quality_problem

    cfg = FiltersConfig(min_chars=8, max_chars=20, min_words=1, min_alpha_ratio=0.6)
    assert quality_problem(text, ["returns"], cfg) == reason


def test_min_words_boundary():
    from ftloop.components.config import FiltersConfig
    from ftloop.components.generators.filters import quality_problem

    cfg = FiltersConfig(min_chars=1, max_chars=100, min_words=3, min_alpha_ratio=0.0)
    assert quality_problem("two words", [], cfg) == "garbage"
    assert quality_problem("three whole words", [], cfg) is None
    assert quality_problem("   ", [], cfg) == "empty" and quality_problem("?!", [], cfg) == "empty"


@pytest.mark.parametrize(
    "text",
    ["returns", "Returns: where is my money", "is this [returns] or not", "is this (returns) here", "is this <returns> ok"],
)
def test_label_leak_forms(text):
    from ftloop.components.config import FiltersConfig
    from ftloop.components.generators.filters import quality_problem

    cfg = FiltersConfig(min_chars=1, min_words=1, min_alpha_ratio=0.0)
    assert quality_problem(text, ["shipping", "Returns"], cfg) == "label_leak"
    assert quality_problem(text.replace("eturns", "efunds"), ["shipping", "Returns"], cfg) is None


def test_shingles_and_jaccard_edges():
    from ftloop.components.generators.filters import SHINGLE, dedup_key, jaccard, shingles

    assert SHINGLE == 4
    assert shingles("") == frozenset() and shingles("?!") == frozenset()
    assert shingles("Abc!") == frozenset({"abc"}) and shingles("abcd") == frozenset({"abcd"})
    assert shingles("abcde") == frozenset({"abcd", "bcde"})
    assert jaccard(frozenset(), frozenset()) == 1.0
    assert jaccard(frozenset({"a", "b"}), frozenset({"b", "c"})) == pytest.approx(1 / 3)
    assert dedup_key("  Hello,   WORLD!! ") == "hello world"


def test_near_duplicate_index_picks_the_most_similar_row():
    from ftloop.components.generators.filters import NearDuplicateIndex

    index = NearDuplicateIndex(0.3)
    assert index.match("anything at all") is None  # empty index
    index.add("how long does a refund take", "of_train")
    index.add("how long does a refund take to arrive", "of_dev")
    assert index.match("how long does a refund take to arrive here") == "of_dev"
    assert index.match("") is None


def test_filter_rows_within_new_duplicates_and_counts(tmp_path):
    from ftloop.components.config import FiltersConfig
    from ftloop.components.generators.filters import REASONS, filter_rows, summarize_counts
    from ftloop.components.records import Example

    def new(i, text):
        return Example(f"n{i}", text, "returns", "g", "rephrased")

    rows = [
        new(1, "  1. \u201cHow long does my refund take?\u201d  "),
        new(2, "how long does my REFUND take"),  # exact duplicate of the first kept row
        new(3, "How long does my refund take, please?"),  # near duplicate of it
        new(4, "Where can I print a return label"),
    ]
    kept, counts = filter_rows(rows, {"train": [], "dev": [], "test": []}, ["returns"], FiltersConfig(near_duplicate_threshold=0.6))
    assert [(k.id, k.text) for k in kept] == [("n1", "How long does my refund take?"), ("n4", "Where can I print a return label")]
    assert kept[1] is rows[3]  # unchanged text: the same row object
    assert counts["duplicate_within_new"] == 1 and counts["near_duplicate_within_new"] == 1
    assert set(counts) == set(REASONS) and sum(counts.values()) == 2
    flat = summarize_counts(counts)
    assert flat["filtered_total"] == 2 and flat["filtered_duplicate_within_new"] == 1 and len(flat) == len(REASONS) + 1


def test_openai_base_url_with_a_trailing_slash():
    from ftloop.components.generators.factory import make_generator
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders, openai_config

    with FakeOpenAIWithHeaders() as server:
        gen = make_generator("openai", openai_config(server, base_url=f"{server.url}/v1/"))
        assert len(gen.questions(ARTICLE, 1)) == 1
    assert gen.url == f"{server.url}/v1/chat/completions" and server.requests[0]["path"] == "/v1/chat/completions"


def test_openai_retry_after_that_is_not_a_number_falls_back_to_backoff():
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    sleeps: list[float] = []
    with FakeOpenAIWithHeaders() as server:
        server.faults = [("status_headers", (503, {"Retry-After": "1.2.3"}))]
        _openai(server, sleeps, backoff_seconds=0.125).questions(ARTICLE, 1)
    assert sleeps == [0.125]


def test_openai_connection_errors_name_their_reason():
    from ftloop.components.generators.base import GeneratorError
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    with FakeOpenAIWithHeaders() as server:
        url = server.url
    # the server is gone: connection refused, a URLError whose reason is the OSError
    with pytest.raises(GeneratorError, match=r"gave up after 2 tries: connection failed: \[Errno \d+\] Connection refused"):
        _openai(type("S", (), {"url": url})(), [], max_retries=1).questions(ARTICLE, 1)
    with FakeOpenAIWithHeaders() as server:
        server.faults = [("sleep", 1.0)] * 2
        with pytest.raises(GeneratorError, match=r"gave up after 2 tries: connection failed: timed out"):
            _openai(server, [], max_retries=1, timeout_seconds=0.2).questions(ARTICLE, 1)


def test_openai_malformed_reply_detail_is_cut_at_123_characters_and_empty_content_is_empty():
    import json as _json

    from ftloop.components.generators.base import GeneratorError
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders

    raw = b'{"x": "' + b"y" * 300 + b'"}'
    with FakeOpenAIWithHeaders() as server:
        server.faults = [("raw", raw)] * 2
        with pytest.raises(GeneratorError) as err:
            _openai(server, [], max_retries=1).questions(ARTICLE, 1)
        assert str(err.value).split("malformed chat completion: ")[1].split(";")[0] == repr(raw)[:123]
        empty = _json.dumps({"choices": [{"message": {"role": "assistant", "content": None}}]}).encode()
        server.faults = [("raw", empty)] * 3
        with pytest.raises(GeneratorError, match=r"reply began ''"):
            _openai(server, [], max_attempts=1).questions(ARTICLE, 1)


def test_resampled_scores_name_which_side_has_unknown_labels():
    import numpy as np

    from ftloop.components.evaluation.stats import resampled_scores

    draws = np.zeros((1, 1), dtype=int)
    with pytest.raises(ValueError, match=r"^gold labels not in the label set: \['x'\]$"):
        resampled_scores(["x"], ["a"], ["a"], draws)
    with pytest.raises(ValueError, match=r"^predictions not in the label set: \['y'\]$"):
        resampled_scores(["a"], ["y"], ["a"], draws)


def test_check_splittable_names_data_by_default():
    from ftloop.components.stages.split_examples import SplitError, check_splittable

    with pytest.raises(SplitError, match=r"^data: cannot split without leaking: label 'x'"):
        check_splittable([_ex(1, "x", "g1")], dev=0.15, test=0.15)


def test_leakage_report_names_shared_texts_as_the_filters_compare_them():
    from ftloop.components.stages.split_examples import leakage_report

    splits = {
        "train": [_ex(1, "a", "g1", "Where is my PARCEL?"), _ex(2, "a", "g1", "Where is my parcel")],
        "dev": [_ex(3, "a", "g2", "something else entirely")],
        "test": [_ex(4, "a", "g3", "where is my parcel!!")],
    }
    report = leakage_report(splits)
    assert report["text_overlap"] == {"train-dev": 0, "train-test": 1, "dev-test": 0}
    assert report["shared_texts"] == {"train-test": ["Where is my PARCEL?"]}  # the first row's text, by id


def test_split_stage_uses_the_config_seed_and_records_it(tmp_path):
    import json

    from ftloop.components.artifacts import examples_path, write_labels
    from ftloop.components.config import RunConfig
    from ftloop.components.records import write_jsonl
    from ftloop.components.stages.split_examples import read_splits, split_examples
    from ftloop.components.stages.split_examples import run as run_split

    rows = [_ex(10 * g + k, "a", f"a{g}") for g in range(8) for k in range(2)] + [_ex(500 + g, "b", f"b{g}") for g in range(5)]
    write_jsonl(examples_path(tmp_path / "ex"), (e.to_dict() for e in rows))
    write_labels(tmp_path / "ex", ["a", "b"])
    config = RunConfig.model_validate({"seed": 11, "data": {"questions": "q.jsonl"}, "split": {"train": 0.6, "dev": 0.2, "test": 0.2}})
    meta = run_split(config, tmp_path / "ex", tmp_path / "out")
    assert read_splits(tmp_path / "out") == (split_examples(rows, dev=0.2, test=0.2, seed=11), ["a", "b"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["seed"] == 11
    assert meta["rows"] == len(rows)


def test_filter_edge_cases_found_by_mutation():
    from ftloop.components.config import FiltersConfig
    from ftloop.components.generators.filters import NearDuplicateIndex, filter_rows, jaccard, normalize_text
    from ftloop.components.records import Example

    assert normalize_text('""') == "" and normalize_text("'a'") == "a"
    assert jaccard(frozenset(), frozenset({"abcd"})) == 0.0 and jaccard(frozenset({"abcd"}), frozenset()) == 0.0
    index = NearDuplicateIndex(0.5)
    index.add("where is my parcel today", "of_train")
    index.add("where is my parcel today", "of_test")
    assert index.match("where is my parcel today") == "of_train"  # ties: the first indexed row

    def new(i, text):
        return Example(f"n{i}", text, "returns", "g", "rephrased")

    existing = {"train": [], "dev": [], "test": [Example("t", "where is the parcel I ordered last week", "returns", "t", "generated")]}
    rows = [
        new(1, "short"),
        new(2, "tiny"),
        new(3, "where is the parcel I ordered last week?!"),
        new(4, "Where is the parcel I ordered last week, now?"),
        new(5, "where's the parcel I ordered last week"),
    ]
    kept, counts = filter_rows(rows, existing, ["returns"], FiltersConfig(near_duplicate_threshold=0.6))
    assert counts["too_short"] == 2 and counts["duplicate_of_test"] == 1 and counts["near_duplicate_of_test"] == 2
    assert kept == []
