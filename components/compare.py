"""Compare models evaluated on the same rows: summary.json plus Markdown and HTML reports.

The summary is the machine-readable result of a run; the reports are for
people (the KFP UI renders both artifact types).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from ftloop.components.records import SPLITS, read_json, read_jsonl, write_json
from ftloop.components.stats import bootstrap_ci, mcnemar_exact

HEADLINE_METRICS = ("accuracy", "macro_f1", "weighted_f1")
MODEL_ORDER = ("base", "augmented", "tfidf", "zero-shot")
# (before, after) pairs tested for a significant difference on the same rows.
PAIRS = (("base", "augmented"), ("tfidf", "base"), ("zero-shot", "base"))
SUMMARY_VERSION = 1


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def build_summary(
    eval_dirs: dict[str, str | Path],
    split_dirs: dict[str, str | Path],
    out_dir: str | Path,
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """Copy every model's predictions into ``out_dir`` and describe the run in one JSON object."""
    out = Path(out_dir)
    models: dict[str, Any] = {}
    labels: list[str] | None = None
    for name, eval_dir in eval_dirs.items():
        metrics = _load_json(Path(eval_dir) / "metrics.json")
        models[name] = {}
        for split in SPLITS:
            rel = Path("predictions") / name / f"{split}.jsonl"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(eval_dir) / "predictions" / f"{split}.jsonl", out / rel)
            m = metrics[split]
            labels = labels or m.get("labels")
            models[name][split] = {
                **{k: m[k] for k in ("accuracy", "macro_f1", "weighted_f1", "n")},
                **{k: m[k] for k in ("macro_precision", "macro_recall", "weighted_precision", "weighted_recall",
                                     "ece", "invalid_rate", "rows_per_second", "mean_batch_seconds") if k in m},
                "per_class": m.get("per_class"),
                "confusion_matrix": m.get("confusion_matrix"),
                "predictions": rel.as_posix(),
            }
    data = {name: _load_json(Path(d) / "report.json") for name, d in split_dirs.items()}
    seed = int(run_info.get("seed", 0))
    predictions = {name: {s: read_jsonl(out / models[name][s]["predictions"]) for s in SPLITS} for name in models}
    for name in models:
        for split in SPLITS:
            rows = predictions[name][split]
            ci = bootstrap_ci([r["label"] for r in rows], [r["prediction"] for r in rows], labels or [], seed=seed)
            models[name][split]["ci95"] = {k: list(v) for k, v in ci.items()}
    summary = {
        "summary_version": SUMMARY_VERSION,
        **run_info,
        "labels": labels,
        "models": models,
        "deltas": deltas(models, "base", "augmented") if {"base", "augmented"} <= set(models) else {},
        "significance": significance(predictions),
        "data": data,
    }
    write_json(out / "summary.json", summary)
    return summary


def significance(predictions: dict[str, dict[str, list[dict]]]) -> dict[str, Any]:
    """McNemar's exact test per model pair and split, plus the test rows that flipped."""
    out: dict[str, Any] = {}
    for before, after in PAIRS:
        if before not in predictions or after not in predictions:
            continue
        pair: dict[str, Any] = {}
        for split in SPLITS:
            a = {r["id"]: r for r in predictions[before][split]}
            b = {r["id"]: r for r in predictions[after][split]}
            if a.keys() != b.keys():
                raise ValueError(f"{before} and {after} were evaluated on different {split} rows")
            ids = sorted(a)
            pair[split] = mcnemar_exact([a[i]["correct"] for i in ids], [b[i]["correct"] for i in ids])
            if split == "test":
                pair["test_flips"] = [
                    {"id": i, "text": a[i]["text"], "label": a[i]["label"], "before": a[i]["prediction"],
                     "after": b[i]["prediction"], "change": "fixed" if b[i]["correct"] else "broken"}
                    for i in ids if a[i]["correct"] != b[i]["correct"]
                ]
        out[f"{before}->{after}"] = pair
    return out


def deltas(models: dict[str, Any], before: str, after: str) -> dict[str, dict[str, float]]:
    return {
        split: {k: models[after][split][k] - models[before][split][k] for k in HEADLINE_METRICS}
        for split in SPLITS
    }


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


def render_text_table(summary: dict[str, Any]) -> str:
    header = comparison_header(summary)
    rows = comparison_rows(summary)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _augmentation(summary: dict[str, Any]) -> dict[str, Any] | None:
    return summary.get("data", {}).get("augmented", {}).get("augmentation")


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
    sig = summary.get("significance") or {}
    if sig:
        lines += ["", "## Significance (McNemar's exact test, paired on the same rows)", "",
                  "| comparison | split | fixed | broken | p-value |", "|---|---|---:|---:|---:|"]
        for pair, result in sig.items():
            for split in ("dev", "test"):
                r = result[split]
                lines.append(f"| {pair} | {split} | {r['fixed']} | {r['broken']} | {r['p_value']:.4f} |")
    augmented_data = summary.get("data", {}).get("augmented") or {}
    aug = _augmentation(summary)
    rounds = augmented_data.get("augmentation_rounds") or ([aug] if aug else [])
    stopped = augmented_data.get("loop_stopped")
    if rounds or stopped:
        lines += ["", "## Augmentation", ""]
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
    base = summary.get("data", {}).get("base")
    if base:
        lines += [
            "",
            "## Data",
            "",
            f"- rows per split: {base['rows']}; groups per split: {base['groups']}",
            f"- groups shared between splits (leakage check): {base['group_overlap']}",
        ]
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


def render_html(summary: dict[str, Any]) -> str:
    esc = html.escape
    header = comparison_header(summary)
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    for row in comparison_rows(summary):
        table += "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
    table += "</table>"
    labels = summary.get("labels") or []
    heatmaps = ""
    for name in model_order(summary):
        cm = summary["models"][name]["test"].get("confusion_matrix")
        if cm:
            png = confusion_heatmap_png(cm, labels, f"{name}: test confusion matrix")
            heatmaps += f"<img class='heatmap' alt='{esc(name)} test confusion matrix' src='data:image/png;base64,{png}'>"
    chart = f"<img class='per-class' alt='per-class F1 on test' src='data:image/png;base64,{per_class_f1_png(summary)}'>"
    flips = ""
    for pair, result in (summary.get("significance") or {}).items():
        rows = result.get("test_flips", [])
        test = result["test"]
        flips += (
            f"<h3>{esc(pair)}: {test['fixed']} fixed, {test['broken']} broken, McNemar p = {test['p_value']:.4f}</h3>"
        )
        if pair == "base->augmented" and rows:
            flips += "<table><tr><th>change</th><th>id</th><th>question</th><th>label</th><th>before</th><th>after</th></tr>"
            flips += "".join(
                f"<tr><td>{esc(r['change'])}</td><td>{esc(r['id'])}</td><td style='text-align:left'>{esc(r['text'])}</td>"
                f"<td>{esc(r['label'])}</td><td>{esc(r['before'])}</td><td>{esc(r['after'])}</td></tr>"
                for r in rows
            )
            flips += "</table>"
    notes = esc(render_markdown(summary).split("## Augmentation", 1)[-1]) if _augmentation(summary) else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ftloop report</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}img{margin:0.5em}"
        "</style></head><body>"
        f"<h1>ftloop run {esc(str(summary.get('run_name', '')))}</h1>"
        f"<h2>Models on the same rows</h2>{table}"
        f"<h2>Per-class F1 (test)</h2>{chart}"
        f"<h2>Confusion matrices (test)</h2>{heatmaps}"
        f"<h2>What changed (test rows that flipped)</h2>{flips}"
        + (f"<h2>Augmentation</h2><pre>{notes}</pre>" if notes else "")
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
    """Stage entry point: writes the run bundle (summary + predictions + reports) and the two report artifacts."""
    summary = build_summary(eval_dirs, split_dirs, bundle_dir, run_info)
    write_reports(summary, (Path(bundle_dir) / "report.md", Path(bundle_dir) / "report.html"), (markdown_path, html_path))
    return summary


def rerender_reports(run_dir: str | Path) -> tuple[Path, Path]:
    """``ftloop report``: rebuild report.md/report.html of a finished run from its summary.json."""
    from ftloop.components.errors import FtloopError

    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.exists():
        raise FtloopError(f"{path}: not found; is {run_dir} the work directory of a finished run?")
    summary = read_json(path)
    if not isinstance(summary, dict) or not isinstance(summary.get("models"), dict) or not summary["models"]:
        raise FtloopError(f"{path}: field 'models': missing or empty; not an ftloop summary")
    md, page = run_dir / "report.md", run_dir / "report.html"
    write_reports(summary, (md, page))
    return md, page
