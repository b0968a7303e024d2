"""Report charts (test confusion matrix per model, per-class F1) as inline SVG for report.html and PNG files for the bundle.

report.html carries its charts as inline ``<svg>`` elements, not ``data:`` URI images: some KFP UI versions render
an HTML artifact's data-URI images blank (kubeflow/pipelines#10527). The same charts are written as PNG files under
``charts/`` in the run bundle, so they can be shown or uploaded on their own.

Every user string drawn (labels, model names) goes through ``escape.mpl`` (no mathtext, one line, shortened);
matplotlib's SVG writer escapes ``<``, ``>`` and ``&`` in text and attributes.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any, NamedTuple

from ftloop.components.artifacts import CHARTS_DIR
from ftloop.components.reports.escape import file_part, mpl
from ftloop.components.reports.tables import model_order

SPLIT = "test"

# svg.fonttype "none": text stays <text>, so the browser draws labels in any script (emoji, CJK, RTL) with its own
# fonts, and they can be selected and searched; "path" would freeze them as DejaVu glyph outlines (tofu for emoji).
# usetex off: a user's matplotlibrc must not hand labels to LaTeX. hashsalt: stable, per-chart clip-path ids, so
# report.html is reproducible and two inline SVGs on one page never share an id.
_RC = {"svg.fonttype": "none", "text.usetex": False, "svg.image_inline": True, "axes.unicode_minus": True}


class Chart(NamedTuple):
    key: str  # unique on the page and in the bundle: per_class_f1_test, confusion_<model>_test
    title: str  # plain text; each renderer escapes it
    file: str  # the PNG, relative to the bundle: charts/<key>.png
    svg: str  # an <svg> element (no XML prolog), ready to inline in HTML
    png: bytes


def chart_file(key: str) -> str:
    return f"{CHARTS_DIR}/{key}.png"


def chart_plan(summary: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(key, title, model or None) of every chart a summary gets, in page order; keys are distinct, safe file names."""
    plan: list[tuple[str, str, str | None]] = [(f"per_class_f1_{SPLIT}", f"Per-class F1 ({SPLIT})", None)]
    for name in model_order(summary):
        if summary["models"][name][SPLIT].get("confusion_matrix"):
            key, n = f"confusion_{file_part(name)}_{SPLIT}", 2
            while key in {k for k, _, _ in plan}:
                key, n = f"confusion_{file_part(name)}_{n}_{SPLIT}", n + 1
            plan.append((key, f"{name}: {SPLIT} confusion matrix", name))
    return plan


def _scoped_ids(svg: str, key: str) -> str:
    """Every id of the chart and every reference to one prefixed with ``key``: several inline SVGs share one page.

    Only tags are rewritten (``<...>``); text is never touched (matplotlib escaped its ``<`` and ``>``).
    """

    def fix(tag: re.Match[str]) -> str:
        text = re.sub(r'(\sid=")', rf"\1{key}-", tag.group(0))
        text = text.replace("url(#", f"url(#{key}-")
        return re.sub(r'(href=")#', rf"\1#{key}-", text)

    return re.sub(r"<[^<>]+>", fix, svg)


def _render(fig, key: str, title: str) -> Chart:
    import matplotlib.pyplot as plt

    svg_buffer, png_buffer = io.BytesIO(), io.BytesIO()
    with plt.rc_context({**_RC, "svg.hashsalt": f"ftloop-{key}"}):
        fig.savefig(svg_buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
        fig.savefig(png_buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    svg = svg_buffer.getvalue().decode("utf-8")
    svg = svg[svg.index("<svg") :]  # no XML declaration or DOCTYPE: an inline SVG is part of the HTML document
    return Chart(key, title, chart_file(key), _scoped_ids(svg, key), png_buffer.getvalue())


def _figure(**kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context(_RC):
        return plt.subplots(**kwargs)


def confusion_chart(matrix: list[list[Any]], labels: list[str], key: str, title: str) -> Chart:
    """A confusion matrix heatmap (rows true, columns predicted) with scikit-learn's ConfusionMatrixDisplay."""
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    data = np.asarray(matrix)
    if data.size and np.all(np.mod(data, 1) == 0):
        data = data.astype(int)
    n = max(len(labels), data.shape[0] if data.ndim == 2 else 0)
    shown = [mpl(label) for label in labels] if len(labels) == n else None
    size = min(40.0, 2.2 + 0.55 * n)
    fig, ax = _figure(figsize=(size + 1.2, size))
    with plt.rc_context(_RC):
        display = ConfusionMatrixDisplay(confusion_matrix=data, display_labels=shown).plot(
            ax=ax, cmap="Blues", xticks_rotation=45, colorbar=False, values_format="d" if data.dtype.kind in "iu" else ".3g"
        )
        # The display draws the cells as a raster image, which an SVG can only carry as a data: URI; draw them as
        # vector cells with the same colours instead, and keep its labels, ticks and cell values.
        image = display.im_
        edges = np.arange(data.shape[0] + 1) - 0.5
        cells = ax.pcolormesh(edges, edges, data, cmap=image.get_cmap(), norm=image.norm, zorder=0)
        image.remove()
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylim(edges[-1], edges[0])
        colorbar = fig.colorbar(cells, ax=ax, fraction=0.046)
        colorbar.solids.set_rasterized(False)  # a 256-step gradient is rasterized by default: a data: URI again
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(mpl(title, 80))
    return _render(fig, key, title)


def per_class_f1_chart(summary: dict[str, Any], key: str, title: str) -> Chart:
    """Grouped bars of per-class F1 on test, one bar per model."""
    import matplotlib.pyplot as plt
    import numpy as np

    labels = summary.get("labels") or []
    names = model_order(summary)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(names))
    fig, ax = _figure(figsize=(min(60.0, 2.4 + 0.9 * len(labels)), 3.8))
    with plt.rc_context(_RC):
        for k, name in enumerate(names):
            per_class = summary["models"][name][SPLIT].get("per_class") or {}
            scores = [(per_class.get(label) or {}).get("f1") or 0.0 for label in labels]
            ax.bar(x + k * width, scores, width, label=mpl(name))
        ax.set_xticks(x + width * (len(names) - 1) / 2, [mpl(label) for label in labels], rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"{SPLIT} F1")
        ax.set_title(mpl(title, 80))
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _render(fig, key, title)


def report_charts(summary: dict[str, Any]) -> list[Chart]:
    """Every chart of a summary, in page order: per-class F1, then each model's test confusion matrix."""
    labels = summary.get("labels") or []
    charts = []
    with warnings.catch_warnings():
        # emoji and other scripts DejaVu lacks: boxes in the PNG; the inline SVG (fonttype none) uses the browser's fonts
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font", category=UserWarning)
        for key, title, model in chart_plan(summary):
            if model is None:
                charts.append(per_class_f1_chart(summary, key, title))
            else:
                charts.append(confusion_chart(summary["models"][model][SPLIT]["confusion_matrix"], labels, key, title))
    return charts
