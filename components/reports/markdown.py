"""report.md: the comparison as Markdown.

Every string that is not this module's own text goes through ``escape.md`` where it is put on a line (labels,
questions, ids, run and model names, numbers alike), so a user string is always literal text and a table row always
has its header's number of cells. User strings never start a line and never sit in a code span.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ftloop.components.reports.charts import Chart
from ftloop.components.reports.escape import md
from ftloop.components.reports.tables import (
    MARKDOWN_FLIPS,
    PAIRWISE_HEADER,
    TEST_DETAIL_HEADER,
    augmentation_lines,
    base_model_text,
    comparison_header,
    comparison_rows,
    data_lines,
    flip_cells,
    flip_section,
    format_p,
    model_order,
    pairwise_rows,
    test_detail_rows,
)
from ftloop.components.reports.verdict import headline


def md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(md(c) for c in cells) + " |"


def md_table(header: Sequence[Any], rows: list[list[str]], align: Sequence[str]) -> list[str]:
    """A GFM table; ``align`` per column: "l" or "r"."""
    return [md_row(header), "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|", *(md_row(r) for r in rows)]


def render_markdown(summary: dict[str, Any], charts: list[Chart] | None = None) -> str:
    header = comparison_header(summary)
    lines = [f"# ftloop run {md(summary.get('run_name') or '')}", ""]
    verdict = headline(summary)
    if verdict:
        lines += ["**Verdict:** " + " ".join(md(s) for s in verdict), ""]
    base_model = base_model_text(summary)
    if base_model:
        lines += [f"Base model: {md(base_model)}", ""]
    lines += [
        f"Models: {', '.join(md(m) for m in model_order(summary))}. "
        f"Labels: {', '.join(md(label) for label in summary.get('labels') or [])}.",
        "",
    ]
    lines += md_table(header, comparison_rows(summary), ["l", "l", *("r" * (len(header) - 2))])
    lines += ["", "## Test split: 95% bootstrap intervals, calibration, invalid outputs, speed", ""]
    lines += md_table(TEST_DETAIL_HEADER, test_detail_rows(summary), "lrrrrr")
    if summary.get("significance"):
        lines += [
            "",
            "## Pairwise comparisons (McNemar's exact test, paired on the same rows)",
            "",
            "Δ = after - before; fixed = rows wrong before and right after, broken = the reverse.",
            "",
        ]
        lines += md_table(PAIRWISE_HEADER, pairwise_rows(summary), "llrrrrr")
    section = flip_section(summary)
    if section is not None:
        key, before, after, test, flips = section
        lines += [
            "",
            f"## Test rows that flipped: {md(before)} -> {md(after)}",
            "",
            f"{test['fixed']} fixed, {test['broken']} broken, McNemar p = {format_p(test['p_value'])}.",
        ]
        if flips:
            lines += [""] + md_table(
                ["change", "id", "question", "label", before, after], [flip_cells(f) for f in flips[:MARKDOWN_FLIPS]], "llllll"
            )
            if len(flips) > MARKDOWN_FLIPS:
                lines += [
                    "",
                    f"... and {len(flips) - MARKDOWN_FLIPS} more (all in summary.json: `significance` > {md(key)} > `test_flips`).",
                ]
    if charts:
        lines += ["", "## Charts (PNG files beside this report)", ""]
        lines += [f"- {md(c.title)}: {md(c.file)}" for c in charts]
    augmentation = augmentation_lines(summary)
    if augmentation:
        lines += ["", "## Augmentation", "", *(f"- {md(item)}" for item in augmentation)]
    data = data_lines(summary)
    if data:
        lines += ["", "## Data", "", *(f"- {md(item)}" for item in data)]
    return "\n".join(lines) + "\n"
