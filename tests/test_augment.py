import json

import pytest

from ftloop.components.augment import filter_new_rows, mine_errors, normalize, run_augment
from ftloop.components.records import Example, write_jsonl
from ftloop.components.split import read_splits, write_splits


def ex(i, label="returns", group=None, text=None, origin="generated"):
    return Example(f"e{i}", text or f"how do refunds work number {i}", label, group or f"g{i}", origin)


def test_mining_refuses_the_test_split():
    with pytest.raises(ValueError, match="never see the test split"):
        mine_errors({"train": [], "test": []})


def test_mining_returns_only_misclassified_train_and_dev_rows():
    preds = {
        "train": [{"id": "a", "label": "x", "prediction": "y"}, {"id": "b", "label": "x", "prediction": "x"}],
        "dev": [{"id": "c", "label": "y", "prediction": "x"}],
    }
    assert [r["id"] for r in mine_errors(preds)] == ["a", "c"]


def test_filters_drop_duplicates_of_any_split_empty_text_and_cap_per_class():
    existing = [ex(1, text="Where is my parcel?")]
    new = [
        ex(10, text="where is my PARCEL"),  # duplicate of an existing (e.g. test) question
        ex(11, text="  "),
        ex(12, text="Can I return shoes?"),
        ex(13, text="can i return shoes"),  # duplicate within new rows
        ex(14, text="What about refunds?"),
        ex(15, text="And exchanges?"),  # over the class cap of 2
    ]
    kept, removed = filter_new_rows(new, existing, max_per_class=2)
    assert [k.id for k in kept] == ["e12", "e14"]
    assert removed == {"duplicate": 2, "empty_or_length": 1, "class_cap": 1}
    assert normalize(" Where  is my parcel?! ") == "where is my parcel"


def test_run_augment_adds_filtered_rephrasings_to_train_only(tmp_path):
    splits = {
        "train": [ex(1, "returns"), ex(2, "shipping", text="where is my parcel")],
        "dev": [ex(3, "returns", text="refund timing please")],
        "test": [ex(4, "shipping", text="track my order")],
    }
    write_splits(splits, ["returns", "shipping"], tmp_path / "splits")
    preds = tmp_path / "eval" / "predictions"
    write_jsonl(preds / "train.jsonl", [{"id": "e1", "label": "returns", "prediction": "shipping"},
                                         {"id": "e2", "label": "shipping", "prediction": "shipping"}])
    write_jsonl(preds / "dev.jsonl", [{"id": "e3", "label": "returns", "prediction": "shipping"}])
    meta = run_augment(tmp_path / "splits", tmp_path / "eval", tmp_path / "out", "offline", 2, 50, seed=0)
    out, labels = read_splits(tmp_path / "out")
    assert labels == ["returns", "shipping"]
    assert out["dev"] == splits["dev"] and out["test"] == splits["test"]
    added = out["train"][2:]
    assert meta["errors_mined"] == 2 and meta["rows_added"] == len(added) == 4
    assert {a.parent_id for a in added} == {"e1", "e3"}
    assert all(a.origin == "rephrased" and a.label == "returns" and a.meta["confused_with"] == "shipping" for a in added)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["augmentation"]["removed"] == {"duplicate": 0, "empty_or_length": 0, "class_cap": 0}
    assert report["augmentation"]["confusions"] == {"returns->shipping": 2}
    assert meta["test_group_overlap"] == 0
