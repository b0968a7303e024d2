"""No user string crashes a report or is interpreted by its renderer (issue 16): matplotlib, Markdown, HTML, SVG, the KFP UI.

Labels, question texts and ids full of renderer metacharacters go through compare_models and `ftloop report`; the
reports must render, and every string must come out as literal text: Markdown parsed back (markdown-it, GFM tables)
and HTML parsed back show exactly the string (``escape.plain`` of it), table rows keep their cell count, and no
element or attribute comes from the data.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftloop.components.artifacts import write_predictions
from ftloop.components.config import RunConfig
from ftloop.components.records import SPLITS, Example
from ftloop.components.reports.escape import CHART_LABEL_CHARS, kfp_label, md, mpl, plain
from ftloop.components.stages.compare_models import run as run_compare
from ftloop.components.stages.split_examples import split_examples, write_splits

NASTY_LABELS = [
    "upgrade_$10_to_$20",  # issue 16: mathtext between the dollars -> ParseSyntaxException
    r"$\frac{1}{2}$ back\slash \$ \\",
    "*bold* _it_ __x__",
    "pipe|in|cell |",
    "`code` ``two``",
    "<img src=x onerror=alert(1)>",
    "</td></tr><script>alert(1)</script>",
    "a & b &amp; &lt; &#124;",
    "\"double\" 'single'",
    "line\nbreak\r\nand\ttab",
    "[link](javascript:alert(1)) ![img](x)",
    "# heading ## ###",
    "\u202eevil override\u202c rtl \u2067iso",
    "שלום \u200f عربى",
    "very long " + "label " * 60,
    "emoji 🎉👍🏽 ✓",
    "~~strike~~ ^sup^ {{ jinja }} {% raw %}",
    "--> <!-- comment ]]> <![CDATA[",
    "_leading underscore",
    "ctrl \x1b[31m red \x07",
]
NASTY_TEXTS = ["<b>bold</b> & | pipe", "$x$ and $y$", "new\nline `tick`", "\u202eRTL", "*a* [b](c)"]
# elements only data could bring in: neither report has links, images, scripts, emphasis or strikethrough of its own
FORBIDDEN_TAGS = {"img", "script", "iframe", "a", "object", "embed", "b", "em", "del", "s", "i", "u", "br", "hr", "pre", "blockquote"}


def run_config() -> RunConfig:
    return RunConfig.model_validate({"name": "escaping", "seed": 0, "data": {"questions": "q.jsonl"}})


# ------------------------------------------------------------------ build a run from rows, without models


def examples_for(labels: list[str], texts: list[str]) -> list[Example]:
    """Three source groups per label (one per split), one or two questions each."""
    rows = []
    for i, label in enumerate(labels):
        for g in range(3):
            for k in range(1 + (g + i) % 2):
                text = texts[(i + g + k) % len(texts)] if texts else f"q{i}{g}{k}"
                rows.append(Example(id=f"{i}|{g}<{k}>`$", text=text, label=label, group=f"g{i}-{g}", origin="imported"))
    return rows


def build_run(tmp: Path, labels: list[str], texts: list[str], seed: int, models=("base", "augmented", "tfidf")):
    """split_examples -> a splits dir; per model an eval dir written by write_predictions; then compare_models."""
    splits = split_examples(examples_for(labels, texts), dev=0.2, test=0.2, seed=seed)
    write_splits(splits, labels, tmp / "splits", extra={"seed": seed})
    rng = np.random.default_rng(seed)
    evals = {}
    for name in models:
        rows = {s: [{"id": e.id, "text": e.text, "label": e.label, "group": e.group} for e in splits[s]] for s in SPLITS}
        probs = {s: [dict(zip(labels, rng.dirichlet(np.ones(len(labels))).tolist())) for _ in rows[s]] for s in SPLITS}
        write_predictions(rows, probs, labels, tmp / name, progress=lambda m: None)
        evals[name] = tmp / name
    out = tmp / "bundle"
    summary = run_compare(run_config(), evals, {"base": tmp / "splits", "augmented": tmp / "splits"}, out, tmp / "kfp.md", tmp / "kfp.html")
    return out, summary


# ------------------------------------------------------------------ reading the reports back


class Page(HTMLParser):
    """Tags, attributes and the text of elements marked by class or id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.stack: list[tuple[str, dict]] = []
        self.texts: dict[str, list[str]] = {}
        self.rows: list[tuple[str, int]] = []  # (table id or class, cells in the row)
        self.svg_text: list[str] = []
        self._cells = 0
        self._tables = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self.attributes += list(attrs)
        if tag == "table":
            self._tables += 1
            attrs["#"] = f"table {self._tables}"
        if tag == "tr":
            self._cells = 0
        if tag in ("td", "th"):
            self._cells += 1
        self.stack.append((tag, attrs))

    def handle_endtag(self, tag):
        if tag == "tr":
            table = next((a["#"] for t, a in reversed(self.stack) if t == "table"), "?")
            self.rows.append((table, self._cells))
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data):
        if not self.stack:
            return
        tag, attrs = self.stack[-1]
        for key in (attrs.get("class"), attrs.get("id"), tag):
            if key:
                self.texts.setdefault(key, []).append(data)
        if tag == "text":
            self.svg_text.append(data)


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    page.close()
    return page


def unescaped_pipes(line: str) -> int:
    """Cell separators of a GFM table row: pipes not escaped by a backslash."""
    count, i = 0, 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        count += line[i] == "|"
        i += 1
    return count


def check_markdown(text: str, labels: list[str]) -> None:
    assert "<" not in text  # no raw HTML: every "<" of the data is an entity
    # every table keeps its header's column count on every row
    blocks = re.findall(r"(?:^\|.*\n)+", text, re.M)
    assert blocks
    for block in blocks:
        counts = {unescaped_pipes(line) for line in block.splitlines()}
        assert len(counts) == 1, block
    labels_line = next(line for line in text.splitlines() if line.startswith("Models: "))
    assert labels_line.endswith("Labels: " + ", ".join(md(label) for label in labels) + ".")
    markdown_it = pytest.importorskip("markdown_it")
    rendered = markdown_it.MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).render(text)
    page = parse(rendered)
    assert not FORBIDDEN_TAGS & set(page.tags), set(page.tags)
    assert page.tags.count("h1") == 1 and page.tags.count("h3") == 0 and page.tags.count("strong") == 1  # the verdict's
    assert page.tags.count("code") == text.count("`significance`") * 2
    assert not [a for a in page.attributes if a.startswith("on") or a in ("href", "src")]
    paragraph = next(p for p in page.texts["p"] if p.startswith("Models: "))
    assert paragraph.endswith("Labels: " + ", ".join(plain(label) for label in labels) + ".")  # literal, as given
    check_table_widths(page)


def check_table_widths(page: Page) -> None:
    by_table: dict[str, set[int]] = {}
    for table, cells in page.rows:
        by_table.setdefault(table, set()).add(cells)
    assert by_table and all(len(widths) == 1 for widths in by_table.values()), by_table


def check_html(text: str, labels: list[str], summary: dict) -> Page:
    assert "data:" not in text
    page = parse(text)
    assert not FORBIDDEN_TAGS & set(page.tags), set(page.tags)
    assert page.tags.count("h1") == 1 and page.tags.count("h3") <= 1 and page.tags.count("svg") == len(summary["models"]) + 1
    assert not [a for a in page.attributes if a.startswith("on") or a in ("href", "src")]
    # each label exactly as given, as text (an empty one has no text node)
    assert page.texts.get("label", []) == [plain(label) for label in labels if plain(label)]
    check_table_widths(page)
    return page


def check_bundle(out: Path, summary: dict, labels: list[str], models=("base", "augmented", "tfidf")) -> None:
    check_markdown((out / "report.md").read_text(encoding="utf-8"), labels)
    page = check_html((out / "report.html").read_text(encoding="utf-8"), labels, summary)
    # the flips table shows each flipped row's question and label as given
    flips = summary["significance"]["base->augmented"]["test_flips"]
    texts = page.texts.get("question", [])
    assert [t for t in texts if t] == [plain(f["text"]) for f in flips if plain(f["text"])][:200]
    charts = sorted(p.name for p in (out / "charts").iterdir())
    assert charts == sorted(["per_class_f1_test.png", *(f"confusion_{m}_test.png" for m in models)])


# ------------------------------------------------------------------ the fixed nasty set


@pytest.fixture(scope="module")
def nasty_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nasty")
    out, summary = build_run(tmp, NASTY_LABELS, NASTY_TEXTS, seed=3)
    return tmp, out, summary


def test_metacharacter_labels_go_through_compare_and_render_literally(nasty_run):
    tmp, out, summary = nasty_run
    assert summary["labels"] == NASTY_LABELS
    check_bundle(out, summary, NASTY_LABELS)
    md_text, page = (out / "report.md").read_text(encoding="utf-8"), (out / "report.html").read_text(encoding="utf-8")
    assert "<img" not in md_text + page and "<script" not in md_text + page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # shown, as text
    assert md("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)>"
    # the KFP artifact copies are the same reports
    assert (tmp / "kfp.md").read_text(encoding="utf-8") == md_text and (tmp / "kfp.html").read_text(encoding="utf-8") == page


def test_chart_text_is_drawn_literally_without_mathtext(nasty_run):
    _, out, _ = nasty_run
    svg_text = parse((out / "report.html").read_text(encoding="utf-8")).svg_text
    assert "upgrade_$10_to_$20" in svg_text  # the label, dollars and all: not mathtext
    assert any(t.startswith("<img src=x onerror=alert(1)>") for t in svg_text)  # escaped in the SVG, text again when parsed
    assert all(len(t) <= CHART_LABEL_CHARS + 1 for t in svg_text)  # long labels shortened (word joiner: +1)


def test_ftloop_report_rerenders_the_same_reports(nasty_run, tmp_path, capsys):
    from ftloop.pipelines.cli import main

    _, out, summary = nasty_run
    (tmp_path / "summary.json").write_text((out / "summary.json").read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["report", str(tmp_path)]) == 0, capsys.readouterr().err
    for name in ("report.md", "report.html", "charts/per_class_f1_test.png"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    check_bundle(tmp_path, summary, NASTY_LABELS)


def test_the_dollar_label_of_issue_16(tmp_path, capsys):
    """The reported case: a questions file with upgrade_$10_to_$20 trained, then compare_models died in matplotlib."""
    labels = ["upgrade_$10_to_$20", "refund"]
    out, summary = build_run(tmp_path, labels, [], seed=0, models=("base", "augmented", "tfidf"))
    check_bundle(out, summary, labels)
    assert "upgrade\\_\\$10\\_to\\_\\$20" in (out / "report.md").read_text(encoding="utf-8")


def test_text_table_and_kfp_categories_are_one_line_each(nasty_run):
    from ftloop.components.kfp_metrics import log_confusion_matrix
    from ftloop.components.reports.tables import render_text_table

    _, _, summary = nasty_run
    assert "\x1b" not in render_text_table(summary)

    class Confusion:
        def log_confusion_matrix(self, categories, matrix):
            self.categories, self.matrix = categories, matrix

    n = len(NASTY_LABELS)
    artifact = Confusion()
    log_confusion_matrix(artifact, {"test": {"labels": NASTY_LABELS, "confusion_matrix": [[1] * n] * n}})
    assert len(artifact.categories) == len(set(artifact.categories)) == n
    for shown, label in zip(artifact.categories, NASTY_LABELS):
        assert "\n" not in shown and "\x1b" not in shown and len(shown) <= 60
        assert shown == plain(label) or shown.endswith("…")
    assert kfp_label(["x" * 80, "x" * 81]) == ["x" * 59 + "…", "x" * 55 + "… (2)"]


@pytest.mark.parametrize(
    "value, expected",
    [
        ("upgrade_$10_to_$20", r"upgrade_\$10_to_\$20"),
        (r"a\$", r"a\\$"),
        ("two\nlines", "two lines"),
        ("_hidden", "\u2060_hidden"),
        ("x" * 50, "x" * 39 + "…"),
        ("\u202eabc", "abc"),
    ],
)
def test_mpl_escape(value, expected):
    assert mpl(value) == expected


def test_mpl_escaped_text_draws_as_given():
    """matplotlib's own parser, as it decides mathtext: what mpl() returns is drawn as the plain string."""
    from matplotlib.text import Text

    for raw in ("upgrade_$10_to_$20", r"a\$b$c", "$$", "\\", r"\$\$"):
        text = Text(0, 0, mpl(raw))
        shown, is_math = text._preprocess_math(text.get_text())
        assert (shown, is_math) == (raw, False), raw


# ------------------------------------------------------------------ property-based: any Unicode label and text

META = list("$\\_*|`<>&\"'\n[]#~!(){}-+.=^:") + ["\u202e", "\u2067", "\u200f", "🎉", "\x1b", "\r\n", "&amp;", "-->", "<script>"]
pieces = st.one_of(st.sampled_from(META), st.text(st.characters(codec="utf-8"), max_size=4))
user_string = st.lists(pieces, min_size=1, max_size=6).map("".join)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    labels=st.lists(user_string, min_size=2, max_size=4, unique=True),
    texts=st.lists(user_string, min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_any_unicode_labels_and_texts_render_escaped(tmp_path_factory, labels, texts, seed):
    from ftloop.components.reports.render import rerender_reports

    tmp = tmp_path_factory.mktemp("prop")
    out, summary = build_run(tmp, labels, texts, seed, models=("base", "augmented"))  # two models: fast
    assert summary["labels"] == labels
    check_bundle(out, summary, labels, models=("base", "augmented"))
    page = (out / "report.html").read_text(encoding="utf-8")
    rerender_reports(out)  # ftloop report
    assert (out / "report.html").read_text(encoding="utf-8") == page
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["labels"] == labels
