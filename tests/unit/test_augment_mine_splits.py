"""`augment.mine_splits`: which splits' errors a round rephrases into train. `[train]` keeps dev an honest
selector (no rephrasing of a dev error reaches train); the default, `[train, dev]`, mines both; test never."""

from __future__ import annotations

import json

import pytest

from ftloop.components.config import RunConfig, load_config
from ftloop.components.errors import ConfigError
from ftloop.components.reports.tables import augmentation_lines
from ftloop.components.stages import augment_from_errors as aug
from ftloop.components.stages.augment_from_errors import STOP_KEEP_CURRENT, mine_errors
from ftloop.components.stages.split_examples import read_splits
from tests.unit.test_augment import CannedRephraser, cfg, write_round_inputs
from tests.unit.test_augment_mutants import REPHRASINGS

BASE = "data:\n  articles: a.jsonl\n"

# ------------------------------------------------------------------ config


def _load(tmp_path, augment: str) -> RunConfig:
    (tmp_path / "a.jsonl").write_text("")
    path = tmp_path / "run.yaml"
    path.write_text(BASE + "augment:\n" + augment, encoding="utf-8")
    return load_config(path)


def test_the_default_mines_train_and_dev_as_before():
    assert RunConfig.model_validate({"data": {"questions": "q.jsonl"}}).augment.mine_splits == ["train", "dev"]
    description = RunConfig.model_fields["augment"].annotation.model_fields["mine_splits"].description or ""
    assert "optimistic" in description and "[train]" in description


@pytest.mark.parametrize("value, expected", [("[train]", ["train"]), ("[dev]", ["dev"]), ("[dev, train]", ["dev", "train"])])
def test_a_subset_of_train_and_dev_is_accepted(tmp_path, value, expected):
    assert _load(tmp_path, f"  mine_splits: {value}\n").augment.mine_splits == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("[train, test]", "test is never mined"),
        ("[test]", "test is never mined"),
        ("[train, train]", "lists a split twice"),
        ("[]", "needs at least one split"),
        ("train", "must be a list of splits, e.g. [train]"),
        ("[eval]", "Input should be 'train' or 'dev'"),
    ],
)
def test_test_duplicates_and_an_empty_list_are_refused_with_the_key_and_line(tmp_path, value, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, f"  mine_splits: {value}\n")
    assert "run.yaml:4: augment.mine_splits" in str(err.value) and message in str(err.value)


def test_it_is_a_compile_time_key_not_a_run_parameter():
    from ftloop.components.config import RUNTIME_FIELDS, config_key_kind

    assert config_key_kind("augment.mine_splits") == "compile-time" and "augment.mine_splits" not in RUNTIME_FIELDS


# ------------------------------------------------------------------ mining


def test_mine_errors_takes_only_the_given_splits_and_never_test():
    preds = {
        "train": [{"id": "t", "label": "x", "prediction": "y"}],
        "dev": [{"id": "d", "label": "x", "prediction": "y"}],
    }
    assert [r["id"] for r in mine_errors(preds, ("train",))] == ["t"]
    assert [r["id"] for r in mine_errors(preds, ("dev",))] == ["d"]
    assert [r["id"] for r in mine_errors(preds, ("dev", "train"))] == ["t", "d"]  # train first, whatever the order given
    assert [r["id"] for r in mine_errors(preds)] == ["t", "d"]
    with pytest.raises(ValueError, match="^error mining must never see the test split$"):
        mine_errors({"train": []}, ("train", "test"))


class RecordingRephraser(CannedRephraser):
    def rephrase(self, parents, n, hint=None, round=None):
        self.parents = [p.id for p in parents]
        return super().rephrase(parents, n, hint, round)


def _round(tmp_path, monkeypatch, config: RunConfig, wrong=("e1", "e2", "e3")):
    """e1, e2 are train rows, e3 the dev row; all three misclassified in the predictions."""
    splits = write_round_inputs(tmp_path, wrong=wrong)
    stub = RecordingRephraser(REPHRASINGS)
    monkeypatch.setattr(aug, "make_generator", lambda *a, **k: stub)
    meta = aug.run(config, tmp_path / "splits", tmp_path / "eval", tmp_path / "out", progress=lambda _: None)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    return splits, meta, report, stub


def test_train_only_rephrases_train_errors_and_no_dev_error_reaches_train(tmp_path, monkeypatch):
    splits, meta, report, stub = _round(tmp_path, monkeypatch, cfg(label_filter="none", mine_splits=["train"]))
    dev_rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions" / "dev.jsonl").read_text().splitlines()]
    assert [(r["id"], r["label"] != r["prediction"]) for r in dev_rows] == [("e3", True)]  # a dev error was there to mine
    info = report["augmentation"]
    assert info["mine_splits"] == ["train"]
    assert info["errors_mined"] == {"train": 2, "dev": 0}
    assert info["dev_groups_in_train"] == 0
    assert stub.parents == ["e1", "e2"] and meta["errors_mined"] == 2
    added = read_splits(tmp_path / "out")[0]["train"][len(splits["train"]) :]
    assert [e.text for e in added] == REPHRASINGS["e1"] + REPHRASINGS["e2"]
    dev_groups = {e.group for e in splits["dev"]}
    assert not {e.group for e in added} & dev_groups and {e.parent_id for e in added} == {"e1", "e2"}
    assert not set(REPHRASINGS["e3"]) & {e.text for e in read_splits(tmp_path / "out")[0]["train"]}


def test_the_default_rephrases_train_and_dev_errors(tmp_path, monkeypatch):
    splits, meta, report, stub = _round(tmp_path, monkeypatch, cfg(label_filter="none"))
    info = report["augmentation"]
    assert info["mine_splits"] == ["train", "dev"] and info["errors_mined"] == {"train": 2, "dev": 1}
    assert info["dev_groups_in_train"] == 1 and stub.parents == ["e1", "e2", "e3"] and meta["errors_mined"] == 3
    added = read_splits(tmp_path / "out")[0]["train"][len(splits["train"]) :]
    assert [e.text for e in added] == REPHRASINGS["e1"] + REPHRASINGS["e2"] + REPHRASINGS["e3"]


def test_dev_only_rephrases_dev_errors(tmp_path, monkeypatch):
    _, _, report, stub = _round(tmp_path, monkeypatch, cfg(label_filter="none", mine_splits=["dev"]))
    assert report["augmentation"]["errors_mined"] == {"train": 0, "dev": 1} and stub.parents == ["e3"]


def test_with_train_only_dev_errors_alone_stop_the_loop_with_a_reason_naming_train(tmp_path, monkeypatch):
    monkeypatch.setattr(aug, "make_generator", lambda *a, **k: pytest.fail("nothing to rephrase"))
    write_round_inputs(tmp_path, wrong=("e3",))  # only the dev row is wrong
    meta = aug.run(cfg(mine_splits=["train"]), tmp_path / "splits", tmp_path / "eval", tmp_path / "out", progress=lambda _: None)
    reason = "no misclassified train rows left"
    assert (meta["decision"], meta["stop_reason"], meta["errors_mined"]) == (STOP_KEEP_CURRENT, reason, 0)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["loop_stopped"] == {"round": 1, "decision": STOP_KEEP_CURRENT, "reason": reason}


def test_the_stage_reads_the_setting_from_its_task_slice(tmp_path, monkeypatch):
    """What the compiled task gets: the slice must carry mine_splits (STAGE_SECTIONS), or the stage fails to read it."""
    full = cfg(label_filter="none", mine_splits=["train"])
    piece = full.slice("augment_from_errors")
    assert json.loads(piece)["config"]["augment"]["mine_splits"] == ["train"]
    sliced = RunConfig.from_slice(piece, full.runtime_values())
    assert sliced.augment.mine_splits == ["train"]
    _, _, report, stub = _round(tmp_path, monkeypatch, sliced)
    assert report["augmentation"]["errors_mined"] == {"train": 2, "dev": 0} and stub.parents == ["e1", "e2"]


# ------------------------------------------------------------------ report


def _summary(mine_splits: list[str] | None, round_splits: list[str] | None) -> dict:
    augment = {"rounds": 1, **({"mine_splits": mine_splits} if mine_splits else {})}
    r = {"round": 1, "errors_mined": {"train": 2, "dev": 0}, "generated": 4, "added": 4, "removed": {}, "confusions": {"a->b": 2}}
    if round_splits:
        r["mine_splits"] = round_splits
    return {"config": {"augment": augment}, "data": {"augmented": {"augmentation_rounds": [r]}}}


def test_the_report_says_which_splits_were_mined_and_whether_dev_is_optimistic():
    train_only = augmentation_lines(_summary(["train"], ["train"]))
    assert "(train only; test is never mined)" in train_only[0]
    assert "dev errors were not mined (augment.mine_splits: [train])" in train_only[-1]
    assert not [line for line in train_only if "dev score is optimistic" in line]
    both = augmentation_lines(_summary(["train", "dev"], ["train", "dev"]))
    assert "(train/dev only; test is never mined)" in both[0] and "dev score is optimistic" in both[-1]
    # a summary from before the setting: train and dev were always mined
    older = augmentation_lines(_summary(None, None))
    assert "(train/dev only; test is never mined)" in older[0] and "dev score is optimistic" in older[-1]
    # a round's own record wins over the config
    assert "(train only;" in augmentation_lines(_summary(None, ["train"]))[0]
