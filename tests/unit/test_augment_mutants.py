"""The augmentation judge and cap (components/stages/augment_from_errors.py), pinned where mutation testing
(`make mutation MUTANTS='ftloop.components.stages.augment_from_errors.*'`, bench/README.md) found the tests
loose: decide()'s boundary and reasons, the class cap's order, the margins of the label check, error mining,
the report and metadata counts of a round, and the model judge (with the model loading and scoring faked:
what it passes to them is the point; tests/unit/test_augment_model_filter.py runs it on a real model)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ftloop.components.artifacts import PredictionRow
from ftloop.components.records import write_json
from ftloop.components.stages import augment_from_errors as aug
from ftloop.components.stages.augment_from_errors import (
    CONTINUE,
    STOP_KEEP_CURRENT,
    STOP_KEEP_REFERENCE,
    cap_per_class,
    decide,
    label_consistent,
    mine_errors,
)
from ftloop.components.stages.split_examples import read_splits
from tests.unit.test_augment import CannedRephraser, cfg, ex, write_round_inputs

# ------------------------------------------------------------------ decide


def test_decide_reasons_word_for_word():
    assert decide(3, 0.5, None, 0.0, True) == (STOP_KEEP_CURRENT, "the loop stopped in an earlier round")
    assert decide(0, 0.5, 0.9, 0.0, True) == (STOP_KEEP_CURRENT, "the loop stopped in an earlier round")
    assert decide(0, 0.5, 0.9, 0.0, False) == (STOP_KEEP_CURRENT, "no misclassified train/dev rows left")
    assert decide(1, 0.5, None, 0.0, False) == (CONTINUE, "")
    assert decide(2, 0.5, 0.75, 0.25, False) == (
        STOP_KEEP_REFERENCE,
        "dev macro-F1 did not improve by more than 0.25 (0.7500 -> 0.5000); keeping the earlier model",
    )


def test_decide_needs_an_improvement_strictly_above_the_minimum():
    # binary fractions, so the differences are exact
    assert decide(1, 0.75, 0.5, 0.25, False)[0] == STOP_KEEP_REFERENCE  # exactly the minimum: not enough
    assert decide(1, 0.75, 0.5, 0.125, False) == (CONTINUE, "")
    assert decide(1, 0.5, 0.75, 0.0, False)[0] == STOP_KEEP_REFERENCE  # worse
    assert decide(1, 0.25, 0.0, 0.0, False)[0] == CONTINUE  # a reference of 0.0 is still a reference
    assert decide(1, 0.0, 0.0, 0.0, False)[0] == STOP_KEEP_REFERENCE


# ------------------------------------------------------------------ cap, label check, mining


def test_cap_per_class_keeps_the_first_rows_of_each_class_in_order():
    rows = [ex(1, "a"), ex(2, "a"), ex(3, "b"), ex(4, "a"), ex(5, "b"), ex(6, "c")]
    assert cap_per_class(rows, 2) == ([rows[0], rows[1], rows[2], rows[4], rows[5]], 1)
    assert cap_per_class(rows, 1) == ([rows[0], rows[2], rows[5]], 3)
    assert cap_per_class(rows, 3) == (rows, 0)
    assert cap_per_class([], 1) == ([], 0)


def test_label_consistent_margins_ties_and_missing_labels():
    r = ex(1, "returns")
    assert label_consistent([r], [{"returns": 0.5, "shipping": 0.5}], 0.0) == [True]  # a tie passes a zero margin
    assert label_consistent([r], [{"returns": 0.75, "shipping": 0.25}], 0.5) == [True]  # exactly the margin
    assert label_consistent([r], [{"returns": 0.75, "shipping": 0.25}], 0.625) == [False]
    assert label_consistent([r], [{"returns": 0.25}], 0.125) == [True]  # no runner-up: it counts as 0
    assert label_consistent([r], [{"returns": 0.25}], 0.5) == [False]
    assert label_consistent([r], [{"shipping": 0.5}], 0.25) == [False]  # the intended label unscored: 0
    assert label_consistent([r], [{"shipping": 0.5, "other": 0.75, "returns": 0.875}], 0.125) == [True]
    assert label_consistent([r], [{"shipping": 0.5, "other": 0.8125, "returns": 0.875}], 0.125) == [False]
    assert label_consistent([r, ex(2, "shipping")], [{"returns": 1.0}, {"returns": 1.0}], 0.0) == [True, False]


def test_mine_errors_reads_rows_or_dicts_train_then_dev_and_missing_splits():
    rows = {
        "dev": [
            PredictionRow(id="d1", label="x", prediction="y"),
            PredictionRow(id="d2", label="x", prediction="x"),
            PredictionRow(id="d3", label="x", prediction=None),
        ]
    }
    assert [r.id for r in mine_errors(rows)] == ["d1", "d3"]  # an unparsed prediction is an error too
    mixed = {"dev": [{"id": "d", "label": "x", "prediction": "y"}], "train": [{"id": "t", "label": "x", "prediction": "z"}]}
    assert [r["id"] for r in mine_errors(mixed)] == ["t", "d"]
    assert mine_errors({}) == []
    assert mine_errors(
        {"train": [{"id": "t", "label": "x", "prediction": "y"}], "other": [{"id": "o", "label": "x", "prediction": "y"}]}
    ) == [{"id": "t", "label": "x", "prediction": "y"}]
    with pytest.raises(ValueError, match="^error mining must never see the test split$"):
        mine_errors({"test": []})


def test_tfidf_judge_is_trained_on_train_with_its_labels():
    splits = {
        "train": [ex(i, "returns", text=f"refund my money back please {i}") for i in range(4)]
        + [ex(10 + i, "shipping", text=f"where is my parcel courier {i}") for i in range(4)],
        "dev": [ex(20, "shipping", text="refund my money back please")],
    }  # dev never trains it
    judge = aug.tfidf_judge(splits, ["returns", "shipping"], seed=0)
    (refund, parcel) = judge(["refund my money please", "where is the courier with my parcel"])
    assert set(refund) == {"returns", "shipping"}
    assert refund["returns"] > refund["shipping"] and parcel["shipping"] > parcel["returns"]


def test_model_judge_loads_the_model_and_scores_as_evaluation_does(tmp_path, monkeypatch):
    calls = {}

    def fake_meta(model_dir):
        calls["meta"] = model_dir
        return SimpleNamespace(base_model=SimpleNamespace(name_or_path=str(tmp_path / "gone-base")))

    def fake_load(model_dir, base_model=None):
        calls["load"] = (model_dir, base_model)
        return "MODEL", "TOKENIZER"

    def fake_score(model, tokenizer, prompts, labels, batch_size, batch_tokens=None):
        calls["score"] = (model, tokenizer, prompts, labels, batch_size, batch_tokens)
        return [{"returns": 0.5}] * len(prompts)

    monkeypatch.setattr("ftloop.components.artifacts.read_model_meta", fake_meta)
    monkeypatch.setattr("ftloop.components.modeling.loading.load_for_inference", fake_load)
    monkeypatch.setattr("ftloop.components.modeling.scoring.score_labels", fake_score)
    from ftloop.components.config import RunConfig
    from ftloop.components.prompts import prompt_messages

    config = RunConfig.model_validate(
        {
            "data": {"questions": "q.jsonl"},
            "eval": {"batch_size": 7, "batch_tokens": 512},
            "model": {"name_or_path": "/models/base"},
            "format": {"system_prompt": "Pick one of {labels}."},
        }
    )
    score = aug.model_judge(config, tmp_path / "adapter", ["returns", "shipping"])
    # the recorded base path is gone (artifacts moved): the configured base is loaded instead
    assert calls["meta"] == tmp_path / "adapter" and calls["load"] == (tmp_path / "adapter", "/models/base")
    assert score(["a b", "c d"]) == [{"returns": 0.5}, {"returns": 0.5}]
    assert calls["score"] == (
        "MODEL",
        "TOKENIZER",
        [prompt_messages(t, ["returns", "shipping"], "Pick one of {labels}.") for t in ("a b", "c d")],
        ["returns", "shipping"],
        7,
        512,
    )


# ------------------------------------------------------------------ a whole round


REPHRASINGS = {
    "e1": ["could I send these boots back for cash", "I would like my money refunded for the jacket"],
    "e2": ["when will the courier drop off my box"],
    "e3": ["how many days before the refund lands in my bank"],
}


def round_with(tmp_path, monkeypatch, texts=REPHRASINGS, wrong=("e1", "e2", "e3"), round=1, **augment):
    write_round_inputs(tmp_path, dev_f1=0.625, wrong=wrong)
    stub = CannedRephraser(texts)
    stub.stats = {"requests": 3}
    made = []
    monkeypatch.setattr(aug, "make_generator", lambda *a, **k: made.append((a, k)) or stub)
    lines: list[str] = []
    meta = aug.run(
        cfg(label_filter="none", **augment), tmp_path / "splits", tmp_path / "eval", tmp_path / "out", round=round, progress=lines.append
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    return meta, report, lines, made


def test_a_round_records_what_it_mined_generated_removed_and_added(tmp_path, monkeypatch):
    meta, report, lines, made = round_with(tmp_path, monkeypatch)
    info = report["augmentation"]
    removed = {"duplicate_of_test": 0, "near_duplicate_of_test": 0}
    assert info["removed"]["label_inconsistent"] == 0 and info["removed"]["class_cap"] == 0
    assert sum(info["removed"].values()) == 0 and set(info["removed"]) >= set(removed)
    assert {k: v for k, v in info.items() if k != "removed"} == {
        "round": 1,
        "mine_splits": ["train", "dev"],
        "errors_mined": {"train": 2, "dev": 1},
        "confusions": {"returns->shipping": 2, "shipping->returns": 1},
        "dev_macro_f1_before": 0.625,
        "backend": "offline",
        "label_filter": "none",
        "generated": 4,
        "added": 4,
        "added_per_class": {"returns": 3, "shipping": 1},
        "dev_groups_in_train": 1,  # e3's rephrasing keeps its dev group
        "generator_stats": {"requests": 3},
        "decision": CONTINUE,
        "stop_reason": "",
    }
    assert list(info["confusions"]) == ["returns->shipping", "shipping->returns"]  # most common first
    assert report["augmentation_rounds"] == [info] and "loop_stopped" not in report
    assert lines == ["augment round 1: 3 errors mined, 4 rephrasings from offline", "augment round 1: continue, 4 rows added"]
    assert (
        meta["round"],
        meta["decision"],
        meta["stop_reason"],
        meta["errors_mined"],
        meta["rows_generated"],
        meta["rows_added"],
        meta["filtered_total"],
    ) == (1, CONTINUE, "", 3, 4, 4, 0)
    assert meta["filtered_class_cap"] == 0 and meta["filtered_label_inconsistent"] == 0
    train = read_splits(tmp_path / "out")[0]["train"]
    assert [e.text for e in train[4:]] == [t for k in ("e1", "e2", "e3") for t in REPHRASINGS[k]]
    assert made[0][0][0] == "offline" and made[0][1]["checkpoint_dir"] == tmp_path / "out" / "generation"


def test_the_class_cap_drops_the_later_rephrasings_and_counts_them(tmp_path, monkeypatch):
    meta, report, _, _ = round_with(tmp_path, monkeypatch, max_per_class=2)
    info = report["augmentation"]
    assert info["removed"]["class_cap"] == 1 and meta["filtered_class_cap"] == 1 and meta["filtered_total"] == 1
    assert info["added"] == meta["rows_added"] == 3 and info["added_per_class"] == {"returns": 2, "shipping": 1}
    assert info["dev_groups_in_train"] == 0  # e3's (dev) rephrasing was the one capped
    train = read_splits(tmp_path / "out")[0]["train"]
    assert [e.text for e in train[4:]] == REPHRASINGS["e1"] + REPHRASINGS["e2"]


def test_the_label_judge_gets_the_kept_texts_and_the_margin_applies(tmp_path, monkeypatch):
    seen = {}

    def fake_tfidf(splits, labels, seed):
        seen["args"] = (sorted(splits), labels, seed)

        def judge(texts):
            seen["texts"] = texts
            # e1's first rephrasing is judged shipping; the rest returns/shipping by a wide margin
            return [
                {"returns": 0.25, "shipping": 0.75}
                if t == REPHRASINGS["e1"][0]
                else {"returns": 0.5, "shipping": 0.5}
                if t == REPHRASINGS["e3"][0]
                else {"returns": 1.0, "shipping": 0.0}
                if "refund" in t
                else {"returns": 0.0, "shipping": 1.0}
                for t in texts
            ]

        return judge

    monkeypatch.setattr(aug, "tfidf_judge", fake_tfidf)
    write_round_inputs(tmp_path, wrong=("e1", "e2", "e3"))
    monkeypatch.setattr(aug, "make_generator", lambda *a, **k: CannedRephraser(REPHRASINGS))
    meta = aug.run(
        cfg(label_filter="tfidf", label_margin=0.0).model_copy(update={"seed": 5}),
        tmp_path / "splits",
        tmp_path / "eval",
        tmp_path / "out",
        progress=lambda _: None,
    )
    assert seen["args"] == (["dev", "test", "train"], ["returns", "shipping"], 5)
    assert seen["texts"] == [t for k in ("e1", "e2", "e3") for t in REPHRASINGS[k]]
    # margin 0: the tie (e3) passes, the one on the wrong label does not
    assert meta["filtered_label_inconsistent"] == 1 and meta["rows_added"] == 3
    assert [e.text for e in read_splits(tmp_path / "out")[0]["train"][4:]] == [
        REPHRASINGS["e1"][1],
        REPHRASINGS["e2"][0],
        REPHRASINGS["e3"][0],
    ]


def test_the_model_judge_needs_a_model_dir_and_gets_it(tmp_path, monkeypatch):
    write_round_inputs(tmp_path)
    monkeypatch.setattr(aug, "make_generator", lambda *a, **k: CannedRephraser(REPHRASINGS))
    with pytest.raises(ValueError, match="^label_filter 'model' needs the current model$"):
        aug.run(cfg(label_filter="model"), tmp_path / "splits", tmp_path / "eval", tmp_path / "out", progress=lambda _: None)
    got = {}

    def fake_model_judge(config, model_dir, labels):
        got["args"] = (config.augment.label_filter, model_dir, labels)
        return lambda texts: [{"returns": 1.0} for _ in texts]

    monkeypatch.setattr(aug, "model_judge", fake_model_judge)
    meta = aug.run(
        cfg(label_filter="model"),
        tmp_path / "splits",
        tmp_path / "eval",
        tmp_path / "out2",
        model_dir=tmp_path / "m",
        progress=lambda _: None,
    )
    assert got["args"] == ("model", tmp_path / "m", ["returns", "shipping"]) and meta["rows_added"] == 3


def test_nothing_surviving_the_filters_stops_and_keeps_the_current_splits(tmp_path, monkeypatch):
    texts = {"e1": ["x"], "e3": ["?!"]}  # too short: every rephrasing is filtered out
    meta, report, lines, _ = round_with(tmp_path, monkeypatch, texts=texts, wrong=("e1", "e3"))
    reason = "no rephrasing survived the filters"
    assert (meta["decision"], meta["stop_reason"], meta["rows_generated"], meta["rows_added"]) == (STOP_KEEP_CURRENT, reason, 2, 0)
    assert meta["filtered_total"] == 2
    assert report["loop_stopped"] == {"round": 1, "decision": STOP_KEEP_CURRENT, "reason": reason}
    assert report["augmentation_rounds"] == []
    assert read_splits(tmp_path / "out") == read_splits(tmp_path / "splits")
    assert lines[-1] == f"augment round 1: {STOP_KEEP_CURRENT} ({reason})"


def test_a_stop_before_generating_counts_nothing_and_reports_zero_filtered(tmp_path, monkeypatch):
    monkeypatch.setattr(aug, "make_generator", lambda *a, **k: pytest.fail("no generation after a stop"))
    write_round_inputs(tmp_path, wrong=())
    meta = aug.run(cfg(), tmp_path / "splits", tmp_path / "eval", tmp_path / "out", round=3, progress=lambda _: None)
    assert meta["filtered_total"] == 0 and not [k for k in meta if k.startswith("filtered_") and k != "filtered_total"]
    assert (meta["round"], meta["errors_mined"], meta["rows_generated"], meta["rows_added"]) == (3, 0, 0, 0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["loop_stopped"] == {"round": 3, "decision": STOP_KEEP_CURRENT, "reason": "no misclassified train/dev rows left"}


def test_the_reference_counts_from_round_two_and_without_its_splits_the_current_ones_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(aug, "make_generator", lambda *a, **k: CannedRephraser(REPHRASINGS))
    write_round_inputs(tmp_path, dev_f1=0.5)
    write_json(tmp_path / "ref" / "metrics.json", {"dev": {"macro_f1": 0.75}})
    # round 1 never compares (a reference passed by mistake is ignored)
    first = aug.run(
        cfg(label_filter="none"),
        tmp_path / "splits",
        tmp_path / "eval",
        tmp_path / "r1",
        round=1,
        reference_eval_dir=tmp_path / "ref",
        progress=lambda _: None,
    )
    assert first["decision"] == CONTINUE
    second = aug.run(
        cfg(label_filter="none"),
        tmp_path / "splits",
        tmp_path / "eval",
        tmp_path / "r2",
        round=2,
        reference_eval_dir=tmp_path / "ref",
        progress=lambda _: None,
    )
    assert second["decision"] == STOP_KEEP_REFERENCE and "(0.7500 -> 0.5000)" in second["stop_reason"]
    assert read_splits(tmp_path / "r2") == read_splits(tmp_path / "splits")  # no reference splits given
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert report["loop_stopped"]["decision"] == STOP_KEEP_REFERENCE and report["loop_stopped"]["round"] == 2


def test_the_round_number_reaches_the_generator_and_the_new_rows(tmp_path, monkeypatch):
    meta, report, lines, _ = round_with(tmp_path, monkeypatch, round=2)
    added = read_splits(tmp_path / "out")[0]["train"][4:]
    assert [e.round for e in added] == [2, 2, 2, 2] and added[0].id == "e1-r2.1"
    assert report["augmentation"]["round"] == meta["round"] == 2 and lines[0].startswith("augment round 2: ")


def test_a_stop_carries_the_kept_rounds_augmentation_and_seed_and_nothing_unset(tmp_path):
    from ftloop.components.stages.split_examples import write_splits

    splits = write_round_inputs(tmp_path, wrong=())  # no errors: the round stops and keeps these splits
    last = {"round": 1, "added": 3, "decision": CONTINUE}
    write_splits(splits, ["returns", "shipping"], tmp_path / "kept", extra={"seed": 7, "augmentation": last, "augmentation_rounds": [last]})
    meta = aug.run(cfg(), tmp_path / "kept", tmp_path / "eval", tmp_path / "r2", round=2, progress=lambda _: None)
    assert meta["decision"] == STOP_KEEP_CURRENT
    r2 = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert r2["augmentation"] == last and r2["seed"] == 7
    assert r2["augmentation_rounds"] == [last] and r2["loop_stopped"]["round"] == 2
    # splits that never had either: neither key appears
    aug.run(cfg(), tmp_path / "splits", tmp_path / "eval", tmp_path / "r0", round=1, progress=lambda _: None)
    r0 = json.loads((tmp_path / "r0" / "report.json").read_text())
    assert "augmentation" not in r0 and "seed" not in r0
