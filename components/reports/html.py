"""report.html: the comparison as one self-contained page, rendered from ``templates/report.html.j2``.

HTML escaping happens in one place: the jinja2 environment autoescapes every ``{{ ... }}`` and runs ``escape.plain``
on it first (``finalize``), so no user string (label, question, id, run or model name) reaches the page unescaped.
The only values marked safe are the charts' ``<svg>`` elements, written by matplotlib's SVG backend, which escapes
the text it draws. Charts are inline SVG, never ``data:`` URIs (see ``charts.py``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from markupsafe import Markup

from ftloop.components.reports.charts import Chart, report_charts
from ftloop.components.reports.escape import plain
from ftloop.components.reports.markdown import augmentation_lines, data_lines
from ftloop.components.reports.tables import (
    HTML_FLIPS,
    PAIRWISE_HEADER,
    TEST_DETAIL_HEADER,
    base_model_text,
    comparison_header,
    comparison_rows,
    flip_cells,
    flip_section,
    format_p,
    model_order,
    pairwise_rows,
    test_detail_rows,
)
from ftloop.components.reports.verdict import headline

TEMPLATE = "report.html.j2"


def _finalize(value: Any) -> Any:
    """Every interpolated value, before autoescape: trusted markup as is, anything else as one line of plain text."""
    if value is None:
        return ""
    return value if isinstance(value, Markup) else plain(value)


@lru_cache(maxsize=1)
def environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    return Environment(
        loader=PackageLoader("ftloop.components.reports", "templates"),
        autoescape=True,  # every template here is HTML
        finalize=_finalize,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_html(summary: dict[str, Any], charts: list[Chart] | None = None) -> str:
    charts = report_charts(summary) if charts is None else charts
    flips = None
    section = flip_section(summary)
    if section is not None:
        key, before, after, test, rows = section
        flips = {
            "key": key,
            "before": before,
            "after": after,
            "fixed": test["fixed"],
            "broken": test["broken"],
            "p": format_p(test["p_value"]),
            "rows": [flip_cells(f) for f in rows[:HTML_FLIPS]],
            "more": max(0, len(rows) - HTML_FLIPS),
        }
    return (
        environment()
        .get_template(TEMPLATE)
        .render(
            run_name=summary.get("run_name") or "",
            headline=headline(summary),
            base_model=base_model_text(summary),
            models=model_order(summary),
            labels=summary.get("labels") or [],
            comparison={"header": comparison_header(summary), "rows": comparison_rows(summary)},
            detail={"header": TEST_DETAIL_HEADER, "rows": test_detail_rows(summary)},
            pairwise={"header": PAIRWISE_HEADER, "rows": pairwise_rows(summary)} if summary.get("significance") else None,
            charts=[{"title": c.title, "file": c.file, "svg": Markup(c.svg)} for c in charts],
            flips=flips,
            augmentation=augmentation_lines(summary),
            data=data_lines(summary),
        )
    )
