"""Comparison bundle and reports built from prediction files, and `ftloop report`."""

import io
import itertools
import json
import re
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

from ftloop.components.artifacts import write_predictions
from ftloop.components.config import RunConfig
from ftloop.components.records import write_json
from ftloop.components.stages.compare_models import run as run_compare

LABELS = ["payments", "returns", "shipping"]


def run_config(seed: int = 0) -> RunConfig:
    return RunConfig.model_validate({"name": "t", "seed": seed, "data": {"questions": "q.jsonl"}})


def fake_eval(path, accuracy, seed):
    rng = np.random.default_rng(seed)
    splits, probs = {}, {}
    for split, n in (("train", 30), ("dev", 12), ("test", 12)):
        rows = [{"id": f"{split}{i}", "text": f"question {i}", "label": LABELS[i % 3], "group": f"g{i}"} for i in range(n)]
        splits[split] = rows
        probs[split] = []
        for r in rows:
            hit = rng.random() < accuracy
            winner = r["label"] if hit else LABELS[(LABELS.index(r["label"]) + 1) % 3]
            probs[split].append({l: (0.8 if l == winner else 0.1) for l in LABELS})
    write_predictions(splits, probs, LABELS, path, progress=lambda m: None)


@pytest.fixture
def run_dir(tmp_path):
    evals = {}
    for name, acc, seed in (("base", 0.6, 1), ("augmented", 0.8, 2), ("tfidf", 0.5, 3), ("zero-shot", 0.3, 4)):
        fake_eval(tmp_path / name, acc, seed)
        evals[name] = tmp_path / name
    for name in ("base", "augmented"):
        write_json(
            tmp_path / f"{name}-splits" / "report.json",
            {"rows": {"train": 30, "dev": 12, "test": 12}, "groups": {}, "group_overlap": {"train-test": 0}},
        )
    out = tmp_path / "bundle"
    summary = run_compare(
        run_config(), evals, {n: tmp_path / f"{n}-splits" for n in ("base", "augmented")}, out, tmp_path / "r.md", tmp_path / "r.html"
    )
    return out, summary


CHART_FILES = ["charts/per_class_f1_test.png", *(f"charts/confusion_{m}_test.png" for m in ("base", "augmented", "tfidf", "zero-shot"))]


def inline_svgs(page: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", page, re.S)


def chart_pngs(out) -> list[np.ndarray]:
    return [mpimg.imread(io.BytesIO((out / f).read_bytes()), format="png") for f in CHART_FILES]


def test_html_report_inlines_svg_charts_and_the_bundle_has_them_as_png(run_dir):
    out, summary = run_dir
    page = (out / "report.html").read_text()
    assert "data:" not in page and "<img" not in page  # data-URI images render blank in some KFP UIs (kubeflow/pipelines#10527)
    svgs = inline_svgs(page)
    assert len(svgs) == 5  # per-class chart + one confusion matrix per model
    for svg, label in itertools.product(svgs[1:], LABELS):
        assert f">{label}</text>" in svg  # svg.fonttype none: labels are text the browser draws
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # several inline SVGs on one page: no shared ids
    refs = set(re.findall(r"url\(#([^)]+)\)", page)) | set(re.findall(r'href="#([^"]+)"', page))
    assert refs and refs <= set(ids)
    assert sorted(str(p.relative_to(out)) for p in (out / "charts").iterdir()) == sorted(CHART_FILES)
    for image in chart_pngs(out):
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05  # not a blank canvas
    assert "base-&gt;augmented" in page and "McNemar p" in page
    flips = summary["significance"]["base->augmented"]["test_flips"]
    for flip in flips:
        assert f"<td>{flip['id']}</td>" in page


def test_summary_metrics_and_markdown(run_dir):
    out, summary = run_dir
    assert list(json.loads((out / "summary.json").read_text())["models"]) == sorted(summary["models"])
    md = (out / "report.md").read_text()
    assert "| test | macro\\_f1 |" in md  # "_" escaped: metric names are literal text
    assert "McNemar" in md
    assert summary["deltas"]["test"]["accuracy"] == pytest.approx(
        summary["models"]["augmented"]["test"]["accuracy"] - summary["models"]["base"]["test"]["accuracy"]
    )


def test_cli_report_rerenders_from_summary(run_dir):
    out, _ = run_dir
    before = (out / "report.html").read_text()
    (out / "report.html").unlink()
    (out / "report.md").unlink()
    for chart in CHART_FILES:
        (out / chart).unlink()
    result = subprocess.run([sys.executable, "-m", "ftloop.pipelines.cli", "report", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "report.html").read_text() == before  # charts included: the page is reproducible
    assert len(chart_pngs(out)) == 5
    assert "| test | accuracy |" in (out / "report.md").read_text()


def test_cli_report_without_summary_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ftloop.pipelines.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "summary.json: not found" in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------ fixed rows, known outcomes


def split_rows(split, n):
    return [{"id": f"{split}{i}", "text": f"{split} question {i}", "label": LABELS[i % 3], "group": f"g{i}"} for i in range(n)]


def write_eval(path, predictions, generate=False):
    """An eval dir whose predictions are given per split (None: an unparseable generate-mode output)."""
    splits = {split: split_rows(split, len(preds)) for split, preds in predictions.items()}
    probs = {split: [{l: (0.8 if l == p else 0.1) if p else 1 / 3 for l in LABELS} for p in preds] for split, preds in predictions.items()}
    generated = {split: [{"raw": str(p), "prediction": p} for p in preds] for split, preds in predictions.items()}
    write_predictions(splits, probs, LABELS, path, progress=lambda m: None, generated=generated if generate else None)
    return path


def gold(split, n):
    return [r["label"] for r in split_rows(split, n)]


def wrong(label):
    return LABELS[(LABELS.index(label) + 1) % 3]


def compare(tmp_path, evals, seed=0):
    for name in ("base", "augmented"):
        write_json(tmp_path / f"{name}-splits" / "report.json", {"rows": {}, "groups": {}, "group_overlap": {}})
    out = tmp_path / "bundle"
    summary = run_compare(
        run_config(seed), evals, {n: tmp_path / f"{n}-splits" for n in ("base", "augmented")}, out, tmp_path / "r.md", tmp_path / "r.html"
    )
    return out, summary


# Test split, 12 rows (gold = LABELS[i % 3]): base wrong and augmented right on FIXED,
# the reverse on BROKEN, both right on 0/3/5, both wrong (differently) on 6/9/11.
FIXED = ["test1", "test4", "test7", "test8", "test10"]
BROKEN = ["test2"]


def known_flips():
    truth = gold("test", 12)
    base, augmented = list(truth), list(truth)
    for i in range(12):
        row_id = f"test{i}"
        if row_id in FIXED:
            base[i] = wrong(truth[i])
        elif row_id in BROKEN:
            augmented[i] = wrong(truth[i])
        elif i in (6, 9, 11):
            base[i], augmented[i] = wrong(truth[i]), wrong(wrong(truth[i]))
    return base, augmented


def test_flips_direction_counts_and_p_value_on_known_rows(tmp_path):
    from statsmodels.stats.contingency_tables import mcnemar

    base, augmented = known_flips()
    common = {"train": gold("train", 6), "dev": gold("dev", 6)}
    evals = {
        "base": write_eval(tmp_path / "base", {**common, "test": base}),
        "augmented": write_eval(tmp_path / "augmented", {**common, "test": augmented}),
    }
    out, summary = compare(tmp_path, evals)
    pair = summary["significance"]["base->augmented"]
    flips = pair["test_flips"]
    assert [f["id"] for f in flips if f["change"] == "fixed"] == FIXED
    assert [f["id"] for f in flips if f["change"] == "broken"] == BROKEN
    for f in flips:  # the "before" column is base's prediction, "after" augmented's
        i = int(f["id"][4:])
        assert (f["before"], f["after"], f["label"]) == (base[i], augmented[i], gold("test", 12)[i])
    # 2x2 table: rows base right/wrong, columns augmented right/wrong
    table = [[3, len(BROKEN)], [len(FIXED), 3]]
    assert pair["test"]["fixed"] == 5 and pair["test"]["broken"] == 1 and pair["test"]["discordant"] == 6
    assert pair["test"]["p_value"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-12)
    assert pair["test"]["p_value"] == pytest.approx(2 * (1 + 6) / 2**6)
    assert pair["dev"] == {"fixed": 0, "broken": 0, "discordant": 0, "p_value": 1.0}
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "| fixed | test1 | test question 1 | returns | shipping | returns |" in md
    assert "| broken | test2 | test question 2 | shipping | shipping | payments |" in md
    assert "<tr><td>fixed</td><td>test1</td>" in page and "<tr><td>broken</td><td>test2</td>" in page
    assert "| base->augmented | test | +0.3333 |" in md  # accuracy 4/12 -> 8/12


def test_compare_pair_is_directional(tmp_path):
    from ftloop.components.evaluation.metrics import compute_metrics
    from ftloop.components.stages.compare_models import compare_pair

    base, augmented = known_flips()
    rows = {}
    for name, preds in (("base", base), ("augmented", augmented)):
        test = [{**r, "prediction": p} for r, p in zip(split_rows("test", 12), preds)]
        rows[name] = {split: test for split in ("train", "dev", "test")}
    metrics = {
        name: {
            split: compute_metrics([r["label"] for r in rows[name][split]], [r["prediction"] for r in rows[name][split]], LABELS)
            for split in ("train", "dev", "test")
        }
        for name in rows
    }
    forward = compare_pair(rows["base"], rows["augmented"], metrics["base"], metrics["augmented"])
    backward = compare_pair(rows["augmented"], rows["base"], metrics["augmented"], metrics["base"])
    assert (forward["test"]["fixed"], forward["test"]["broken"]) == (5, 1)
    assert (backward["test"]["fixed"], backward["test"]["broken"]) == (1, 5)
    assert {f["id"]: f["change"] for f in backward["test_flips"]} == {**{i: "broken" for i in FIXED}, **{i: "fixed" for i in BROKEN}}
    assert forward["deltas"]["test"]["accuracy"] == pytest.approx(4 / 12)
    assert backward["deltas"]["test"]["macro_f1"] == -forward["deltas"]["test"]["macro_f1"] != 0


def test_generate_mode_invalid_predictions_count_as_wrong(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    from ftloop.components.evaluation.metrics import INVALID

    truth = gold("test", 12)
    # Invalid outputs (None) on rows of every gold label, including LABELS[0] (rows 0 and 3).
    base = [None, truth[1], None, None, wrong(truth[4]), truth[5], truth[6], None, truth[8], truth[9], truth[10], None]
    augmented = [truth[0], None, truth[2], truth[3], truth[4], truth[5], truth[6], truth[7], None, truth[9], truth[10], None]
    common = {"train": gold("train", 6), "dev": [None, *gold("dev", 6)[1:]]}
    evals = {
        "base": write_eval(tmp_path / "base", {**common, "test": base}, generate=True),
        "augmented": write_eval(tmp_path / "augmented", {**common, "test": augmented}, generate=True),
        "tfidf": write_eval(tmp_path / "tfidf", {**common, "test": truth}),
    }
    out, summary = compare(tmp_path, evals, seed=5)
    models = summary["models"]
    assert models["base"]["test"]["accuracy"] == 6 / 12 and models["base"]["test"]["invalid_rate"] == 5 / 12
    # The bootstrap scores an invalid prediction exactly as the reported metrics do: wrong, a class of its own.
    for name, preds in (("base", base), ("augmented", augmented)):
        t, p = np.array(truth), np.array([INVALID if x is None else x for x in preds])
        draws = np.random.default_rng(5).integers(0, 12, size=(1000, 12))
        acc = [accuracy_score(t[d], p[d]) for d in draws]
        f1 = [f1_score(t[d], p[d], labels=LABELS, average="macro", zero_division=0) for d in draws]
        ci = models[name]["test"]["ci95"]
        assert ci["accuracy"] == pytest.approx([np.quantile(acc, 0.025), np.quantile(acc, 0.975)], abs=1e-12)
        assert ci["macro_f1"] == pytest.approx([np.quantile(f1, 0.025), np.quantile(f1, 0.975)], abs=1e-12)
    pair = summary["significance"]["base->augmented"]
    assert {f["id"]: (f["before"], f["after"], f["change"]) for f in pair["test_flips"]} == {
        "test0": (None, "payments", "fixed"),
        "test1": ("returns", None, "broken"),
        "test2": (None, "shipping", "fixed"),
        "test3": (None, "payments", "fixed"),
        "test4": ("shipping", "returns", "fixed"),
        "test7": (None, "returns", "fixed"),
        "test8": ("shipping", None, "broken"),
    }  # test11 is invalid for both: wrong both times, no flip
    # tfidf is right everywhere; base's 5 invalid rows and 1 wrong one are all "broken" against it.
    assert summary["significance"]["tfidf->base"]["test"] == {"fixed": 0, "broken": 6, "discordant": 6, "p_value": 2 / 2**6}
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "| fixed | test0 | test question 0 | payments | (invalid) | payments |" in md
    assert "| broken | test1 | test question 1 | returns | returns | (invalid) |" in md
    assert "<td>(invalid)</td><td>payments</td></tr>" in page and "None" not in md


def test_every_pair_of_models_is_compared(run_dir):
    out, summary = run_dir
    sig = summary["significance"]
    assert list(sig) == [
        "base->augmented",
        "tfidf->augmented",
        "zero-shot->augmented",
        "tfidf->base",
        "zero-shot->base",
        "zero-shot->tfidf",
    ]
    models = summary["models"]
    for key, pair in sig.items():
        before, after = key.split("->")
        assert (pair["before"], pair["after"]) == (before, after)
        for split in ("train", "dev", "test"):
            for metric in ("accuracy", "macro_f1", "weighted_f1"):
                assert pair["deltas"][split][metric] == models[after][split][metric] - models[before][split][metric]
            rows = {
                n: {r["id"]: r for r in map(json.loads, (out / models[n][split]["predictions"]).read_text().splitlines())}
                for n in (before, after)
            }
            fixed = sum(1 for i, r in rows[before].items() if not r["correct"] and rows[after][i]["correct"])
            broken = sum(1 for i, r in rows[before].items() if r["correct"] and not rows[after][i]["correct"])
            assert (pair[split]["fixed"], pair[split]["broken"]) == (fixed, broken)
        assert len(pair["test_flips"]) == pair["test"]["fixed"] + pair["test"]["broken"]
    assert summary["deltas"] == sig["base->augmented"]["deltas"]  # the top-level key older readers use
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    md_order = [line.split(" | ")[0][2:] for line in md.splitlines() if re.match(r"\| \S+->\S+ \| test \|", line)]
    assert md_order == list(sig)
    for key in sig:
        for split in ("dev", "test"):
            assert f"<tr><td>{key.replace('>', '&gt;')}</td><td>{split}</td>" in page


def test_markdown_lists_flips_up_to_a_cap_and_small_p_values_are_readable(tmp_path):
    truth = gold("test", 60)
    common = {"train": gold("train", 3), "dev": gold("dev", 3)}
    evals = {
        "base": write_eval(tmp_path / "base", {**common, "test": [wrong(t) for t in truth]}),
        "augmented": write_eval(tmp_path / "augmented", {**common, "test": truth}),
    }
    out, summary = compare(tmp_path, evals)
    p = summary["significance"]["base->augmented"]["test"]["p_value"]
    assert p == 2 / 2**60
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    flip_rows = [line for line in md.splitlines() if line.startswith("| fixed |")]
    assert len(flip_rows) == 50 and flip_rows[0].startswith("| fixed | test0 |") and flip_rows[-1].startswith("| fixed | test49 |")
    assert "... and 10 more" in md
    assert "| base->augmented | test | +1.0000 | +1.0000 | 60 | 0 | 1.73e-18 |" in md
    assert "McNemar p = 1.73e-18" in page and "<td>1.73e-18</td>" in page
    assert not re.search(r"\| 0\.0000 \|$", md, re.M) and "p = 0.0000" not in md + page  # no p-value column reads 0
    assert all(f"<td>test{i}</td>" in page for i in range(60))  # the HTML lists them all (cap 200)


@pytest.mark.parametrize(
    "p, shown",
    [
        (1.0, "1.0000"),
        (0.21875, "0.2188"),
        (0.001, "0.0010"),
        (0.000999, "9.99e-04"),
        (3.0517578125e-05, "3.05e-05"),
        (1.734723475976807e-18, "1.73e-18"),
        (0.0, "<1e-300"),
    ],
)
def test_format_p(p, shown):
    from ftloop.components.reports.tables import format_p

    assert format_p(p) == shown


# ------------------------------------------------------------------ the two models must share their rows


def _mutate_augmented_test(path, change):
    file = path / "predictions" / "test.jsonl"
    rows = [json.loads(l) for l in file.read_text().splitlines()]
    file.write_text("".join(json.dumps(r) + "\n" for r in change(rows)))
    return file


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda rows: rows[:-1], "id 'test5' is only in the first file"),
        (lambda rows: rows + [{**rows[0], "id": "extra"}], "id 'extra' is only in the second file"),
        (
            lambda rows: [{**r, "label": "returns"} if r["id"] == "test3" else r for r in rows],
            "id 'test3': field 'label' differs ('payments' vs 'returns')",
        ),
        (
            lambda rows: [{**r, "text": "other"} if r["id"] == "test4" else r for r in rows],
            "id 'test4': field 'text' differs ('test question 4' vs 'other')",
        ),
    ],
)
def test_models_evaluated_on_different_rows_is_a_clear_error(tmp_path, change, expected):
    from ftloop.components.errors import FtloopError

    preds = {split: gold(split, 6) for split in ("train", "dev", "test")}
    evals = {"base": write_eval(tmp_path / "base", preds), "augmented": write_eval(tmp_path / "augmented", preds)}
    changed = _mutate_augmented_test(evals["augmented"], change)
    with pytest.raises(FtloopError) as err:
        compare(tmp_path, evals)
    reference = tmp_path / "base" / "predictions" / "test.jsonl"
    assert str(err.value) == f"{reference} and {changed}: {expected}; the models were not evaluated on the same rows"
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "r.md").exists() and not (tmp_path / "r.html").exists()


def test_duplicate_prediction_ids_are_a_clear_error(tmp_path):
    from ftloop.components.errors import FtloopError

    preds = {split: gold(split, 6) for split in ("train", "dev", "test")}
    evals = {"base": write_eval(tmp_path / "base", preds), "augmented": write_eval(tmp_path / "augmented", preds)}
    changed = _mutate_augmented_test(evals["augmented"], lambda rows: [*rows[:3], {**rows[3], "id": "test1"}, *rows[4:]])
    with pytest.raises(FtloopError) as err:
        compare(tmp_path, evals)
    assert str(err.value) == (f"{changed}:4: field 'id': duplicate id 'test1' (first on line 2); every row must be evaluated exactly once")
    assert not (tmp_path / "bundle").exists()


# ------------------------------------------------------------------ ftloop report on a damaged summary.json


@pytest.fixture(scope="module")
def good_summary(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("summary")
    base, augmented = known_flips()
    common = {"train": gold("train", 6), "dev": gold("dev", 6)}
    evals = {
        "base": write_eval(tmp / "base", {**common, "test": base}),
        "augmented": write_eval(tmp / "augmented", {**common, "test": augmented}),
    }
    out, _ = compare(tmp, evals)
    summary = json.loads((out / "summary.json").read_text())
    summary["data"]["augmented"] = {
        "augmentation_rounds": [{"round": 1, "errors_mined": 3, "generated": 6, "added": 4, "removed": {}, "confusions": {"a->b": 2}}],
        "loop_stopped": {"round": 2, "reason": "no rows left"},
    }
    return summary


def _report(tmp_path, capsys, summary):
    from ftloop.pipelines.cli import main

    (tmp_path / "summary.json").write_text(json.dumps(summary))
    code = main(["report", str(tmp_path)])
    return code, capsys.readouterr().err


def test_report_renders_a_good_summary_and_an_older_one(tmp_path, capsys, good_summary):
    assert _report(tmp_path, capsys, good_summary) == (0, "")
    md = (tmp_path / "report.md").read_text()
    assert "| base->augmented | test | +0.3333 |" in md and "loop stopped in round 2: no rows left" in md
    older = json.loads(json.dumps(good_summary))  # version 1: pairs without their own deltas or names
    for pair in older["significance"].values():
        del pair["deltas"], pair["before"], pair["after"]
    (tmp_path / "report.md").unlink()
    assert _report(tmp_path, capsys, older) == (0, "")
    assert (tmp_path / "report.md").read_text() == md  # deltas recomputed from the models' metrics


def _set(summary, path, value):
    """A copy of ``summary`` with the value at a dotted path replaced (value ... deletes it)."""
    out = json.loads(json.dumps(summary))
    *parents, last = path
    node = out
    for key in parents:
        node = node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


MALFORMED = [
    (("models", "base"), {}, "field 'models.base.train': missing"),
    (("models", "base"), {"train": {}, "dev": {}, "test": {}}, "field 'models.base.train.accuracy': missing"),
    (("models", "augmented", "test", "macro_f1"), "0.5", "field 'models.augmented.test.macro_f1': expected a number, got a string"),
    (("models",), [], "field 'models': expected an object, got a list"),
    (("models",), {}, "field 'models': empty"),
    (
        ("models", "base", "test", "confusion_matrix"),
        [[1, 2], [3, 4]],
        "field 'models.base.test.confusion_matrix': expected 3 rows of 3 numbers, one per label",
    ),
    (("models", "base", "dev", "per_class", "returns"), 0.5, "field 'models.base.dev.per_class.returns': expected an object, got a number"),
    (("deltas", "test"), ..., "field 'deltas.test': missing"),
    (("significance", "base->augmented", "test"), ..., "field 'significance.base->augmented.test': missing"),
    (
        ("significance", "base->augmented", "dev", "p_value"),
        None,
        "field 'significance.base->augmented.dev.p_value': expected a number, got null",
    ),
    (
        ("significance", "base->augmented", "test_flips", 0, "after"),
        ...,
        "field 'significance.base->augmented.test_flips[0].after': missing",
    ),
    (("labels", 1), 7, "field 'labels[1]': expected a string, got a number"),
    (
        ("data", "augmented", "augmentation_rounds", 0, "confusions"),
        ...,
        "field 'data.augmented.augmentation_rounds[0].confusions': missing",
    ),
    (("data", "base"), {"rows": {}}, "field 'data.base.groups': missing"),
    (("models", "base", "test", "ci95", "accuracy"), [0.1], "field 'models.base.test.ci95.accuracy': expected [low, high], got a list"),
    (("models", "augmented", "test", "ece"), "low", "field 'models.augmented.test.ece': expected a number, got a string"),
]


@pytest.mark.parametrize("path, value, problem", MALFORMED, ids=[m[2].split("'")[1] for m in MALFORMED])
def test_report_on_a_malformed_summary_is_one_line_naming_the_field(tmp_path, capsys, good_summary, path, value, problem):
    code, err = _report(tmp_path, capsys, _set(good_summary, path, value))
    assert (code, err) == (2, f"ftloop: error: {tmp_path / 'summary.json'}: {problem}; not an ftloop summary\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no report written


def test_report_on_a_summary_that_is_not_an_object(tmp_path, capsys):
    code, err = _report(tmp_path, capsys, [1, 2])
    assert (code, err) == (2, f"ftloop: error: {tmp_path / 'summary.json'}: the top level is not a JSON object; not an ftloop summary\n")


class _MetricsArtifact:
    """What a KFP Metrics output records: name -> value, in logging order."""

    def __init__(self):
        self.logged: dict[str, float] = {}

    def log_metric(self, name, value):
        assert name not in self.logged, f"{name} logged twice"
        self.logged[name] = value


def test_compare_task_scalars_put_every_model_under_one_naming_scheme(run_dir):
    from ftloop.components.kfp_metrics import log_comparison

    _, summary = run_dir
    artifact = _MetricsArtifact()
    log_comparison(artifact, summary)
    got = artifact.logged
    for name, kfp_name in (("base", "base"), ("augmented", "augmented"), ("tfidf", "tfidf"), ("zero-shot", "zero_shot")):
        for split in ("dev", "test"):
            for metric in ("accuracy", "macro_f1", "weighted_f1"):
                assert got[f"{kfp_name}_{split}_{metric}"] == summary["models"][name][split][metric]
        assert [got[f"{kfp_name}_test_macro_f1_ci95_{end}"] for end in ("low", "high")] == summary["models"][name]["test"]["ci95"][
            "macro_f1"
        ]
    assert got["augmented_minus_base_test_macro_f1"] == pytest.approx(
        summary["models"]["augmented"]["test"]["macro_f1"] - summary["models"]["base"]["test"]["macro_f1"]
    )
    p_values = {k: v for k, v in got.items() if k.endswith("_test_mcnemar_p_value")}
    assert len(p_values) == len(summary["significance"]) == 6
    assert p_values["zero_shot_vs_base_test_mcnemar_p_value"] == summary["significance"]["zero-shot->base"]["test"]["p_value"]
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in got)  # usable as KFP scalar names


def test_an_evaluating_task_never_logs_a_shorter_scalar_list():
    from ftloop.components.kfp_metrics import KFP_SCALARS, log_scalars

    complete = {key: 0.5 for key in KFP_SCALARS}
    artifact = _MetricsArtifact()
    log_scalars(artifact, {"dev": complete, "test": complete})
    assert sorted(artifact.logged) == sorted(f"{s}_{k}" for s in ("dev", "test") for k in KFP_SCALARS)
    with pytest.raises(ValueError, match=r"test metrics lack \['invalid_rate'\]"):
        log_scalars(_MetricsArtifact(), {"test": {k: v for k, v in complete.items() if k != "invalid_rate"}})


def test_reports_show_each_models_test_scores_with_their_intervals(run_dir, tmp_path, capsys):
    from ftloop.components.reports.markdown import md_row

    out, summary = run_dir
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in ("base", "augmented", "tfidf", "zero-shot"):
        test = summary["models"][name]["test"]
        (acc_lo, acc_hi), (f1_lo, f1_hi) = test["ci95"]["accuracy"], test["ci95"]["macro_f1"]
        cells = [
            name,
            f"{test['accuracy']:.4f} [{acc_lo:.3f}, {acc_hi:.3f}]",
            f"{test['macro_f1']:.4f} [{f1_lo:.3f}, {f1_hi:.3f}]",
            f"{test['ece']:.4f}",
            f"{test['invalid_rate']:.4f}",
        ]
        assert md_row(cells) in md, name  # escaped: "| base | 0.5000 \\[0.250, 0.750\\] | ..."
        assert "".join(f"<td>{c}</td>" for c in cells) in page, name
    # a summary from before the intervals existed still renders, with the point values alone
    older = json.loads((out / "summary.json").read_text())
    for model in older["models"].values():
        for split in model.values():
            split.pop("ci95", None)
    code, err = _report(tmp_path, capsys, older)
    assert (code, err) == (0, "")
    assert f"| base | {summary['models']['base']['test']['accuracy']:.4f} | " in (tmp_path / "report.md").read_text()


def test_models_scored_on_different_label_lists_is_a_clear_error(tmp_path):
    from ftloop.components.errors import FtloopError

    rows = {"train": gold("train", 6), "dev": gold("dev", 6), "test": gold("test", 6)}
    evals = {"base": write_eval(tmp_path / "base", rows), "augmented": write_eval(tmp_path / "augmented", rows)}
    metrics_path = tmp_path / "augmented" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["dev"]["labels"] = list(reversed(LABELS))  # same labels, other order: matrices would not line up
    metrics_path.write_text(json.dumps(metrics))
    with pytest.raises(FtloopError) as err:
        compare(tmp_path, evals)
    assert str(err.value) == (
        f"{tmp_path / 'base' / 'metrics.json'} and {metrics_path}: dev: the label lists differ "
        f"({LABELS} vs {list(reversed(LABELS))}); the models were not evaluated on the same labels"
    )
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "r.md").exists()


# ------------------------------------------------------------------ the headline verdict


def verdict_summary(base, augmented, p=None, tfidf=None, zero_shot=None, ci=False):
    """A summary with just what the headline reads: test macro-F1 per model, McNemar p of base->augmented."""

    def model(f1):
        test = {"accuracy": f1, "macro_f1": f1, "weighted_f1": f1}
        if ci:
            test["ci95"] = {"macro_f1": [f1 - 0.1, f1 + 0.1]}
        return {"train": test, "dev": test, "test": test}

    models = {"base": model(base), "augmented": model(augmented)}
    if tfidf is not None:
        models["tfidf"] = model(tfidf)
    if zero_shot is not None:
        models["zero-shot"] = model(zero_shot)
    summary = {"models": models}
    if p is not None:
        summary["significance"] = {"base->augmented": {"test": {"fixed": 3, "broken": 5, "p_value": p}}}
    return summary


@pytest.mark.parametrize(
    "summary, expected",
    [
        (
            verdict_summary(0.69, 0.67, p=0.79, tfidf=0.54, zero_shot=0.11),
            [
                "Augmentation did not help on test: macro-F1 0.69 → 0.67 (−0.02, McNemar p = 0.7900, not significant).",
                "Both fine-tuned models beat TF-IDF (0.54) and zero-shot (0.11).",
            ],
        ),
        (
            verdict_summary(0.61, 0.74, p=0.003, tfidf=0.70, zero_shot=0.20),
            [
                "Augmentation helped on test: macro-F1 0.61 → 0.74 (+0.13, McNemar p = 0.0030, significant).",
                "Both fine-tuned models beat zero-shot (0.20); only the augmented model beats TF-IDF (0.70).",
            ],
        ),
        (
            verdict_summary(0.70, 0.72, p=0.41),
            ["Augmentation did not clearly help on test: macro-F1 0.70 → 0.72 (+0.02, McNemar p = 0.4100, not significant)."],
        ),
        (
            verdict_summary(0.80, 0.70, p=0.0004, tfidf=0.75),
            [
                "Augmentation hurt on test: macro-F1 0.80 → 0.70 (−0.10, McNemar p = 4.00e-04, significant).",
                "Only the base model beats TF-IDF (0.75).",
            ],
        ),
        (
            verdict_summary(0.70, 0.702, p=1.0, tfidf=0.90, zero_shot=0.95),
            [
                "Augmentation made no difference on test: macro-F1 0.70 → 0.70 (+0.002, McNemar p = 1.0000, not significant).",
                "TF-IDF (0.90) and zero-shot (0.95) do at least as well as both fine-tuned models.",
            ],
        ),
        (
            verdict_summary(0.69, 0.67, p=0.79, ci=True),
            [
                "Augmentation did not help on test: macro-F1 0.69 → 0.67 (−0.02, McNemar p = 0.7900, not significant; "
                "95% bootstrap intervals [0.59, 0.79] → [0.57, 0.77])."
            ],
        ),
        (
            verdict_summary(0.69, 0.75),  # a summary without significance: no p-value claimed
            ["Augmentation did not clearly help on test: macro-F1 0.69 → 0.75 (+0.06)."],
        ),
    ],
    ids=[
        "did-not-help",
        "helped-significant",
        "helped-not-significant",
        "hurt-significant",
        "no-change",
        "with-intervals",
        "no-significance",
    ],
)
def test_headline_wording(summary, expected):
    from ftloop.components.reports.verdict import headline

    assert headline(summary) == expected


def test_headline_opens_every_report(run_dir):
    from ftloop.components.reports.markdown import md
    from ftloop.components.reports.tables import render_text_table
    from ftloop.components.reports.verdict import headline

    out, summary = run_dir
    sentences = headline(summary)
    assert sentences[0].startswith("Augmentation ") and "McNemar p = " in sentences[0]
    md_lines = (out / "report.md").read_text().splitlines()
    assert md_lines[2] == "**Verdict:** " + " ".join(md(s) for s in sentences)
    page = (out / "report.html").read_text()
    assert page.index('<p class="verdict"') < page.index("<table")
    assert render_text_table(summary).splitlines()[: len(sentences)] == sentences
    only_base = {"models": {"base": summary["models"]["base"]}}
    assert headline(only_base) == []  # nothing to compare: no headline, and the reports still render


# ------------------------------------------------------------------ augment.rounds 0: augmentation off


def rounds_config(rounds: int) -> RunConfig:
    return RunConfig.model_validate({"name": "t", "seed": 0, "data": {"questions": "q.jsonl"}, "augment": {"rounds": rounds}})


def baselines_only(tmp_path, rounds=0, with_augmented=False):
    """compare_models as the pipeline calls it with augment.rounds 0: base, tfidf and zero-shot, the base splits alone."""
    names = ("base", "augmented", "tfidf", "zero-shot") if with_augmented else ("base", "tfidf", "zero-shot")
    evals = {}
    for seed, name in enumerate(names):
        fake_eval(tmp_path / name, 0.4 + 0.1 * seed, seed)
        evals[name] = tmp_path / name
    splits = {}
    for name in ("base", "augmented") if with_augmented else ("base",):
        write_json(
            tmp_path / f"{name}-splits" / "report.json", {"rows": {"train": 30, "dev": 12, "test": 12}, "groups": {}, "group_overlap": {}}
        )
        splits[name] = tmp_path / f"{name}-splits"
    out = tmp_path / "bundle"
    return out, run_compare(rounds_config(rounds), evals, splits, out, tmp_path / "r.md", tmp_path / "r.html")


def test_with_augmentation_off_the_comparison_has_base_and_the_baselines_and_says_augmentation_was_off(tmp_path, capsys):
    from ftloop.components.artifacts import read_summary
    from ftloop.components.kfp_metrics import comparison_scalars
    from ftloop.components.reports.tables import render_text_table
    from ftloop.components.reports.verdict import AUGMENTATION_OFF

    out, summary = baselines_only(tmp_path)
    assert set(summary["models"]) == {"base", "tfidf", "zero-shot"}
    assert set(summary["significance"]) == {"tfidf->base", "zero-shot->base", "zero-shot->tfidf"}  # no base->augmented
    assert summary["deltas"] == {} and set(summary["data"]) == {"base"}
    assert summary["config"]["augment"]["rounds"] == 0
    assert read_summary(out).to_json() == json.loads((out / "summary.json").read_text())  # check_summary accepts it
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert "augmentation was off (augment.rounds: 0)" in text.lower()
        assert "delta" not in text.split("Pairwise")[0].lower()  # no delta column, no base->augmented sentence
        assert "base-&gt;augmented" not in text and "base->augmented" not in text
    assert md.splitlines()[2].startswith("**Verdict:** Augmentation was off (augment.rounds: 0):")
    assert "Models: base, tfidf, zero-shot." in md and "| split | metric | base | tfidf | zero-shot |" in md
    assert "## Augmentation\n\n- augmentation was off (augment.rounds: 0): no round ran" in md
    table = render_text_table(summary)
    assert table.splitlines()[0] == AUGMENTATION_OFF
    assert table.splitlines()[1].startswith("The fine-tuned base model ")
    assert "delta" not in table
    scalars = comparison_scalars(summary)
    assert "base_test_macro_f1" in scalars and not [k for k in scalars if "augmented" in k]
    # `ftloop report` renders it again, unchanged
    (out / "report.md").unlink()
    from ftloop.pipelines.cli import main

    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == md


@pytest.mark.parametrize(
    "rounds, with_augmented, problem",
    [
        (0, True, "the augmented model's evaluation is given with augment.rounds 0"),
        (1, False, "the augmented model's evaluation is missing with augment.rounds 1"),
    ],
)
def test_the_augmented_model_is_compared_exactly_when_the_loop_ran(tmp_path, rounds, with_augmented, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        baselines_only(tmp_path, rounds=rounds, with_augmented=with_augmented)
    assert not (tmp_path / "bundle").exists()
