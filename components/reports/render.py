"""Writing both reports and their chart files from a summary, and re-rendering them from a finished run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from ftloop.components.artifacts import read_summary, report_html_path, report_md_path
from ftloop.components.reports.charts import Chart, report_charts
from ftloop.components.reports.html import render_html
from ftloop.components.reports.markdown import render_markdown


class Reports(NamedTuple):
    markdown: str
    html: str
    charts: list[Chart]  # each also written as a PNG file, charts/<key>.png, in the run bundle


def render_reports(summary: dict[str, Any]) -> Reports:
    """Both reports and their charts, rendered in memory: a summary that cannot render fails before any file is written."""
    charts = report_charts(summary)
    return Reports(render_markdown(summary, charts), render_html(summary, charts), charts)


def write_reports(reports: Reports, *paths_md_html: tuple[str | Path, str | Path], bundle_dir: str | Path | None = None) -> None:
    """report.md and report.html at each (md, html) pair of paths; the chart PNGs under ``bundle_dir``, if given."""
    for md_path, html_path in paths_md_html:
        for path, text in ((Path(md_path), reports.markdown), (Path(html_path), reports.html)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if bundle_dir is not None:
        for chart in reports.charts:
            path = Path(bundle_dir) / chart.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(chart.png)


def rerender_reports(run_dir: str | Path) -> tuple[Path, Path]:
    """``ftloop report``: rebuild report.md, report.html and charts/*.png of a finished run from its summary.json."""
    summary = read_summary(run_dir)
    md, page = report_md_path(run_dir), report_html_path(run_dir)
    write_reports(render_reports(summary.to_json()), (md, page), bundle_dir=run_dir)
    return md, page
