"""Compare models evaluated on the same rows: summary.json plus Markdown and HTML reports.

The summary is the machine-readable result of a run; the reports are for
people (the KFP UI renders both artifact types).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from ftloop.components.errors import FtloopError, InputFileError
from ftloop.components.records import SPLITS, read_json, read_jsonl, write_json
from ftloop.components.stats import bootstrap_ci, mcnemar_exact

HEADLINE_METRICS = ("accuracy", "macro_f1", "weighted_f1")
MODEL_ORDER = ("base", "augmented", "tfidf", "zero-shot")
# Pairs are (before, after): every model is compared with each one listed before it here,
# so the loop's result (augmented) is the "after" of every pair it is in, then base.
PAIR_RANK = ("augmented", "base", "tfidf", "zero-shot")
SIGNIFICANCE_SPLITS = ("dev", "test")  # shown in the reports; train is fit, not judged
MARKDOWN_FLIPS = 50
HTML_FLIPS = 200
SUMMARY_VERSION = 2
INVALID_SHOWN = "(invalid)"  # a generate-mode output that parsed to no label


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def model_pairs(names: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Every (before, after) pair of ``names``: base, tfidf, zero-shot against augmented, the baselines against base, ..."""
    ranked = [n for n in PAIR_RANK if n in names] + sorted(n for n in names if n not in PAIR_RANK)
    return [(before, after) for i, after in enumerate(ranked) for before in ranked[i + 1:]]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _index_rows(rows: list[dict], path: Path) -> dict[Any, dict]:
    """Rows by id; a prediction row without id/label/prediction or a repeated id is a user-visible error."""
    by_id: dict[Any, dict] = {}
    for row in rows:
        line = row.get("__line__")
        for field in ("id", "label", "prediction"):
            if field not in row:
                raise InputFileError(str(path), "missing; not an ftloop predictions file", line, field)
        if row["id"] in by_id:
            first = by_id[row["id"]].get("__line__")
            raise InputFileError(str(path), f"duplicate id {_short(row['id'])} (first on line {first}); "
                                            "every row must be evaluated exactly once", line, "id")
        by_id[row["id"]] = row
    return by_id


def check_same_rows(reference: list[dict], reference_path: Path, rows: list[dict], path: Path) -> None:
    """Two models are compared row by row, so they must have been evaluated on the same rows: same ids, gold labels and texts."""
    ref, other = _index_rows(reference, reference_path), _index_rows(rows, path)
    where = f"{reference_path} and {path}"
    for row_id, a in ref.items():
        b = other.get(row_id)
        if b is None:
            raise FtloopError(f"{where}: id {_short(row_id)} is only in the first file; "
                              "the models were not evaluated on the same rows")
        for field in ("label", "text"):
            if field in a and field in b and a[field] != b[field]:
                raise FtloopError(f"{where}: id {_short(row_id)}: field '{field}' differs "
                                  f"({_short(a[field])} vs {_short(b[field])}); the models were not evaluated on the same rows")
    extra = next((row_id for row_id in other if row_id not in ref), None)
    if extra is not None:
        raise FtloopError(f"{where}: id {_short(extra)} is only in the second file; "
                          "the models were not evaluated on the same rows")


def _correct(row: dict) -> bool:
    """Right iff the prediction is the gold label; an invalid (None) prediction is wrong."""
    return row["prediction"] is not None and row["prediction"] == row["label"]


def compare_pair(
    before_rows: dict[str, list[dict]],
    after_rows: dict[str, list[dict]],
    before_metrics: dict[str, dict[str, Any]],
    after_metrics: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Two models on the same rows (see ``check_same_rows``), per split: McNemar's exact test and after - before metric deltas,
    plus the test rows that flipped ("fixed": wrong before, right after; "broken": the reverse), in the before model's row order.
    """
    out: dict[str, Any] = {}
    flips: list[dict[str, Any]] = []
    for split in SPLITS:
        after_by_id = {r["id"]: r for r in after_rows[split]}
        if after_by_id.keys() != {r["id"] for r in before_rows[split]} or len(after_by_id) != len(before_rows[split]):
            raise ValueError(f"compare_pair: the two models' {split} rows differ; run check_same_rows first")
        paired = [(b, after_by_id[b["id"]]) for b in before_rows[split]]
        out[split] = mcnemar_exact([_correct(b) for b, _ in paired], [_correct(a) for _, a in paired])
        if split == "test":
            flips = [
                {"id": b["id"], "text": b.get("text"), "label": b["label"], "before": b["prediction"],
                 "after": a["prediction"], "change": "fixed" if _correct(a) else "broken"}
                for b, a in paired if _correct(b) != _correct(a)
            ]
    out["deltas"] = {
        split: {k: after_metrics[split][k] - before_metrics[split][k] for k in HEADLINE_METRICS} for split in SPLITS
    }
    out["test_flips"] = flips
    return out


def summarize(
    eval_dirs: dict[str, str | Path],
    split_dirs: dict[str, str | Path],
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """The run's summary from every model's metrics.json and predictions; reads and checks everything, writes nothing."""
    models: dict[str, Any] = {}
    labels: list[str] | None = None
    labels_from: Path | None = None
    predictions: dict[str, dict[str, list[dict]]] = {}
    for name, eval_dir in eval_dirs.items():
        metrics_path = Path(eval_dir) / "metrics.json"
        metrics = _load_json(metrics_path)
        models[name] = {}
        predictions[name] = {}
        for split in SPLITS:
            predictions[name][split] = read_jsonl(Path(eval_dir) / "predictions" / f"{split}.jsonl")
            m = metrics[split]
            if labels is None:
                labels, labels_from = m.get("labels"), metrics_path
            elif m.get("labels") is not None and m["labels"] != labels:
                # per-class scores and confusion matrices are indexed by label: different lists cannot share a table
                raise FtloopError(f"{labels_from} and {metrics_path}: {split}: the label lists differ "
                                  f"({labels} vs {m['labels']}); the models were not evaluated on the same labels")
            models[name][split] = {
                **{k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1", "n")},
                **{k: m[k] for k in ("macro_precision", "macro_recall", "weighted_precision", "weighted_recall",
                                     "ece", "invalid_rate", "rows_per_second", "mean_batch_seconds") if k in m},
                "per_class": m.get("per_class"),
                "confusion_matrix": m.get("confusion_matrix"),
                "predictions": (Path("predictions") / name / f"{split}.jsonl").as_posix(),
            }
    names = list(models)
    if names:
        reference = model_order({"models": models})[0]
        for name in names:
            for split in SPLITS:
                check_same_rows(predictions[reference][split], Path(eval_dirs[reference]) / "predictions" / f"{split}.jsonl",
                                predictions[name][split], Path(eval_dirs[name]) / "predictions" / f"{split}.jsonl")
    data = {name: _load_json(Path(d) / "report.json") for name, d in split_dirs.items()}
    seed = int(run_info.get("seed", 0))
    for name in models:
        for split in SPLITS:
            rows = predictions[name][split]
            ci = bootstrap_ci([r["label"] for r in rows], [r["prediction"] for r in rows], labels or [], seed=seed)
            models[name][split]["ci95"] = {k: list(v) for k, v in ci.items()}
    significance = {
        f"{before}->{after}": {"before": before, "after": after,
                               **compare_pair(predictions[before], predictions[after], models[before], models[after])}
        for before, after in model_pairs(names)
    }
    return {
        "summary_version": SUMMARY_VERSION,
        **run_info,
        "labels": labels,
        "models": models,
        # base -> augmented, kept at the top level for the KFP artifact's delta_test_* metadata and older readers
        "deltas": significance.get("base->augmented", {}).get("deltas", {}),
        "significance": significance,
        "data": data,
    }


def build_summary(
    eval_dirs: dict[str, str | Path],
    split_dirs: dict[str, str | Path],
    out_dir: str | Path,
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """Copy every model's predictions into ``out_dir`` and describe the run in summary.json there."""
    summary = summarize(eval_dirs, split_dirs, run_info)
    write_bundle(summary, eval_dirs, out_dir)
    return summary


def write_bundle(summary: dict[str, Any], eval_dirs: dict[str, str | Path], out_dir: str | Path) -> None:
    out = Path(out_dir)
    for name, eval_dir in eval_dirs.items():
        for split in SPLITS:
            target = out / summary["models"][name][split]["predictions"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(eval_dir) / "predictions" / f"{split}.jsonl", target)
    write_json(out / "summary.json", summary)


def model_order(summary: dict[str, Any]) -> list[str]:
    """The loop's models first (base, augmented), then any others alphabetically."""
    names = list(summary["models"])
    return [n for n in MODEL_ORDER if n in names] + sorted(n for n in names if n not in MODEL_ORDER)


def comparison_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Rows of the side-by-side table: split, metric, one column per model, delta."""
    names = model_order(summary)
    rows = []
    for split in SPLITS:
        for metric in HEADLINE_METRICS:
            values = [summary["models"][n][split][metric] for n in names]
            row = [split, metric, *(f"{v:.4f}" for v in values)]
            if summary.get("deltas"):
                row.append(f"{summary['deltas'][split][metric]:+.4f}")
            rows.append(row)
    return rows


def comparison_header(summary: dict[str, Any]) -> list[str]:
    return ["split", "metric", *model_order(summary), *(["delta"] if summary.get("deltas") else [])]


TEST_DETAIL_HEADER = ("model", "accuracy [95% CI]", "macro-F1 [95% CI]", "ECE", "invalid rate", "rows/s")


def test_detail_rows(summary: dict[str, Any]) -> list[list[str]]:
    """Per model on test: the headline scores with their bootstrap intervals, calibration, invalid outputs, speed.

    A difference between two models is only worth reading next to these intervals; summaries
    written before the intervals existed show the point values alone.
    """
    rows = []
    for name in model_order(summary):
        test = summary["models"][name]["test"]
        ci = test.get("ci95") or {}

        def scored(metric: str) -> str:
            bounds = ci.get(metric)
            interval = f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""
            return f"{test[metric]:.4f}{interval}"

        def plain(metric: str, fmt: str) -> str:
            return format(test[metric], fmt) if test.get(metric) is not None else ""

        rows.append([name, scored("accuracy"), scored("macro_f1"), plain("ece", ".4f"), plain("invalid_rate", ".4f"),
                     plain("rows_per_second", ",.0f")])
    return rows


def render_text_table(summary: dict[str, Any]) -> str:
    header = comparison_header(summary)
    rows = comparison_rows(summary)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def format_p(p: float) -> str:
    """Four decimals, or three significant digits below 0.001, so a tiny p-value never prints as 0.0000."""
    if p >= 0.001:
        return f"{p:.4f}"
    return f"{p:.2e}" if p > 0 else "<1e-300"  # 0.0 only when the exact p underflowed a float


def shown(prediction: Any) -> str:
    """A prediction as the reports print it; None is a generate-mode output that parsed to no label."""
    return INVALID_SHOWN if prediction is None else str(prediction)


def ordered_pairs(summary: dict[str, Any]) -> list[str]:
    """The summary's pair keys in ``model_pairs`` order (summary.json stores keys sorted), then any others."""
    sig = summary.get("significance") or {}
    known = [f"{b}->{a}" for b, a in model_pairs(model_order(summary))]
    return [k for k in known if k in sig] + sorted(k for k in sig if k not in known)


def _pair_names(key: str, result: dict[str, Any]) -> tuple[str, str]:
    before, _, after = key.partition("->")
    return str(result.get("before") or before), str(result.get("after") or after)


def _pair_delta(summary: dict[str, Any], key: str, split: str, metric: str) -> str:
    """after - before from the pair's deltas; summaries before version 2 have none, so from the models' metrics."""
    result = summary["significance"][key]
    if result.get("deltas"):
        return f"{result['deltas'][split][metric]:+.4f}"
    before, after = _pair_names(key, result)
    models = summary["models"]
    if before in models and after in models:
        return f"{models[after][split][metric] - models[before][split][metric]:+.4f}"
    return ""


PAIRWISE_HEADER = ("comparison", "split", "Δ accuracy", "Δ macro-F1", "fixed", "broken", "McNemar p")


def pairwise_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row per model pair and split: after - before deltas, discordant rows, McNemar's exact p."""
    rows = []
    for key in ordered_pairs(summary):
        result = summary["significance"][key]
        for split in SIGNIFICANCE_SPLITS:
            test = result[split]
            rows.append([key, split, _pair_delta(summary, key, split, "accuracy"), _pair_delta(summary, key, split, "macro_f1"),
                         str(test["fixed"]), str(test["broken"]), format_p(test["p_value"])])
    return rows


def flip_pair(summary: dict[str, Any]) -> str | None:
    """The pair whose flipped rows the reports list: base->augmented, the loop's result, when both were evaluated."""
    pairs = ordered_pairs(summary)
    return "base->augmented" if "base->augmented" in pairs else (pairs[0] if pairs else None)


def flip_section(summary: dict[str, Any]) -> tuple[str, str, str, dict[str, Any], list[dict[str, Any]]] | None:
    """(pair key, before, after, test McNemar result, flipped test rows) for the reports' flip list, or None."""
    key = flip_pair(summary)
    if key is None:
        return None
    result = summary["significance"][key]
    before, after = _pair_names(key, result)
    return key, before, after, result["test"], result.get("test_flips") or []


def _flip_cells(flip: dict[str, Any]) -> list[str]:
    text = flip.get("text")
    return [str(flip["change"]), str(flip["id"]), "" if text is None else str(text), str(flip["label"]),
            shown(flip["before"]), shown(flip["after"])]


def _md_cell(value: str) -> str:
    """Table-safe Markdown: no line breaks, no cell separators, no raw HTML."""
    return html.escape(" ".join(value.split()), quote=False).replace("|", "\\|")


def _augmentation_lines(summary: dict[str, Any]) -> list[str]:
    augmented_data = (summary.get("data") or {}).get("augmented") or {}
    aug = augmented_data.get("augmentation")
    rounds = augmented_data.get("augmentation_rounds") or ([aug] if aug else [])
    stopped = augmented_data.get("loop_stopped")
    if not (rounds or stopped):
        return []
    lines = []
    for r in rounds:
        removed = {k: v for k, v in (r.get("removed") or {}).items() if v}
        confusions = ", ".join(f"{k} x{v}" for k, v in list(r["confusions"].items())[:5]) or "none"
        lines.append(
            f"- round {r.get('round', 1)}: errors mined {r['errors_mined']} (train/dev only; test is never mined), "
            f"rephrasings generated {r['generated']}, added {r['added']}, removed {removed or 'none'}; "
            f"top confusions (true->predicted): {confusions}"
        )
    if stopped:
        lines.append(f"- loop stopped in round {stopped['round']}: {stopped['reason']}")
    lines.append("- the augmented model trained on rephrasings of mined dev rows, so its dev score is optimistic; compare on test.")
    return lines


def _data_lines(summary: dict[str, Any]) -> list[str]:
    base = (summary.get("data") or {}).get("base")
    if not base:
        return []
    return [f"- rows per split: {base['rows']}; groups per split: {base['groups']}",
            f"- groups shared between splits (leakage check): {base['group_overlap']}"]


def render_markdown(summary: dict[str, Any]) -> str:
    header = comparison_header(summary)
    lines = [
        f"# ftloop run `{summary.get('run_name', '')}`",
        "",
        f"Models: {', '.join(f'`{m}`' for m in model_order(summary))}. Labels: {', '.join(summary.get('labels') or [])}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(summary)]
    lines += ["", "## Test split: 95% bootstrap intervals, calibration, invalid outputs, speed", "",
              "| " + " | ".join(TEST_DETAIL_HEADER) + " |", "|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in test_detail_rows(summary)]
    if summary.get("significance"):
        lines += ["", "## Pairwise comparisons (McNemar's exact test, paired on the same rows)", "",
                  "Δ = after - before; fixed = rows wrong before and right after, broken = the reverse.", "",
                  "| " + " | ".join(PAIRWISE_HEADER) + " |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(row) + " |" for row in pairwise_rows(summary)]
    section = flip_section(summary)
    if section is not None:
        key, before, after, test, flips = section
        lines += ["", f"## Test rows that flipped: {before} -> {after}", "",
                  f"{test['fixed']} fixed, {test['broken']} broken, McNemar p = {format_p(test['p_value'])}."]
        if flips:
            lines += ["", f"| change | id | question | label | {_md_cell(before)} | {_md_cell(after)} |", "|---|---|---|---|---|---|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in _flip_cells(f)) + " |" for f in flips[:MARKDOWN_FLIPS]]
            if len(flips) > MARKDOWN_FLIPS:
                lines += ["", f"... and {len(flips) - MARKDOWN_FLIPS} more (all in summary.json: "
                              f"`significance` > `{key}` > `test_flips`)."]
    augmentation = _augmentation_lines(summary)
    if augmentation:
        lines += ["", "## Augmentation", "", *augmentation]
    data = _data_lines(summary)
    if data:
        lines += ["", "## Data", "", *data]
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_heatmap_png(matrix: list[list[int]], labels: list[str], title: str) -> str:
    """Base64 PNG of a confusion matrix heatmap (rows true, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.asarray(matrix)
    size = 1.6 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = data.max() if data.size else 0
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, str(data[i, j]), ha="center", va="center", color="white" if data[i, j] > peak / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def per_class_f1_png(summary: dict[str, Any], split: str = "test") -> str:
    """Base64 PNG: grouped bars of per-class F1 for every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = summary.get("labels") or []
    names = model_order(summary)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 3.6))
    for k, name in enumerate(names):
        per_class = summary["models"][name][split].get("per_class") or {}
        ax.bar(x + k * width, [per_class.get(l, {}).get("f1", 0.0) for l in labels], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"{split} F1")
    ax.legend(fontsize="small", ncols=len(names))
    return _png(fig)


def _html_table(header: Sequence[str], rows: list[list[str]]) -> str:
    esc = html.escape
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def render_html(summary: dict[str, Any]) -> str:
    esc = html.escape
    table = _html_table(comparison_header(summary), comparison_rows(summary))
    detail = _html_table(TEST_DETAIL_HEADER, test_detail_rows(summary))
    labels = summary.get("labels") or []
    heatmaps = ""
    for name in model_order(summary):
        cm = summary["models"][name]["test"].get("confusion_matrix")
        if cm:
            png = confusion_heatmap_png(cm, labels, f"{name}: test confusion matrix")
            heatmaps += f"<img class='heatmap' alt='{esc(name)} test confusion matrix' src='data:image/png;base64,{png}'>"
    chart = f"<img class='per-class' alt='per-class F1 on test' src='data:image/png;base64,{per_class_f1_png(summary)}'>"
    pairwise = ""
    if summary.get("significance"):
        pairwise = ("<p>Δ = after - before; fixed = rows wrong before and right after, broken = the reverse.</p>"
                    + _html_table(PAIRWISE_HEADER, pairwise_rows(summary)))
    flips = ""
    section = flip_section(summary)
    if section is not None:
        key, before, after, test, rows = section
        flips = f"<h3>{esc(key)}: {test['fixed']} fixed, {test['broken']} broken, McNemar p = {esc(format_p(test['p_value']))}</h3>"
        if rows:
            flips += ("<table><tr><th>change</th><th>id</th><th>question</th><th>label</th>"
                      f"<th>{esc(before)}</th><th>{esc(after)}</th></tr>")
            for flip in rows[:HTML_FLIPS]:
                change, row_id, text, label, was, now = (esc(c) for c in _flip_cells(flip))
                flips += (f"<tr><td>{change}</td><td>{row_id}</td><td style='text-align:left'>{text}</td>"
                          f"<td>{label}</td><td>{was}</td><td>{now}</td></tr>")
            flips += "</table>"
            if len(rows) > HTML_FLIPS:
                flips += f"<p>... and {len(rows) - HTML_FLIPS} more (all in summary.json: significance &gt; {esc(key)} &gt; test_flips).</p>"
    notes = esc("\n".join(_augmentation_lines(summary)))
    data = esc("\n".join(_data_lines(summary)))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ftloop report</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}img{margin:0.5em}"
        "</style></head><body>"
        f"<h1>ftloop run {esc(str(summary.get('run_name', '')))}</h1>"
        f"<h2>Models on the same rows</h2>{table}"
        f"<h2>Test split: 95% bootstrap intervals, calibration, invalid outputs, speed</h2>{detail}"
        + (f"<h2>Pairwise comparisons (McNemar's exact test, paired on the same rows)</h2>{pairwise}" if pairwise else "")
        + f"<h2>Per-class F1 (test)</h2>{chart}"
        f"<h2>Confusion matrices (test)</h2>{heatmaps}"
        + (f"<h2>What changed (test rows that flipped)</h2>{flips}" if flips else "")
        + (f"<h2>Augmentation</h2><pre>{notes}</pre>" if notes else "")
        + (f"<h2>Data</h2><pre>{data}</pre>" if data else "")
        + "</body></html>\n"
    )


def write_reports(summary: dict[str, Any], *paths_md_html: tuple[Path, Path]) -> None:
    markdown, page = render_markdown(summary), render_html(summary)
    for md_path, html_path in paths_md_html:
        for path, text in ((Path(md_path), markdown), (Path(html_path), page)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


def run_compare(
    eval_dirs: dict[str, str | Path],
    split_dirs: dict[str, str | Path],
    bundle_dir: str | Path,
    markdown_path: str | Path,
    html_path: str | Path,
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """Stage entry point: writes the run bundle (summary + predictions + reports) and the two report artifacts.

    Everything is read, checked and rendered before the first file is written, so a bad input leaves no bundle behind.
    """
    summary = summarize(eval_dirs, split_dirs, run_info)
    markdown, page = render_markdown(summary), render_html(summary)
    write_bundle(summary, eval_dirs, bundle_dir)
    for md_path, page_path in ((Path(bundle_dir) / "report.md", Path(bundle_dir) / "report.html"), (markdown_path, html_path)):
        for path, text in ((Path(md_path), markdown), (Path(page_path), page)):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return summary


_EXPECTED = {
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list), "a list"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "integer": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "any": (lambda v: True, "a value"),
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    for expected in ("object", "list", "string", "number"):
        ok, name = _EXPECTED[expected]
        if ok(value):
            return name
    return type(value).__name__


def check_summary(summary: Any, path: Path) -> None:
    """Check everything the reports read, before any is written: a foreign or hand-edited summary.json fails
    with the JSON path of the first problem (``models.base.train.accuracy``) instead of a KeyError halfway through.
    """

    def fail(where: str, problem: str) -> None:
        raise FtloopError(f"{path}: field '{where}': {problem}; not an ftloop summary")

    def check(value: Any, where: str, expected: str) -> Any:
        ok, name = _EXPECTED[expected]
        if not ok(value):
            fail(where, f"expected {name}, got {_json_type(value)}")
        return value

    def field(parent: dict, key: str, where: str, expected: str, optional: bool = False) -> Any:
        here = f"{where}.{key}" if where else key
        if key not in parent or (optional and parent[key] is None):
            if not optional:
                fail(here, "missing")
            return None
        return check(parent[key], here, expected)

    if not isinstance(summary, dict):
        raise FtloopError(f"{path}: the top level is not a JSON object; not an ftloop summary")
    labels = field(summary, "labels", "", "list", optional=True) or []
    for i, label in enumerate(labels):
        check(label, f"labels[{i}]", "string")
    models = field(summary, "models", "", "object")
    if not models:
        fail("models", "empty")
    for name, model in models.items():
        check(model, f"models.{name}", "object")
        for split in SPLITS:
            where = f"models.{name}.{split}"
            entry = field(model, split, f"models.{name}", "object")
            for metric in HEADLINE_METRICS:
                field(entry, metric, where, "number")
            for metric in ("ece", "invalid_rate", "rows_per_second"):
                field(entry, metric, where, "number", optional=True)
            for metric, bounds in (field(entry, "ci95", where, "object", optional=True) or {}).items():
                here = f"{where}.ci95.{metric}"
                if not (isinstance(bounds, list) and len(bounds) == 2 and all(_EXPECTED["number"][0](b) for b in bounds)):
                    fail(here, f"expected [low, high], got {_json_type(bounds)}")
            for label, scores in (field(entry, "per_class", where, "object", optional=True) or {}).items():
                field(check(scores, f"{where}.per_class.{label}", "object"), "f1", f"{where}.per_class.{label}", "number",
                      optional=True)
            matrix = field(entry, "confusion_matrix", where, "list", optional=True)
            n = len(labels) or len(matrix or [])
            if matrix and (len(matrix) != n or not all(
                    isinstance(row, list) and len(row) == n and all(_EXPECTED["number"][0](x) for x in row) for row in matrix)):
                fail(f"{where}.confusion_matrix", f"expected {n} rows of {n} numbers, one per label")
    if summary.get("deltas"):
        deltas = field(summary, "deltas", "", "object")
        for split in SPLITS:
            entry = field(deltas, split, "deltas", "object")
            for metric in HEADLINE_METRICS:
                field(entry, metric, f"deltas.{split}", "number")
    significance = field(summary, "significance", "", "object", optional=True) or {}
    for key, result in significance.items():
        where = f"significance.{key}"
        check(result, where, "object")
        for split in SIGNIFICANCE_SPLITS:
            test = field(result, split, where, "object")
            field(test, "fixed", f"{where}.{split}", "integer")
            field(test, "broken", f"{where}.{split}", "integer")
            field(test, "p_value", f"{where}.{split}", "number")
        if result.get("deltas"):
            pair_deltas = field(result, "deltas", where, "object")
            for split in SIGNIFICANCE_SPLITS:
                entry = field(pair_deltas, split, f"{where}.deltas", "object")
                for metric in ("accuracy", "macro_f1"):
                    field(entry, metric, f"{where}.deltas.{split}", "number")
        for i, flip in enumerate(field(result, "test_flips", where, "list", optional=True) or []):
            check(flip, f"{where}.test_flips[{i}]", "object")
            for name in ("change", "id", "label", "before", "after"):
                field(flip, name, f"{where}.test_flips[{i}]", "any")
    data = field(summary, "data", "", "object", optional=True) or {}
    augmented = field(data, "augmented", "data", "object", optional=True) or {}
    rounds = [(f"data.augmented.augmentation_rounds[{i}]", r)
              for i, r in enumerate(field(augmented, "augmentation_rounds", "data.augmented", "list", optional=True) or [])]
    if field(augmented, "augmentation", "data.augmented", "object", optional=True):
        rounds.append(("data.augmented.augmentation", augmented["augmentation"]))
    for where, r in rounds:
        check(r, where, "object")
        for name in ("errors_mined", "generated", "added"):
            field(r, name, where, "any")
        field(r, "confusions", where, "object")
        field(r, "removed", where, "object", optional=True)
    stopped = field(augmented, "loop_stopped", "data.augmented", "object", optional=True)
    if stopped:
        for name in ("round", "reason"):
            field(stopped, name, "data.augmented.loop_stopped", "any")
    base = field(data, "base", "data", "object", optional=True)
    if base:
        for name in ("rows", "groups", "group_overlap"):
            field(base, name, "data.base", "any")


def rerender_reports(run_dir: str | Path) -> tuple[Path, Path]:
    """``ftloop report``: rebuild report.md/report.html of a finished run from its summary.json."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.exists():
        raise FtloopError(f"{path}: not found; is {run_dir} the work directory of a finished run?")
    summary = read_json(path)
    check_summary(summary, path)
    md, page = run_dir / "report.md", run_dir / "report.html"
    write_reports(summary, (md, page))
    return md, page
