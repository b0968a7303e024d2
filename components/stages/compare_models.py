"""Stage `compare_models`: every model pair on the same rows (McNemar, bootstrap intervals, flips); summary.json and reports."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ftloop.components.artifacts import (
    HEADLINE_METRICS,
    SUMMARY_VERSION,
    PredictionRow,
    bundle_predictions_file,
    check_summary,
    metrics_path,
    predictions_path,
    read_base_model,
    read_metrics,
    read_predictions,
    read_split_report,
    report_html_path,
    report_md_path,
    summary_path,
    write_summary,
)
from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError, InputFileError
from ftloop.components.evaluation.stats import bootstrap_ci, mcnemar_exact
from ftloop.components.records import SPLITS
from ftloop.components.reports.render import render_reports, write_reports
from ftloop.components.reports.tables import _short, model_order, model_pairs


def _as_rows(rows: Sequence[PredictionRow | dict[str, Any]]) -> list[PredictionRow]:
    return [r if isinstance(r, PredictionRow) else PredictionRow.model_validate(r) for r in rows]


def _index_rows(rows: list[PredictionRow], path: Path) -> dict[str, PredictionRow]:
    """Rows by id (``read_predictions`` checked their fields); a repeated id is a user-visible error."""
    by_id: dict[str, PredictionRow] = {}
    for row in rows:
        if row.id in by_id:
            raise InputFileError(
                str(path),
                f"duplicate id {_short(row.id)} (first on line {by_id[row.id].line}); every row must be evaluated exactly once",
                row.line,
                "id",
            )
        by_id[row.id] = row
    return by_id


def check_same_rows(reference: list[PredictionRow], reference_path: Path, rows: list[PredictionRow], path: Path) -> None:
    """Two models are compared row by row, so they must have been evaluated on the same rows: same ids, gold labels and texts."""
    ref, other = _index_rows(reference, reference_path), _index_rows(rows, path)
    where = f"{reference_path} and {path}"
    for row_id, a in ref.items():
        b = other.get(row_id)
        if b is None:
            raise FtloopError(f"{where}: id {_short(row_id)} is only in the first file; the models were not evaluated on the same rows")
        for field in ("label", "text"):
            first, second = getattr(a, field), getattr(b, field)
            if first is not None and second is not None and first != second:
                raise FtloopError(
                    f"{where}: id {_short(row_id)}: field '{field}' differs "
                    f"({_short(first)} vs {_short(second)}); the models were not evaluated on the same rows"
                )
    extra = next((row_id for row_id in other if row_id not in ref), None)
    if extra is not None:
        raise FtloopError(f"{where}: id {_short(extra)} is only in the second file; the models were not evaluated on the same rows")


def _correct(row: PredictionRow) -> bool:
    """Right iff the prediction is the gold label; an invalid (None) prediction is wrong."""
    return row.prediction is not None and row.prediction == row.label


def compare_pair(
    before_rows: dict[str, Sequence[PredictionRow | dict[str, Any]]],
    after_rows: dict[str, Sequence[PredictionRow | dict[str, Any]]],
    before_metrics: dict[str, dict[str, Any]],
    after_metrics: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Two models on the same rows (see ``check_same_rows``), per split: McNemar's exact test and after - before metric deltas,
    plus the test rows that flipped ("fixed": wrong before, right after; "broken": the reverse), in the before model's row order.
    """
    out: dict[str, Any] = {}
    flips: list[dict[str, Any]] = []
    for split in SPLITS:
        before, after = _as_rows(before_rows[split]), _as_rows(after_rows[split])
        after_by_id = {r.id: r for r in after}
        if after_by_id.keys() != {r.id for r in before} or len(after_by_id) != len(before):
            raise ValueError(f"compare_pair: the two models' {split} rows differ; run check_same_rows first")
        paired = [(b, after_by_id[b.id]) for b in before]
        out[split] = mcnemar_exact([_correct(b) for b, _ in paired], [_correct(a) for _, a in paired])
        if split == "test":
            flips = [
                {
                    "id": b.id,
                    "text": b.text,
                    "label": b.label,
                    "before": b.prediction,
                    "after": a.prediction,
                    "change": "fixed" if _correct(a) else "broken",
                }
                for b, a in paired
                if _correct(b) != _correct(a)
            ]
    out["deltas"] = {split: {k: after_metrics[split][k] - before_metrics[split][k] for k in HEADLINE_METRICS} for split in SPLITS}
    out["test_flips"] = flips
    return out


# Whose base model is the run's: the fine-tuned models', else the prompted base model's (the same model, untuned).
RUN_BASE_MODEL_FROM = ("base", "augmented", "zero-shot")


def run_base_model(models: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The run's base model for summary.json's top level: the first of ``RUN_BASE_MODEL_FROM`` that recorded one."""
    for name in RUN_BASE_MODEL_FROM:
        recorded = models.get(name, {}).get("base_model")
        if recorded is not None and recorded.get("source") != "tfidf":
            return recorded
    return None


def summarize(
    eval_dirs: dict[str, str | Path],
    split_dirs: dict[str, str | Path],
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """The run's summary from every model's metrics.json and predictions; reads and checks everything, writes nothing."""
    models: dict[str, Any] = {}
    labels: list[str] | None = None
    labels_from: Path | None = None
    predictions: dict[str, dict[str, list[PredictionRow]]] = {}
    for name, eval_dir in eval_dirs.items():
        metrics = read_metrics(eval_dir)
        models[name] = {}
        predictions[name] = {}
        for split in SPLITS:
            predictions[name][split] = read_predictions(eval_dir, split)
            m = metrics.split(split)
            if labels is None:
                labels, labels_from = m.labels, metrics_path(eval_dir)
            elif m.labels != labels:
                # per-class scores and confusion matrices are indexed by label: different lists cannot share a table
                raise FtloopError(
                    f"{labels_from} and {metrics_path(eval_dir)}: {split}: the label lists differ "
                    f"({labels} vs {m.labels}); the models were not evaluated on the same labels"
                )
            recorded = m.to_json()
            models[name][split] = {
                **{k: recorded[k] for k in ("accuracy", "macro_f1", "weighted_f1", "n")},
                **{
                    k: recorded[k]
                    for k in (
                        "macro_precision",
                        "macro_recall",
                        "weighted_precision",
                        "weighted_recall",
                        "ece",
                        "invalid_rate",
                        "rows_per_second",
                        "mean_batch_seconds",
                    )
                    if k in recorded
                },
                "per_class": recorded.get("per_class"),
                "confusion_matrix": recorded.get("confusion_matrix"),
                "predictions": bundle_predictions_file(name, split),
            }
        provenance = read_base_model(eval_dir)  # None: an evaluation written before base_model.json existed
        if provenance is not None:
            models[name]["base_model"] = provenance.to_json()
    names = list(models)
    if names:
        reference = model_order({"models": models})[0]
        for name in names:
            for split in SPLITS:
                check_same_rows(
                    predictions[reference][split],
                    predictions_path(eval_dirs[reference], split),
                    predictions[name][split],
                    predictions_path(eval_dirs[name], split),
                )
    data = {name: read_split_report(d).to_json() for name, d in split_dirs.items()}
    seed = int(run_info.get("seed", 0))
    for name in models:
        for split in SPLITS:
            rows = predictions[name][split]
            ci = bootstrap_ci([r.label for r in rows], [r.prediction for r in rows], labels or [], seed=seed)
            models[name][split]["ci95"] = {k: list(v) for k, v in ci.items()}
    significance = {
        f"{before}->{after}": {
            "before": before,
            "after": after,
            **compare_pair(predictions[before], predictions[after], models[before], models[after]),
        }
        for before, after in model_pairs(names)
    }
    run_base = run_base_model(models)
    return {
        "summary_version": SUMMARY_VERSION,
        **run_info,
        **({"base_model": run_base} if run_base is not None else {}),
        "labels": labels,
        "models": models,
        # base -> augmented, kept at the top level for the KFP artifact's delta_test_* metadata and older readers;
        # empty without an augmented model (augment.rounds 0: augmentation off)
        "deltas": significance.get("base->augmented", {}).get("deltas", {}),
        "significance": significance,
        "data": data,
    }


def write_bundle(summary: dict[str, Any], eval_dirs: dict[str, str | Path], out_dir: str | Path) -> None:
    out = Path(out_dir)
    for name, eval_dir in eval_dirs.items():
        for split in SPLITS:
            target = out / summary["models"][name][split]["predictions"]
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(predictions_path(eval_dir, split), target)
    write_summary(out, summary)


def check_augmented_model(config: RunConfig, eval_dirs: dict[str, Any], split_dirs: dict[str, Any]) -> None:
    """The loop's final model (``augmented``) is compared exactly when the loop ran: its evaluation and splits with
    ``augment.rounds`` 1-5, neither with 0 (augmentation off). Anything else is the pipeline's wiring, not the user's."""
    expected = config.augment.rounds > 0
    for what, given in (("evaluation", eval_dirs), ("splits", split_dirs)):
        if ("augmented" in given) != expected:
            state = "given" if "augmented" in given else "missing"
            raise ValueError(f"compare_models: the augmented model's {what} is {state} with augment.rounds {config.augment.rounds}")


def run(
    config: RunConfig,
    eval_dirs: dict[str, str | Path],
    split_dirs: dict[str, str | Path],
    bundle_dir: str | Path,
    markdown_path: str | Path,
    html_path: str | Path,
) -> dict[str, Any]:
    """Stage entry point: writes the run bundle (summary + predictions + reports + chart PNGs) and the two report artifacts.

    Everything is read, checked and rendered before the first file is written, so a bad input leaves no bundle behind.
    """
    check_augmented_model(config, eval_dirs, split_dirs)
    run_info = {"run_name": config.name, "seed": config.seed, "config": config.model_dump(mode="json")}
    summary = summarize(eval_dirs, split_dirs, run_info)
    check_summary(summary, summary_path(bundle_dir))  # the contract the reports and `ftloop report` read
    reports = render_reports(summary)
    write_bundle(summary, eval_dirs, bundle_dir)
    write_reports(reports, (report_md_path(bundle_dir), report_html_path(bundle_dir)), (markdown_path, html_path), bundle_dir=bundle_dir)
    return summary
