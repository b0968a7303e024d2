"""Escaping user strings for each renderer the reports feed: one helper per renderer, applied where the string is rendered.

Labels, question texts, row ids, the run name and model names come from the user's data or config and may hold
anything: ``$`` (matplotlib mathtext), ``|``/``*``/``_``/backticks (Markdown), ``<``/``&`` (HTML, SVG), newlines,
control characters, bidi overrides, very long strings. Every renderer gets them through its helper here:

- ``plain``: renderer-independent, applied first by all the others: one line (every run of whitespace, newlines
  included, becomes one space), no control characters (shown as ``\\x1b``), bidi controls isolated (FSI ... PDI) so
  an override cannot reorder the text after it.
- ``md``: Markdown (report.md and the KFP UI's Markdown viewer): ``plain``, then HTML metacharacters as entities
  (``&lt;``, ``&amp;``: raw HTML in Markdown is HTML) and every other inline Markdown metacharacter backslash-escaped,
  so a string is literal text after other text on a line, in a heading and in a table cell (``|`` escaped).
- HTML (report.html): jinja2 autoescape, with ``plain`` as the environment's ``finalize`` (``reports/html.py``).
- ``mpl``: matplotlib text (chart titles, tick labels, legends): ``plain``, shortened to ``CHART_LABEL_CHARS``, ``$``
  escaped (mathtext), a leading ``_`` kept visible in legends. The SVG backend escapes ``<``, ``>`` and ``&`` itself;
  ``charts.py`` renders with usetex off so nothing else is special.
- ``kfp_label``: category names of a KFP ``ClassificationMetrics`` confusion matrix (``kfp_metrics.py``): ``plain``,
  shortened to ``KFP_LABEL_CHARS``, made distinct again after shortening.
- ``file_part``: a user string inside a file name (``charts/confusion_<model>_test.png``): ``[A-Za-z0-9_.-]`` only.
"""

from __future__ import annotations

import re
import unicodedata

# Explicit bidi embeddings, overrides and isolates: they reorder the text after them until their terminator.
BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_FSI, _PDI = "\u2068", "\u2069"

CHART_LABEL_CHARS = 40  # a tick label longer than this is shortened (the figure grows with its labels)
KFP_LABEL_CHARS = 60  # the KFP UI lays each confusion-matrix category out in one cell

# What Markdown (CommonMark, GFM tables and strikethrough, $math$) treats as syntax in the middle of a line; with "<"
# an entity, ">" closes nothing, and "!", "(" only act after "[", which is escaped. Line-start syntax (lists, quotes,
# headings) never applies: the reports put a user string after other text on its line, never at its start.
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$#])")


def _visible_control(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(value: object) -> str:
    """``value`` as one line of inert text: whitespace runs -> one space, control characters shown, bidi controls isolated."""
    text = " ".join(str(value).split())
    text = "".join(_visible_control(ch) if unicodedata.category(ch) == "Cc" else ch for ch in text)
    if any(ch in BIDI_CONTROLS for ch in text):
        # An isolate's closing PDI ends every embedding and override opened inside it (Unicode UAX #9).
        text = _FSI + text + _PDI
    return text


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def md(value: object) -> str:
    """Markdown-safe literal text, usable inline, in headings and in table cells."""
    text = plain(value).replace("&", "&amp;").replace("<", "&lt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def mpl(value: object, limit: int = CHART_LABEL_CHARS) -> str:
    """A string matplotlib draws as it reads: no mathtext, one line, at most ``limit`` characters."""
    # matplotlib does no bidi reordering: the controls would only draw as boxes
    text = "".join(ch for ch in plain(value) if ch not in BIDI_CONTROLS)
    text = shorten(text, limit).replace("$", r"\$")
    # matplotlib's legend skips artists whose label starts with "_"; a word joiner keeps it shown, and invisible.
    return "\u2060" + text if text.startswith("_") else text


def kfp_label(values: list[str], limit: int = KFP_LABEL_CHARS) -> list[str]:
    """Confusion-matrix category names for the KFP UI: one line each, shortened, still distinct."""
    out: list[str] = []
    for value in values:
        name = shorten(plain(value), limit)
        candidate, n = name, 2
        while candidate in out:
            suffix = f" ({n})"
            candidate, n = shorten(plain(value), limit - len(suffix)) + suffix, n + 1
        out.append(candidate)
    return out


def file_part(value: object) -> str:
    """A user string as part of a file name: letters, digits, ``_ . -`` only, never empty or a dot name."""
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", str(value))[:60]
    return text if text.strip(".") else "_" + text
