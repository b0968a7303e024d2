"""Error-driven augmentation: rephrase what the model got wrong, filtered, into the train split.

One round: mine the current model's misclassified train and dev rows (never
test: mining test would turn the test score into a training signal), rephrase
each conditioned on its confusion (true vs predicted label), run the quality
and duplicate filters (components/filters.py), keep a rephrasing only if a
judge (the TF-IDF baseline fitted on train, or the current fine-tuned model)
gives its intended label the top score by ``label_margin``, cap additions per
class, and append the rest to train.

The round also decides whether the loop goes on (``decide``): it stops when
there are no errors left, when the last round did not improve dev macro-F1
over the round before it, or when no rephrasing survived the filters.

Rephrasings keep their parent's group, so a mined dev question's rephrasings
make the augmented model's dev score optimistic (and the improvement check
generous); the report says so and test remains the honest number.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ftloop.components.config import RunConfig
from ftloop.components.filters import filter_rows, summarize_counts
from ftloop.components.generate import make_generator
from ftloop.components.records import Example, read_json, read_jsonl
from ftloop.components.split import read_splits, write_splits

MINED_SPLITS = ("train", "dev")
CONTINUE = "continue"
STOP_KEEP_CURRENT = "stop-keep-current"
STOP_KEEP_REFERENCE = "stop-keep-reference"
STOPPED_KEY = "loop_stopped"  # in a splits report.json: the loop stopped in this or an earlier round


def mine_errors(predictions: dict[str, list[dict]]) -> list[dict]:
    """Misclassified rows of the mined splits; refuses to look at test."""
    if "test" in predictions:
        raise ValueError("error mining must never see the test split")
    return [row for split in MINED_SPLITS for row in predictions.get(split, []) if row["prediction"] != row["label"]]


def cap_per_class(rows: list[Example], max_per_class: int) -> tuple[list[Example], int]:
    per_class: Counter = Counter()
    kept = []
    for row in rows:
        if per_class[row.label] < max_per_class:
            per_class[row.label] += 1
            kept.append(row)
    return kept, len(rows) - len(kept)


# ------------------------------------------------------- label consistency


def tfidf_judge(splits: dict[str, list[Example]], labels: list[str], seed: int) -> Callable[[list[str]], list[dict[str, float]]]:
    from ftloop.components.baselines import TfidfClassifier

    train = splits["train"]
    return TfidfClassifier([e.text for e in train], [e.label for e in train], labels, seed).scores


def model_judge(config: RunConfig, model_dir: str | Path, labels: list[str]) -> Callable[[list[str]], list[dict[str, float]]]:
    """The current fine-tuned model, scoring labels exactly as evaluation does."""
    from ftloop.components.evaluate import load_for_inference, read_model_meta, score_labels
    from ftloop.components.prompts import prompt_messages

    recorded = read_model_meta(model_dir)["base_model"]["name_or_path"]
    # Artifacts move between pipeline steps: fall back to the configured base when the recorded path is gone.
    override = config.model.name_or_path if Path(recorded).is_absolute() and not Path(recorded).is_dir() else None
    model, tokenizer = load_for_inference(model_dir, base_model=override)

    def score(texts: list[str]) -> list[dict[str, float]]:
        prompts = [prompt_messages(t, labels, config.format.system_prompt) for t in texts]
        return score_labels(model, tokenizer, prompts, labels, config.eval.batch_size)

    return score


def label_consistent(rows: list[Example], scores: list[dict[str, float]], margin: float) -> list[bool]:
    """Intended label on top, ahead of the runner-up by at least ``margin``."""
    out = []
    for row, s in zip(rows, scores):
        intended = s.get(row.label, 0.0)
        runner_up = max((v for k, v in s.items() if k != row.label), default=0.0)
        out.append(intended - runner_up >= margin and intended >= runner_up)
    return out


# ---------------------------------------------------------------- the round


def dev_macro_f1(eval_dir: str | Path) -> float:
    return float(read_json(Path(eval_dir) / "metrics.json")["dev"]["macro_f1"])


def decide(errors: int, current_dev: float, reference_dev: float | None, min_improvement: float, stopped: bool) -> tuple[str, str]:
    """(decision, reason) before generating anything; ``reference_dev`` is None in round 1."""
    if stopped:
        return STOP_KEEP_CURRENT, "the loop stopped in an earlier round"
    if errors == 0:
        return STOP_KEEP_CURRENT, "no misclassified train/dev rows left"
    if reference_dev is not None and current_dev - reference_dev <= min_improvement:
        return STOP_KEEP_REFERENCE, (
            f"dev macro-F1 did not improve by more than {min_improvement:g} "
            f"({reference_dev:.4f} -> {current_dev:.4f}); keeping the earlier model"
        )
    return CONTINUE, ""


def run_augment(
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
    """Stage entry point: splits + the current model's train/dev predictions -> the splits of this round's result.

    Returns artifact metadata including ``decision`` (CONTINUE or a STOP_*).
    On CONTINUE the output is the splits with an augmented train; on a stop it
    is the kept splits (current, or the reference round's for
    STOP_KEEP_REFERENCE) with ``loop_stopped`` in their report, so every later
    round stops at once.
    """
    a = config.augment
    splits, labels = read_splits(split_dir)
    report = read_json(Path(split_dir) / "report.json")
    previous = report.get("augmentation_rounds", [])
    predictions = {split: read_jsonl(Path(eval_dir) / "predictions" / f"{split}.jsonl") for split in MINED_SPLITS}
    errors = mine_errors(predictions)
    current_dev = dev_macro_f1(eval_dir)
    reference_dev = dev_macro_f1(reference_eval_dir) if reference_eval_dir and round > 1 else None
    stopped = STOPPED_KEY in report
    decision, reason = decide(len(errors), current_dev, reference_dev, a.min_dev_improvement, stopped)

    ids_of = {split: {e.id for e in splits[split]} for split in MINED_SPLITS}
    info: dict[str, Any] = {
        "round": round,
        "errors_mined": {split: sum(1 for r in errors if r["id"] in ids_of[split]) for split in MINED_SPLITS},
        "confusions": dict(Counter(f"{r['label']}->{r['prediction']}" for r in errors).most_common()),
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
        by_id = {e.id: e for split in MINED_SPLITS for e in splits[split]}
        parents = [by_id[row["id"]] for row in errors]
        hint = {row["id"]: row["prediction"] for row in errors}
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
        info.update({
            "generated": len(generated),
            "removed": removed,
            "added": len(kept),
            "added_per_class": dict(sorted(Counter(e.label for e in kept).items())),
            "dev_groups_in_train": len({e.group for e in kept} & {e.group for e in splits["dev"]}),
            "generator_stats": dict(getattr(generator, "stats", {}) or {}),
        })
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
        kept_report = read_json(source / "report.json")
        stop = kept_report.get(STOPPED_KEY) or {"round": round, "decision": decision, "reason": reason}
        extra = {k: v for k, v in kept_report.items() if k in ("augmentation", "seed")}
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


def carry_forward(decision: str, current: tuple[str | Path, str | Path], reference: tuple[str | Path, str | Path],
                  out: tuple[str | Path, str | Path]) -> str:
    """When the loop stops: copy the kept (model, evaluation) to the round's outputs; returns which was kept."""
    if decision not in (STOP_KEEP_CURRENT, STOP_KEEP_REFERENCE):
        raise ValueError(f"carry_forward runs only when the loop stops, got decision {decision!r}")
    chosen = reference if decision == STOP_KEEP_REFERENCE else current
    for src, dst in zip(chosen, out):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    return "reference" if decision == STOP_KEEP_REFERENCE else "current"


def select_final(
    current: tuple[str | Path, str | Path, str | Path],
    reference: tuple[str | Path, str | Path, str | Path],
    out: tuple[str | Path, str | Path, str | Path],
    min_improvement: float,
    rounds: int,
) -> dict[str, Any]:
    """After the last round: keep its (model, evaluation, splits) only if it raised dev macro-F1 over the round before.

    The same rule as between rounds, applied once more, so a last round that
    made things worse is not what ``compare_models`` calls ``augmented``.
    A loop that already stopped keeps what it kept.
    """
    model, eval_dir, split_dir = (Path(x) for x in current)
    report = read_json(split_dir / "report.json")
    keep, reason = "current", ""
    if STOPPED_KEY not in report and current[1] != reference[1]:
        now, before = dev_macro_f1(eval_dir), dev_macro_f1(reference[1])
        if now - before <= min_improvement:
            keep = "reference"
            reason = (f"round {rounds} did not improve dev macro-F1 by more than {min_improvement:g} "
                      f"({before:.4f} -> {now:.4f}); keeping the earlier model")
    chosen = reference if keep == "reference" else current
    for src, dst in zip(chosen[:2], out[:2]):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    kept_splits, labels = read_splits(chosen[2])
    kept_report = read_json(Path(chosen[2]) / "report.json")
    extra = {k: v for k, v in kept_report.items() if k in ("augmentation", "seed", STOPPED_KEY)}
    extra["augmentation_rounds"] = report.get("augmentation_rounds", [])  # every round that ran
    if keep == "reference":
        extra[STOPPED_KEY] = {"round": rounds + 1, "decision": STOP_KEEP_REFERENCE, "reason": reason}
    write_splits(kept_splits, labels, out[2], extra=extra)
    return {"kept": keep, "reason": reason}
