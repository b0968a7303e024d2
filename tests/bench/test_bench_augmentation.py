"""bench/augmentation.py's statistics and report, on synthetic per-seed results (the pipeline runs are the bench's own)."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import augmentation  # noqa: E402

LABELS = ["billing", "returns", "shipping"]


def _rows(n: int, accuracy: float, rng: random.Random, prefix: str = "r") -> list[dict]:
    rows = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        wrong = [x for x in LABELS if x != label]
        rows.append({"id": f"{prefix}{i}", "label": label, "prediction": label if rng.random() < accuracy else rng.choice(wrong)})
    return rows


def _run(seed: int, base_acc: float, aug_acc: float, n: int = 60) -> dict:
    rng = random.Random(seed)
    rows = {
        model: {split: _rows(n, acc, rng) for split in ("dev", "test")}
        for model, acc in (("base", base_acc), ("augmented", aug_acc), ("tfidf", 0.5))
    }

    def metrics(model):
        return {
            split: {
                "macro_f1": f1_score(
                    [r["label"] for r in rows[model][split]],
                    [r["prediction"] for r in rows[model][split]],
                    labels=LABELS,
                    average="macro",
                    zero_division=0,
                ),
                "ci95": [0.1, 0.9],
                "n": n,
            }
            for split in ("dev", "test")
        }

    return {
        "seed": seed,
        "seconds": 1.0,
        "labels": LABELS,
        "metrics": {m: metrics(m) for m in ("base", "augmented", "tfidf")},
        "mcnemar_test_p": 0.5,
        "rounds": [{"round": 1, "errors_mined": 5, "generated": 15, "added": 12, "removed": 0}],
        "loop_stopped": {"round": 2, "decision": "stop_keep_current"},
        "train_rows": {"base": 100, "augmented": 112},
        "rows": rows,
    }


def test_macro_f1_equals_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(50):
        t, p = rng.integers(0, 4, 40), rng.integers(0, 4, 40)
        assert augmentation.macro_f1(t, p, 4) == pytest.approx(f1_score(t, p, labels=range(4), average="macro", zero_division=0), abs=1e-12)


def test_paired_delta_is_the_mean_over_seeds_and_its_interval_covers_it():
    runs = [_run(0, 0.5, 0.8), _run(1, 0.6, 0.7)]
    got = augmentation.paired_delta_ci(runs, "test", LABELS, resamples=300)
    expected = np.mean([run["metrics"]["augmented"]["test"]["macro_f1"] - run["metrics"]["base"]["test"]["macro_f1"] for run in runs])
    assert got["mean_delta"] == pytest.approx(expected, abs=1e-12)
    lo, hi = got["ci95"]
    assert lo < got["mean_delta"] < hi and lo > 0  # a real improvement on 60 rows per seed


def test_paired_delta_of_identical_models_is_exactly_zero():
    run = _run(0, 0.6, 0.6)
    run["rows"]["augmented"] = run["rows"]["base"]
    got = augmentation.paired_delta_ci([run], "dev", LABELS, resamples=100)
    assert got == {"mean_delta": 0.0, "ci95": [0.0, 0.0]}


def test_paired_delta_pairs_rows_by_id_not_by_position():
    run = _run(0, 0.5, 0.5)
    run["rows"]["augmented"]["test"] = list(reversed(run["rows"]["base"]["test"]))  # same predictions, other order
    assert augmentation.paired_delta_ci([run], "test", LABELS, resamples=50)["mean_delta"] == 0.0


def test_pooled_interval_uses_the_rows_of_every_seed():
    runs = [_run(0, 0.5, 0.8), _run(1, 0.6, 0.7)]
    pooled = augmentation.pooled_ci(runs, "base", "test", LABELS)
    rows = runs[0]["rows"]["base"]["test"] + runs[1]["rows"]["base"]["test"]
    assert pooled["n"] == len(rows) == 120
    assert pooled["macro_f1"] == pytest.approx(
        f1_score([r["label"] for r in rows], [r["prediction"] for r in rows], labels=LABELS, average="macro", zero_division=0), abs=1e-12
    )
    assert pooled["ci95"][0] <= pooled["macro_f1"] <= pooled["ci95"][1]


def test_report_has_a_row_per_seed_and_split_and_the_pooled_table():
    runs = [_run(0, 0.5, 0.8), _run(1, 0.6, 0.7)]
    args = argparse.Namespace(
        config="configs/demo.yaml", rounds=2, label_filter=None, mine_splits=None, early_stopping="none", seeds=[0, 1]
    )
    text = augmentation.report(runs, args)
    lines = text.splitlines()
    per_seed = [line for line in lines if line.startswith(("| 0 |", "| 1 |"))]
    assert len(per_seed) == 4  # 2 seeds x dev/test
    delta = runs[0]["metrics"]["augmented"]["test"]["macro_f1"] - runs[0]["metrics"]["base"]["test"]["macro_f1"]
    assert f"| {delta:+.3f} |" in next(line for line in per_seed if line.startswith("| 0 | test |"))
    assert "100 -> 112" in per_seed[0] and "stopped in round 2: stop_keep_current" in per_seed[0]
    assert "fine-tune early stopping none" in lines[0]
    pooled = [line for line in lines if line.startswith(("| dev |", "| test |"))]
    assert len(pooled) == 2


def _write_round(seed_dir: Path, run: str, task: str, rows: dict[str, list[dict]]) -> None:
    predictions = seed_dir / "kfp" / run / task / "results" / "predictions"
    predictions.mkdir(parents=True)
    for split, split_rows in rows.items():
        (predictions / f"{split}.jsonl").write_text("".join(f"{augmentation.json.dumps(r)}\n" for r in split_rows), encoding="utf-8")


def test_round_candidates_reports_a_dropped_rounds_model_from_the_newest_run(tmp_path):
    """The loop reports only the kept model; the bench must still show what each round's model scored."""
    base = {"dev": _rows(30, 0.6, random.Random(1)), "test": _rows(30, 0.6, random.Random(2))}
    flipped = [dict(r, prediction=r["label"]) for r in base["test"]]  # the round fixes every base error on test
    fixed = sum(r["prediction"] != r["label"] for r in base["test"])
    _write_round(tmp_path, "run-old", "evaluate-2", {"dev": base["dev"], "test": base["test"]})
    newest = tmp_path / "kfp" / "run-new"
    _write_round(tmp_path, "run-new", "evaluate-2", {"dev": base["dev"], "test": flipped})
    import os

    os.utime(tmp_path / "kfp" / "run-old", (1, 1))  # older than run-new
    assert newest.exists()

    (candidate,) = augmentation.round_candidates(tmp_path, base, LABELS)

    assert candidate["round"] == 1
    assert candidate["test_macro_f1"] == 1.0
    assert candidate["dev_macro_f1"] == pytest.approx(augmentation.macro_f1(*_arrays(base["dev"]), len(LABELS)))
    assert candidate["mcnemar_test_vs_base"]["fixed"] == fixed > 0
    assert candidate["mcnemar_test_vs_base"]["broken"] == 0


def _arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    index = {label: i for i, label in enumerate(LABELS)}
    return np.array([index[r["label"]] for r in rows]), np.array([index[r["prediction"]] for r in rows])


def test_report_lists_each_rounds_model(tmp_path):
    run = _run(0, 0.6, 0.6)
    run["candidates"] = [
        {"round": 1, "dev_macro_f1": 0.5, "test_macro_f1": 0.75, "mcnemar_test_vs_base": {"fixed": 7, "broken": 2, "p_value": 0.18}}
    ]
    args = argparse.Namespace(config="c.yaml", rounds=1, label_filter=None, mine_splits=None, early_stopping=None, seeds=[0])
    text = augmentation.report([run], args)
    assert "| 0 | 1 |" in text and "-> 0.750" in text and "7 / 2, 0.180" in text


@pytest.mark.parametrize("rounds", ["0", "6"])
def test_rounds_outside_1_to_5_are_refused_before_anything_runs(tmp_path, capsys, rounds):
    with pytest.raises(SystemExit) as exit_:
        augmentation.main(["--rounds", rounds, "--seeds", "0", "--workdir", str(tmp_path / "w")])
    assert exit_.value.code == 2
    assert f"--rounds {rounds}: this bench compares the base model with the augmented one; use 1-5" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flag, expected", [(None, ["train", "dev"]), (["train"], ["train"]), (["train", "dev"], ["train", "dev"])])
def test_mine_splits_reaches_the_run_config_like_the_label_filter(tmp_path, monkeypatch, flag, expected):
    import ftloop.pipelines.local

    seen = {}

    def fake_run_local(config, out, progress=None):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr(ftloop.pipelines.local, "run_local", fake_run_local)
    config = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    with pytest.raises(_Stop):
        augmentation.run_seed(config, 3, 2, "none", tmp_path, False, mine_splits=flag)
    augment = seen["config"].augment
    assert augment.mine_splits == expected and augment.label_filter == "none" and augment.rounds == 2


def test_the_mine_splits_flag_is_passed_on_and_recorded_in_the_json_and_the_report_header(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_seed(*args):
        calls.append(args)
        return dict(_run(0, 0.5, 0.7), mine_splits=args[-1])

    monkeypatch.setattr(augmentation, "run_seed", fake_run_seed)
    out = tmp_path / "aug.json"
    assert augmentation.main(["--seeds", "0", "--mine-splits", "train", "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    assert calls[0][-1] == ["train"]
    result = json.loads(out.read_text())
    assert result["args"]["mine_splits"] == ["train"] and result["runs"][0]["mine_splits"] == ["train"]
    assert "mined splits train," in result["report"].splitlines()[0]
    capsys.readouterr()
    assert augmentation.main(["--seeds", "0", "--mine-splits", "train,dev", "--workdir", str(tmp_path / "w")]) == 0
    assert calls[1][-1] == ["train", "dev"] and "mined splits train,dev," in capsys.readouterr().out


@pytest.mark.parametrize(
    "value, message",
    [("train,test", "test is never mined"), ("train,train", "lists a split twice"), ("eval", "Input should be 'train' or 'dev'")],
)
def test_a_bad_mine_splits_flag_is_refused_before_anything_runs(tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as exit_:
        augmentation.main(["--mine-splits", value, "--seeds", "0", "--workdir", str(tmp_path / "w")])
    assert exit_.value.code == 2
    assert f"argument --mine-splits: '{value}': {message}" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
