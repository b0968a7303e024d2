"""One test per planted bug that survived the suite (issue 17); each names the bug it kills.

| behaviour | planted bug this file kills |
|---|---|
| grouped split | ``check_splittable``: ``n_train < 1`` -> ``< 0`` |
| grouped split | ``leakage_report`` counting overlap on row ids instead of groups |
| McNemar | the ``min(1.0, ...)`` cap on the p-value dropped |
| near-duplicate filter | ``>=`` -> ``>`` at the threshold |
| augmentation | the TF-IDF label judge skipped |
| secrets | the openai backend's redaction dropped on a malformed 200 body |
| openai backend | ``Retry-After`` ignored |
"""

from __future__ import annotations

import json
import math

import pytest

from ftloop.components.config import FiltersConfig, RunConfig
from ftloop.components.evaluation.stats import mcnemar_exact
from ftloop.components.generators.base import GeneratorError
from ftloop.components.generators.factory import make_generator
from ftloop.components.generators.filters import NearDuplicateIndex, filter_rows, jaccard, shingles
from ftloop.components.records import Article, Example, write_json, write_jsonl
from ftloop.components.stages.augment_from_errors import run as run_augment
from ftloop.components.stages.split_examples import SplitError, check_splittable, leakage_report, read_splits, split_examples, write_splits
from tests.fixtures.fake_servers import FakeOpenAI, _OpenAIHandler, _Server


def row(i, label, group, text=None, origin="generated") -> Example:
    return Example(f"r{i}", text or f"question number {i} about {label}", label, group, origin)


# ------------------------------------------------------------- grouped split


def test_a_label_with_two_articles_cannot_be_split_without_leaking():
    """dev and test take one article each, so train would get none: a clear error, never an empty train label."""
    examples = [row(i, "returns", f"ret{i % 2}") for i in range(6)] + [row(10 + i, "shipping", f"shp{i}") for i in range(5)]
    with pytest.raises(SplitError, match=r"label 'returns' has 2 source group\(s\).*at least 3 are needed") as err:
        split_examples(examples, dev=0.15, test=0.15, seed=0)
    assert "shipping" not in str(err.value)  # five articles are enough


@pytest.mark.parametrize("n_articles", [1, 2, 3, 4, 7])
def test_every_label_that_splits_has_a_train_row(n_articles):
    examples = [row(i, "returns", f"a{i}") for i in range(n_articles)]
    try:
        splits = split_examples(examples, dev=0.15, test=0.15, seed=1)
    except SplitError:
        assert n_articles < 3  # one article per split at least
        return
    assert n_articles >= 3
    assert all(any(e.label == "returns" for e in splits[name]) for name in ("train", "dev", "test"))


def test_check_splittable_passes_for_three_articles():
    check_splittable([row(i, "returns", f"a{i}") for i in range(3)], dev=0.15, test=0.15)


def test_leakage_report_flags_a_group_shared_by_two_splits_with_its_name():
    """Row ids all differ; the leak is the article ``a1`` in both train and test."""
    splits = {
        "train": [row(1, "returns", "a1"), row(2, "returns", "a2")],
        "dev": [row(3, "returns", "a3")],
        "test": [row(4, "returns", "a1"), row(5, "returns", "a4")],
    }
    report = leakage_report(splits)
    assert report["group_overlap"]["train-test"] == 1
    assert report["group_overlap"]["train-dev"] == report["group_overlap"]["dev-test"] == 0
    assert report["shared_groups"]["train-test"] == ["a1"]
    assert "train-dev" not in report["shared_groups"] and "dev-test" not in report["shared_groups"]


def test_leakage_report_is_clean_when_only_row_ids_repeat():
    """Same row id in two splits but different articles: no group leak (ids are not what is counted)."""
    splits = {
        "train": [row(1, "returns", "a1")],
        "dev": [row(1, "returns", "a2")],
        "test": [row(1, "returns", "a3")],
    }
    report = leakage_report(splits)
    assert report["group_overlap"] == {"train-dev": 0, "train-test": 0, "dev-test": 0}
    assert report["shared_groups"] == {}


# ------------------------------------------------------------------- McNemar


def test_mcnemar_p_value_is_capped_at_one_when_fixed_equals_broken():
    result = mcnemar_exact([True, False], [False, True])
    assert (result["fixed"], result["broken"], result["discordant"]) == (1, 1, 2)
    assert result["p_value"] == 1.0


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
def test_mcnemar_p_value_is_a_probability_for_balanced_discordance(k):
    before = [True] * k + [False] * k + [True] * 3
    after = [False] * k + [True] * k + [True] * 3
    result = mcnemar_exact(before, after)
    assert result["fixed"] == result["broken"] == k
    assert result["p_value"] == 1.0


# ----------------------------------------------------- near-duplicate filter


BASE = "how long does a refund take to reach my card"
CLOSE = "how long does a refund take to reach my bank card"


def test_a_pair_exactly_at_the_threshold_is_a_near_duplicate():
    """The config says 'at or above': similarity == threshold is dropped; a hair above the similarity is kept."""
    sim = jaccard(shingles(BASE), shingles(CLOSE))
    assert 0.5 < sim < 1.0
    index = NearDuplicateIndex(sim)
    index.add(BASE, "of_test")
    assert index.match(CLOSE) == "of_test"
    above = NearDuplicateIndex(math.nextafter(sim, 1.0))
    above.add(BASE, "of_test")
    assert above.match(CLOSE) is None

    existing = {"train": [], "dev": [], "test": [Example("t1", BASE, "returns", "g1", "generated")]}
    new = [Example("n1", CLOSE, "returns", "g2", "rephrased")]
    kept, counts = filter_rows(new, existing, ["returns", "shipping"], FiltersConfig(near_duplicate_threshold=sim))
    assert kept == [] and counts["near_duplicate_of_test"] == 1
    kept, counts = filter_rows(new, existing, ["returns", "shipping"], FiltersConfig(near_duplicate_threshold=math.nextafter(sim, 1.0)))
    assert [k.id for k in kept] == ["n1"] and counts["near_duplicate_of_test"] == 0


# -------------------------------------------------------------- augmentation


class CannedRephraser:
    def __init__(self, texts: dict[str, list[str]]):
        self.texts = texts
        self.stats: dict = {}

    def rephrase(self, parents, n, hint=None, round=None):
        return [
            Example(f"{p.id}-r{round}.{i}", text, p.label, p.group, "rephrased", parent_id=p.id, round=round)
            for p in parents
            for i, text in enumerate(self.texts.get(p.id, []), 1)
        ]


RETURNS = [
    "I want a refund for the broken shoes",
    "how do I return the jacket for my money back",
    "refund my order please, the item is damaged",
    "can I send back this lamp and get a refund",
    "return label for a refund on my dress",
]
SHIPPING = [
    "where is my parcel, the courier is late",
    "tracking number for my delivery please",
    "when will the courier deliver my parcel",
    "delivery to my address is delayed",
    "my parcel tracking shows no delivery yet",
]


def test_only_the_tfidf_judge_removes_a_rephrasing_that_reads_as_another_label(tmp_path, monkeypatch):
    """The class cap is far above the rows generated, so a row that goes missing was removed by the judge."""
    train = [Example(f"tr{i}", t, "returns", f"gr{i}", "generated") for i, t in enumerate(RETURNS)]
    train += [Example(f"ts{i}", t, "shipping", f"gs{i}", "generated") for i, t in enumerate(SHIPPING)]
    splits = {
        "train": train,
        "dev": [Example("d1", "refund timing for a returned coat", "returns", "gd1", "generated")],
        "test": [Example("t1", "parcel stuck at the depot", "shipping", "gt1", "generated")],
    }
    write_splits(splits, ["returns", "shipping"], tmp_path / "splits")
    write_jsonl(tmp_path / "eval" / "predictions" / "train.jsonl", [{"id": "tr0", "label": "returns", "prediction": "shipping"}])
    write_jsonl(tmp_path / "eval" / "predictions" / "dev.jsonl", [])
    write_json(tmp_path / "eval" / "metrics.json", {"dev": {"macro_f1": 0.5}})
    on_label = "please refund the damaged shoes I want to return"
    off_label = "courier parcel delivery tracking is late again"  # labelled returns, reads as shipping
    monkeypatch.setattr(
        "ftloop.components.stages.augment_from_errors.make_generator", lambda *a, **k: CannedRephraser({"tr0": [on_label, off_label]})
    )
    config = RunConfig.model_validate(
        {"seed": 0, "data": {"questions": "q.jsonl"}, "augment": {"label_filter": "tfidf", "label_margin": 0.1, "max_per_class": 100}}
    )
    meta = run_augment(config, tmp_path / "splits", tmp_path / "eval", tmp_path / "out", progress=lambda _: None)
    removed = json.loads((tmp_path / "out" / "report.json").read_text())["augmentation"]["removed"]
    assert removed["label_inconsistent"] == 1 and removed["class_cap"] == 0
    assert meta["rows_generated"] == 2 and meta["rows_added"] == 1 and meta["filtered_label_inconsistent"] == 1
    added = [e.text for e in read_splits(tmp_path / "out")[0]["train"][len(train) :]]
    assert added == [on_label]


# --------------------------------------------------------- openai backend


class _HeaderFaultHandler(_OpenAIHandler):
    """The fake OpenAI server, plus a fault that answers with a status and the given headers."""

    def _fault(self) -> bool:
        with self.fake.lock:
            self.fake.headers.append({k.lower(): v for k, v in self.headers.items()})
            fault = self.fake.faults[0] if self.fake.faults else None
        if fault is not None and fault[0] == "status_headers":
            self.fake.next_fault()
            status, headers = fault[1]
            self._send(status, {"error": f"scripted {status}"}, headers=headers)
            return True
        return super()._fault()


class FakeOpenAIWithHeaders(_Server):
    reply = staticmethod(FakeOpenAI.reply)

    def __init__(self):
        super().__init__(_HeaderFaultHandler)
        self.headers: list[dict[str, str]] = []  # every request's headers, names lower-cased


ARTICLE = [Article("a1", "Refunds reach your card within five days after the parcel arrives back.", "returns", "Refunds")]


def openai_config(server, **extra) -> RunConfig:
    settings = {
        "base_url": f"{server.url}/v1",
        "model": "served-model",
        "timeout_seconds": 2,
        "backoff_seconds": 0.0,
        "max_retries": 2,
        "concurrency": 1,
        "api_key_env": "FTLOOP_SURVIVOR_KEY",
        **extra,
    }
    return RunConfig.model_validate(
        {"seed": 3, "data": {"questions": "q.jsonl"}, "generate": {"backend": "openai"}, "generators": {"openai": settings}}
    )


def openai_backend(server, sleeps: list[float], **extra):
    gen = make_generator("openai", openai_config(server, **extra))
    gen._sleep = sleeps.append  # the backend's sleep hook (OpenAIGenerator(sleep=...)): record instead of waiting
    return gen


def test_openai_waits_as_long_as_retry_after_says():
    sleeps: list[float] = []
    with FakeOpenAIWithHeaders() as server:
        server.faults = [("status_headers", (429, {"Retry-After": "2"}))]
        rows = openai_backend(server, sleeps).questions(ARTICLE, 1)
    assert len(rows) == 1 and len(server.requests) == 2
    assert sleeps == [2.0]  # backoff_seconds is 0: only Retry-After can make it 2


def test_the_openai_key_is_masked_in_a_malformed_200_reply_that_echoes_it(monkeypatch):
    key = "sk-survivor-9c1e5b7f3a"
    monkeypatch.setenv("FTLOOP_SURVIVOR_KEY", key)
    echo = json.dumps({"debug": {"headers": {"Authorization": f"Bearer {key}"}}}).encode()  # 200 but no choices
    with FakeOpenAI() as server:
        server.faults = [("raw", echo)] * 10
        with pytest.raises(GeneratorError) as err:
            openai_backend(server, [], max_retries=1).questions(ARTICLE, 1)
    assert {r["auth"] for r in server.requests} == {f"Bearer {key}"}  # the key was really sent
    message = str(err.value)
    assert "malformed chat completion" in message and "<FTLOOP_SURVIVOR_KEY>" in message
    assert key not in message
