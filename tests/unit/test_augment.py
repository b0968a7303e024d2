import json

import pytest

from ftloop.components.artifacts import RoundArtifacts
from ftloop.components.config import RunConfig
from ftloop.components.records import Example, write_json, write_jsonl
from ftloop.components.stages.augment_from_errors import (
    CONTINUE,
    STOP_KEEP_CURRENT,
    STOP_KEEP_REFERENCE,
    decide,
    label_consistent,
    mine_errors,
)
from ftloop.components.stages.augment_from_errors import run as run_augment
from ftloop.components.stages.carry_forward import run as carry_forward
from ftloop.components.stages.split_examples import read_splits, write_splits


def ex(i, label="returns", group=None, text=None, origin="generated"):
    return Example(f"e{i}", text or f"how do refunds work number {i}", label, group or f"g{i}", origin)


def cfg(**augment) -> RunConfig:
    return RunConfig.model_validate({"seed": 0, "data": {"questions": "q.jsonl"}, "augment": {"rephrasings_per_error": 2, **augment}})


def test_mining_refuses_the_test_split():
    with pytest.raises(ValueError, match="never see the test split"):
        mine_errors({"train": [], "test": []})


def test_mining_returns_only_misclassified_train_and_dev_rows():
    preds = {
        "train": [{"id": "a", "label": "x", "prediction": "y"}, {"id": "b", "label": "x", "prediction": "x"}],
        "dev": [{"id": "c", "label": "y", "prediction": "x"}],
    }
    assert [r["id"] for r in mine_errors(preds)] == ["a", "c"]


def test_label_consistency_needs_the_intended_label_on_top_by_the_margin():
    rows = [ex(1), ex(2), ex(3)]
    scores = [{"returns": 0.7, "shipping": 0.3}, {"returns": 0.52, "shipping": 0.48}, {"returns": 0.2, "shipping": 0.8}]
    assert label_consistent(rows, scores, margin=0.1) == [True, False, False]
    assert label_consistent(rows, scores, margin=0.0) == [True, True, False]


@pytest.mark.parametrize(
    "errors, current, reference, stopped, expected",
    [
        (3, 0.5, None, False, CONTINUE),  # round 1: nothing to compare with yet
        (0, 0.5, None, False, STOP_KEEP_CURRENT),  # no errors left
        (3, 0.6, 0.5, False, CONTINUE),  # the last round improved dev
        (3, 0.5, 0.5, False, STOP_KEEP_REFERENCE),  # it did not: keep the earlier model
        (3, 0.4, 0.5, False, STOP_KEEP_REFERENCE),
        (3, 0.9, 0.5, True, STOP_KEEP_CURRENT),  # stopped earlier: stay stopped
    ],
)
def test_loop_decision(errors, current, reference, stopped, expected):
    assert decide(errors, current, reference, 0.0, stopped)[0] == expected


def write_round_inputs(tmp_path, dev_f1=0.5, wrong=("e1", "e3")):
    splits = {
        "train": [
            ex(1, "returns", text="can I get my money back for these shoes"),
            ex(2, "shipping", text="where is my parcel right now"),
            ex(5, "returns", text="refund for a broken lamp please"),
            ex(6, "shipping", text="courier delivery time to my address"),
        ],
        "dev": [ex(3, "returns", text="refund timing please")],
        "test": [ex(4, "shipping", text="track my order")],
    }
    write_splits(splits, ["returns", "shipping"], tmp_path / "splits")
    preds = tmp_path / "eval" / "predictions"
    rows = {
        s: [
            {"id": e.id, "label": e.label, "prediction": ("shipping" if e.label == "returns" else "returns") if e.id in wrong else e.label}
            for e in splits[s]
        ]
        for s in ("train", "dev")
    }
    write_jsonl(preds / "train.jsonl", rows["train"])
    write_jsonl(preds / "dev.jsonl", rows["dev"])
    write_json(tmp_path / "eval" / "metrics.json", {"dev": {"macro_f1": dev_f1}})
    return splits


def test_run_augment_adds_filtered_conditioned_rephrasings_to_train_only(tmp_path):
    splits = write_round_inputs(tmp_path)
    meta = run_augment(cfg(label_filter="none"), tmp_path / "splits", tmp_path / "eval", tmp_path / "out", round=1, progress=lambda _: None)
    out, labels = read_splits(tmp_path / "out")
    assert labels == ["returns", "shipping"]
    assert out["dev"] == splits["dev"] and out["test"] == splits["test"]
    added = out["train"][4:]
    assert meta["decision"] == CONTINUE and meta["errors_mined"] == 2 and meta["rows_added"] == len(added) == 4
    assert {a.parent_id for a in added} == {"e1", "e3"}
    assert all(a.origin == "rephrased" and a.label == "returns" and a.meta["confused_with"] == "shipping" and a.round == 1 for a in added)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    aug = report["augmentation"]
    assert aug["removed"]["label_inconsistent"] == 0 and aug["removed"]["class_cap"] == 0
    assert set(aug["removed"]) >= {"duplicate_of_test", "near_duplicate_of_test", "garbage", "prompt_echo"}
    assert aug["confusions"] == {"returns->shipping": 2}
    assert report["augmentation_rounds"] == [aug]
    assert meta["test_group_overlap"] == 0 and meta["filtered_total"] == 0


class CannedRephraser:
    """A generator stub: each parent's rephrasings are given texts, so a test can aim them at other splits."""

    def __init__(self, texts: dict[str, list[str]]):
        self.texts = texts
        self.stats: dict = {}

    def rephrase(self, parents, n, hint=None, round=None):
        return [
            Example(f"{p.id}-r{round}.{i}", text, p.label, p.group, "rephrased", parent_id=p.id, round=round)
            for p in parents
            for i, text in enumerate(self.texts.get(p.id, []), 1)
        ]


def test_rephrasings_that_copy_a_test_question_never_reach_train(tmp_path, monkeypatch):
    test_question = "Where is the parcel I ordered last week, can I track it?"
    splits = {
        "train": [
            ex(1, "returns", text="can I get my money back for these shoes"),
            ex(2, "shipping", text="courier delivery time to my address"),
        ],
        "dev": [ex(3, "returns", text="how long until the refund shows up on my card")],
        "test": [ex(4, "shipping", text=test_question)],
    }
    write_splits(splits, ["returns", "shipping"], tmp_path / "splits")
    preds = [{"id": e.id, "label": e.label, "prediction": "shipping"} for e in (splits["train"][0], splits["dev"][0])]
    write_jsonl(tmp_path / "eval" / "predictions" / "train.jsonl", preds[:1])
    write_jsonl(tmp_path / "eval" / "predictions" / "dev.jsonl", preds[1:])
    write_json(tmp_path / "eval" / "metrics.json", {"dev": {"macro_f1": 0.5}})
    stub = CannedRephraser(
        {
            "e1": [
                "where is the parcel I ordered last week - can I track it",  # the test question, punctuation aside
                "is it possible to return these shoes for a full refund",
            ],
            "e3": ["Where is the parcel I ordered last week, can I track it now?"],  # a near-copy of it
        }
    )
    monkeypatch.setattr("ftloop.components.stages.augment_from_errors.make_generator", lambda *args, **kwargs: stub)
    meta = run_augment(cfg(label_filter="none"), tmp_path / "splits", tmp_path / "eval", tmp_path / "out", progress=lambda _: None)
    assert meta["rows_generated"] == 3 and meta["rows_added"] == 1
    assert meta["filtered_duplicate_of_test"] == 1 and meta["filtered_near_duplicate_of_test"] == 1
    train = read_splits(tmp_path / "out")[0]["train"]
    assert [e.text for e in train[2:]] == ["is it possible to return these shoes for a full refund"]
    removed = json.loads((tmp_path / "out" / "report.json").read_text())["augmentation"]["removed"]
    assert (removed["duplicate_of_test"], removed["near_duplicate_of_test"]) == (1, 1)


def test_tfidf_label_filter_and_class_cap_are_counted(tmp_path):
    write_round_inputs(tmp_path)
    meta = run_augment(
        cfg(label_filter="tfidf", label_margin=0.2, max_per_class=1),
        tmp_path / "splits",
        tmp_path / "eval",
        tmp_path / "out",
        progress=lambda _: None,
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())["augmentation"]
    removed = report["removed"]
    assert report["generated"] == 4
    assert removed["label_inconsistent"] + removed["class_cap"] + report["added"] == 4
    assert report["added"] <= 1 and meta["rows_added"] == report["added"]
    assert meta["filtered_label_inconsistent"] == removed["label_inconsistent"]


def test_a_stop_writes_the_kept_splits_and_later_rounds_stay_stopped(tmp_path):
    write_round_inputs(tmp_path, wrong=())
    meta = run_augment(cfg(), tmp_path / "splits", tmp_path / "eval", tmp_path / "r1", round=1, progress=lambda _: None)
    assert meta["decision"] == STOP_KEEP_CURRENT and "no misclassified" in meta["stop_reason"]
    assert read_splits(tmp_path / "r1") == read_splits(tmp_path / "splits")
    stopped = json.loads((tmp_path / "r1" / "report.json").read_text())["loop_stopped"]
    assert stopped["round"] == 1
    # round 2 sees errors again (e.g. evaluated differently) but the loop has stopped for good
    write_round_inputs(tmp_path / "again")
    meta2 = run_augment(
        cfg(),
        tmp_path / "r1",
        tmp_path / "again" / "eval",
        tmp_path / "r2",
        round=2,
        reference_eval_dir=tmp_path / "again" / "eval",
        progress=lambda _: None,
    )
    assert meta2["decision"] == STOP_KEEP_CURRENT
    assert json.loads((tmp_path / "r2" / "report.json").read_text())["loop_stopped"]["round"] == 1


def test_no_dev_improvement_keeps_the_reference_round(tmp_path):
    splits = write_round_inputs(tmp_path, dev_f1=0.4)
    write_round_inputs(tmp_path / "ref", dev_f1=0.5)
    ref_splits = {**splits, "train": splits["train"][:2]}
    write_splits(ref_splits, ["returns", "shipping"], tmp_path / "ref" / "splits")
    meta = run_augment(
        cfg(),
        tmp_path / "splits",
        tmp_path / "eval",
        tmp_path / "out",
        round=2,
        reference_eval_dir=tmp_path / "ref" / "eval",
        reference_split_dir=tmp_path / "ref" / "splits",
        progress=lambda _: None,
    )
    assert meta["decision"] == STOP_KEEP_REFERENCE and "0.5000 -> 0.4000" in meta["stop_reason"]
    assert read_splits(tmp_path / "out")[0]["train"] == ref_splits["train"]
    for name in ("model", "eval"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / "ref" / name).mkdir(exist_ok=True)
        (tmp_path / "ref" / name / "marker").write_text("reference")
    kept = carry_forward(
        meta["decision"],
        RoundArtifacts(tmp_path / "model", tmp_path / "eval"),
        RoundArtifacts(tmp_path / "ref" / "model", tmp_path / "ref" / "eval"),
        RoundArtifacts(tmp_path / "km", tmp_path / "ke"),
    )
    assert kept == "reference" and (tmp_path / "km" / "marker").read_text() == "reference"
    with pytest.raises(ValueError, match="only when the loop stops"):
        carry_forward(
            CONTINUE, RoundArtifacts(tmp_path, tmp_path), RoundArtifacts(tmp_path, tmp_path), RoundArtifacts(tmp_path / "x", tmp_path / "x")
        )


def test_select_final_keeps_the_last_round_only_if_it_improved_dev(tmp_path):
    from ftloop.components.stages.select_final_model import run as select_final

    def state(name, dev_f1, train_rows):
        root = tmp_path / name
        splits = {"train": [ex(i) for i in range(train_rows)], "dev": [ex(90)], "test": [ex(91)]}
        write_splits(splits, ["returns"], root / "splits", extra={"augmentation_rounds": [{"round": 1}] if name == "r1" else []})
        write_json(root / "eval" / "metrics.json", {"dev": {"macro_f1": dev_f1}})
        (root / "model").mkdir()
        (root / "model" / "which").write_text(name)
        return RoundArtifacts(root / "model", root / "eval", root / "splits")

    base, worse, better = state("base", 0.5, 2), state("r1", 0.4, 5), state("r1b", 0.6, 5)
    out = RoundArtifacts(tmp_path / "km", tmp_path / "ke", tmp_path / "ks")
    result = select_final(cfg(min_dev_improvement=0.0, rounds=1), worse, base, out)
    assert result["kept"] == "reference" and "0.5000 -> 0.4000" in result["reason"]
    assert (tmp_path / "km" / "which").read_text() == "base" and len(read_splits(out[2])[0]["train"]) == 2
    report = json.loads((out[2] / "report.json").read_text())
    assert report["loop_stopped"]["round"] == 2 and report["augmentation_rounds"] == [{"round": 1}]

    out2 = RoundArtifacts(tmp_path / "km2", tmp_path / "ke2", tmp_path / "ks2")
    assert select_final(cfg(min_dev_improvement=0.0, rounds=1), better, base, out2)["kept"] == "current"
    assert (tmp_path / "km2" / "which").read_text() == "r1b"
    assert "loop_stopped" not in json.loads((out2[2] / "report.json").read_text())
