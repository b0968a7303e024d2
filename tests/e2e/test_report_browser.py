"""report.html in a real browser: headless Chromium renders its tables and inline SVG charts, and the page is not blank.

The report has no script of its own; the test opens a copy with a probe appended that records each SVG's laid-out
size on <body>, so ``--dump-dom`` shows what the browser drew. The screenshot is kept under pytest's tmp path.
Skipped only when no Chromium is installed (CI installs Debian's: see the Makefile's test target).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ftloop.components.artifacts import write_predictions
from ftloop.components.config import RunConfig
from ftloop.components.records import SPLITS, write_json
from ftloop.components.stages.compare_models import run as run_compare

LABELS = ["billing", "upgrade_$10_to_$20", "<img src=x onerror=alert(1)>", "shipping | returns"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]

PROBE = """<script>
window.addEventListener("load", function () {
  var sizes = Array.prototype.map.call(document.querySelectorAll("svg"), function (svg) {
    var box = svg.getBoundingClientRect();
    return [Math.round(box.width), Math.round(box.height)];
  });
  document.body.setAttribute("data-svg-sizes", JSON.stringify(sizes));
});
</script>"""


def browser() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; `make test` installs it)")
    return found


def small_run(tmp: Path) -> Path:
    rng = np.random.default_rng(7)
    evals = {}
    for name, accuracy in (("base", 0.6), ("augmented", 0.75), ("tfidf", 0.5), ("zero-shot", 0.3)):
        rows, probs = {}, {}
        for split, n in zip(SPLITS, (24, 12, 16)):
            rows[split] = [
                {"id": f"{split}-{i}", "text": f"question {i} about <b>{LABELS[i % 4]}</b>", "label": LABELS[i % 4], "group": f"g{i}"}
                for i in range(n)
            ]
            probs[split] = []
            for r in rows[split]:
                winner = r["label"] if rng.random() < accuracy else LABELS[(LABELS.index(r["label"]) + 1) % 4]
                probs[split].append({label: 0.7 if label == winner else 0.1 for label in LABELS})
        write_predictions(rows, probs, LABELS, tmp / name, progress=lambda m: None)
        evals[name] = tmp / name
    write_json(tmp / "splits" / "report.json", {"rows": {"train": 24, "dev": 12, "test": 16}, "groups": {}, "group_overlap": {}})
    config = RunConfig.model_validate({"name": "browser-check", "seed": 0, "data": {"questions": "q.jsonl"}})
    out = tmp / "bundle"
    run_compare(config, evals, {"base": tmp / "splits", "augmented": tmp / "splits"}, out, tmp / "r.md", tmp / "r.html")
    return out


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


def test_report_html_renders_tables_and_svg_charts_in_chromium(tmp_path):
    binary = browser()
    out = small_run(tmp_path)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<script" not in page and "data:" not in page
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")

    dom = chromium(binary, tmp_path / "profile-dom", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<img" not in html  # the label is text in the DOM, not an element
    assert html.count("<svg") == 5  # per-class F1 + a confusion matrix per model
    sizes = json.loads(re.search(r'data-svg-sizes="([^"]*)"', html).group(1).replace("&quot;", '"'))
    assert len(sizes) == 5 and all(w > 100 and h > 100 for w, h in sizes), sizes
    assert len(re.findall(r"<tr>", html)) >= 9 + 1 + 4 + 1  # the comparison table (9 rows + header), the test details
    assert "upgrade_$10_to_$20" in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "Augmentation" in re.search(r'<p class="verdict"[^>]*>(.*?)</p>', html, re.S).group(1)

    screenshot = tmp_path / "report.png"
    shot = chromium(binary, tmp_path / "profile-shot", "--window-size=1280,2000", f"--screenshot={screenshot}", probed.as_uri())
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    print(f"\nreport.html screenshot: {screenshot}")
    import matplotlib.image as mpimg

    image = mpimg.imread(screenshot)
    assert image.shape[:2] == (2000, 1280)
    colours = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, table borders, the charts' blue shades: not a blank page
    lower = image[1000:, :, :3]  # the charts sit below the tables
    assert lower.std() > 0.05
