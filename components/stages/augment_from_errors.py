"""Stage `augment_from_errors`: one loop round. Mine errors, rephrase them, filter, cap, and decide whether to go on."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ftloop.components.artifacts import PredictionRow, read_dev_macro_f1, read_predictions, read_split_report
from ftloop.components.config import RunConfig
from ftloop.components.generators.factory import make_generator
from ftloop.components.generators.filters import filter_rows, summarize_counts
from ftloop.components.records import Example
from ftloop.components.stages.split_examples import read_splits, write_splits

MINED_SPLITS = ("train", "dev")  # the splits that may be mined (augment.mine_splits picks from them); never test


CONTINUE = "continue"


STOP_KEEP_CURRENT = "stop-keep-current"


STOP_KEEP_REFERENCE = "stop-keep-reference"


STOPPED_KEY = "loop_stopped"  # in a splits report.json: the loop stopped in this or an earlier round


Row = TypeVar("Row", PredictionRow, dict)


def _misclassified(row: PredictionRow | dict[str, Any]) -> bool:
    checked = row if isinstance(row, PredictionRow) else PredictionRow.model_validate(row)
    return checked.prediction != checked.label


def mine_errors(predictions: dict[str, list[Row]], splits: Sequence[str] = MINED_SPLITS) -> list[Row]:
    """Misclassified rows of ``splits`` (``augment.mine_splits``), train before dev, from ``predictions`` (as given:
    rows read by ``read_predictions``, or plain dicts); refuses to look at test."""
    if "test" in predictions or "test" in splits:
        raise ValueError("error mining must never see the test split")
    return [row for split in MINED_SPLITS if split in splits for row in predictions.get(split, []) if _misclassified(row)]


def mined_splits(config: RunConfig) -> tuple[str, ...]:
    """The splits this run mines (``augment.mine_splits``), in MINED_SPLITS order."""
    return tuple(split for split in MINED_SPLITS if split in config.augment.mine_splits)


def cap_per_class(rows: list[Example], max_per_class: int) -> tuple[list[Example], int]:
    per_class: Counter = Counter()
    kept = []
    for row in rows:
        if per_class[row.label] < max_per_class:
            per_class[row.label] += 1
            kept.append(row)
    return kept, len(rows) - len(kept)


def tfidf_judge(splits: dict[str, list[Example]], labels: list[str], seed: int) -> Callable[[list[str]], list[dict[str, float]]]:
    from ftloop.components.modeling.tfidf import TfidfClassifier

    train = splits["train"]
    return TfidfClassifier([e.text for e in train], [e.label for e in train], labels, seed).scores


def model_judge(config: RunConfig, model_dir: str | Path, labels: list[str]) -> Callable[[list[str]], list[dict[str, float]]]:
    """The current fine-tuned model, scoring labels exactly as evaluation does."""
    from ftloop.components.artifacts import read_model_meta
    from ftloop.components.modeling.loading import base_model_fallback, load_for_inference
    from ftloop.components.modeling.scoring import score_labels
    from ftloop.components.prompts import prompt_messages

    recorded = read_model_meta(model_dir).base_model.name_or_path
    model, tokenizer = load_for_inference(model_dir, base_model=base_model_fallback(recorded, config.model.name_or_path))

    def score(texts: list[str]) -> list[dict[str, float]]:
        prompts = [prompt_messages(t, labels, config.format.system_prompt) for t in texts]
        return score_labels(model, tokenizer, prompts, labels, config.eval.batch_size, batch_tokens=config.eval.batch_tokens)

    return score


def label_consistent(rows: list[Example], scores: list[dict[str, float]], margin: float) -> list[bool]:
    """Intended label on top, ahead of the runner-up by at least ``margin``."""
    out = []
    for row, s in zip(rows, scores):
        intended = s.get(row.label, 0.0)
        runner_up = max((v for k, v in s.items() if k != row.label), default=0.0)
        out.append(intended - runner_up >= margin and intended >= runner_up)
    return out


def dev_macro_f1(eval_dir: str | Path) -> float:
    return read_dev_macro_f1(eval_dir)


def decide(
    errors: int,
    current_dev: float,
    reference_dev: float | None,
    min_improvement: float,
    stopped: bool,
    mined: Sequence[str] = MINED_SPLITS,
) -> tuple[str, str]:
    """(decision, reason) before generating anything; ``reference_dev`` is None in round 1; ``mined``: the splits mined."""
    if stopped:
        return STOP_KEEP_CURRENT, "the loop stopped in an earlier round"
    if errors == 0:
        return STOP_KEEP_CURRENT, f"no misclassified {'/'.join(mined)} rows left"
    if reference_dev is not None and current_dev - reference_dev <= min_improvement:
        return STOP_KEEP_REFERENCE, (
            f"dev macro-F1 did not improve by more than {min_improvement:g} "
            f"({reference_dev:.4f} -> {current_dev:.4f}); keeping the earlier model"
        )
    return CONTINUE, ""


def run(
    config: RunConfig,
    split_dir: str | Path,
    eval_dir: str | Path,
    out_dir: str | Path,
    round: int = 1,
    reference_eval_dir: str | Path | None = None,
    reference_split_dir: str | Path | None = None,
    model_dir: str | Path | None = None,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Stage entry point: splits + the current model's predictions on the mined splits (``augment.mine_splits``,
    never test) -> the splits of this round's result.

    Returns artifact metadata including ``decision`` (CONTINUE or a STOP_*).
    On CONTINUE the output is the splits with an augmented train; on a stop it
    is the kept splits (current, or the reference round's for
    STOP_KEEP_REFERENCE) with ``loop_stopped`` in their report, so every later
    round stops at once.
    """
    a = config.augment
    splits, labels = read_splits(split_dir)
    report = read_split_report(split_dir)
    previous = report.augmentation_rounds
    mined = mined_splits(config)
    predictions = {split: read_predictions(eval_dir, split) for split in mined}
    errors = mine_errors(predictions, mined)
    current_dev = dev_macro_f1(eval_dir)
    reference_dev = dev_macro_f1(reference_eval_dir) if reference_eval_dir and round > 1 else None
    stopped = report.loop_stopped is not None
    decision, reason = decide(len(errors), current_dev, reference_dev, a.min_dev_improvement, stopped, mined)

    ids_of = {split: {e.id for e in splits[split]} for split in MINED_SPLITS}
    info: dict[str, Any] = {
        "round": round,
        "mine_splits": list(mined),
        # every minable split, 0 for one not mined, so a [train] run shows dev: 0
        "errors_mined": {split: sum(1 for r in errors if r.id in ids_of[split]) for split in MINED_SPLITS},
        "confusions": dict(Counter(f"{r.label}->{r.prediction}" for r in errors).most_common()),
        "dev_macro_f1_before": current_dev,
        "backend": a.backend,
        "label_filter": a.label_filter,
        "generated": 0,
        "removed": {},
        "added": 0,
        "added_per_class": {},
    }
    kept: list[Example] = []
    if decision == CONTINUE:
        by_id = {e.id: e for split in mined for e in splits[split]}
        parents = [by_id[row.id] for row in errors]
        hint = {row.id: row.prediction for row in errors}
        generator = make_generator(a.backend, config, checkpoint_dir=Path(out_dir) / "generation")
        generated = generator.rephrase(parents, a.rephrasings_per_error, hint, round=round)
        progress(f"augment round {round}: {len(errors)} errors mined, {len(generated)} rephrasings from {a.backend}")
        kept, removed = filter_rows(generated, splits, labels, config.filters)
        removed["label_inconsistent"] = 0
        if a.label_filter != "none" and kept:
            if a.label_filter == "tfidf":
                judge = tfidf_judge(splits, labels, config.seed)
            else:
                if model_dir is None:
                    raise ValueError("label_filter 'model' needs the current model")
                judge = model_judge(config, model_dir, labels)
            ok = label_consistent(kept, judge([e.text for e in kept]), a.label_margin)
            removed["label_inconsistent"] = ok.count(False)
            kept = [e for e, good in zip(kept, ok) if good]
        kept, removed["class_cap"] = cap_per_class(kept, a.max_per_class)
        info.update(
            {
                "generated": len(generated),
                "removed": removed,
                "added": len(kept),
                "added_per_class": dict(sorted(Counter(e.label for e in kept).items())),
                "dev_groups_in_train": len({e.group for e in kept} & {e.group for e in splits["dev"]}),
                "generator_stats": dict(getattr(generator, "stats", {}) or {}),
            }
        )
        if not kept:
            decision, reason = STOP_KEEP_CURRENT, "no rephrasing survived the filters"
    info["decision"], info["stop_reason"] = decision, reason
    progress(f"augment round {round}: {decision}" + (f" ({reason})" if reason else f", {len(kept)} rows added"))

    if decision == CONTINUE:
        augmented = {**splits, "train": splits["train"] + kept}
        meta = write_splits(augmented, labels, out_dir, extra={"augmentation": info, "augmentation_rounds": previous + [info]})
    else:
        source = Path(reference_split_dir if decision == STOP_KEEP_REFERENCE and reference_split_dir else split_dir)
        kept_splits, _ = read_splits(source)
        kept_report = read_split_report(source)
        stop = kept_report.loop_stopped.to_json() if kept_report.loop_stopped else {"round": round, "decision": decision, "reason": reason}
        extra = kept_report.model_dump(mode="json", include={"augmentation", "seed"}, exclude_unset=True)
        # The history keeps every round that ran, including one whose model the stop discarded.
        meta = write_splits(kept_splits, labels, out_dir, extra={**extra, "augmentation_rounds": previous, STOPPED_KEY: stop})
    removed_flat = summarize_counts(info["removed"]) if info["removed"] else {"filtered_total": 0}
    return {
        **meta,
        "round": round,
        "decision": decision,
        "stop_reason": reason,
        "errors_mined": len(errors),
        "rows_generated": info["generated"],
        "rows_added": len(kept),
        **removed_flat,
    }
