"""Comparison bundle and reports built from prediction files, and `ftloop report`."""

import base64
import io
import json
import re
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

from ftloop.components.compare import run_compare
from ftloop.components.metrics import write_predictions
from ftloop.components.records import write_json

LABELS = ["payments", "returns", "shipping"]


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
        write_json(tmp_path / f"{name}-splits" / "report.json",
                   {"rows": {"train": 30, "dev": 12, "test": 12}, "groups": {}, "group_overlap": {"train-test": 0}})
    out = tmp_path / "bundle"
    summary = run_compare(evals, {n: tmp_path / f"{n}-splits" for n in ("base", "augmented")}, out,
                          tmp_path / "r.md", tmp_path / "r.html", {"run_name": "t", "seed": 0})
    return out, summary


def embedded_pngs(page: str) -> list[np.ndarray]:
    return [mpimg.imread(io.BytesIO(base64.b64decode(b64)), format="png")
            for b64 in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_html_report_embeds_heatmaps_and_per_class_chart(run_dir):
    out, summary = run_dir
    page = (out / "report.html").read_text()
    images = embedded_pngs(page)
    assert len(images) == 5  # per-class chart + one heatmap per model
    for image in images:
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
    assert "| test | macro_f1 |" in md
    assert "McNemar" in md
    assert summary["deltas"]["test"]["accuracy"] == pytest.approx(
        summary["models"]["augmented"]["test"]["accuracy"] - summary["models"]["base"]["test"]["accuracy"])


def test_cli_report_rerenders_from_summary(run_dir):
    out, _ = run_dir
    (out / "report.html").unlink()
    (out / "report.md").unlink()
    result = subprocess.run([sys.executable, "-m", "ftloop.pipelines.cli", "report", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert len(embedded_pngs((out / "report.html").read_text())) == 5
    assert "| test | accuracy |" in (out / "report.md").read_text()


def test_cli_report_without_summary_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ftloop.pipelines.cli", "report", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "summary.json: not found" in result.stderr and "Traceback" not in result.stderr
