"""Stage `select_final_model`: after the last round, keep it only if it improved dev macro-F1."""

from __future__ import annotations

import shutil
from typing import Any

from ftloop.components.artifacts import RoundArtifacts, read_split_report
from ftloop.components.config import RunConfig
from ftloop.components.stages.augment_from_errors import STOP_KEEP_REFERENCE, STOPPED_KEY, dev_macro_f1
from ftloop.components.stages.split_examples import read_splits, write_splits


def run(config: RunConfig, current: RoundArtifacts, reference: RoundArtifacts, out: RoundArtifacts) -> dict[str, Any]:
    """After the last round: keep its (model, evaluation, splits) only if it raised dev macro-F1 over the round before.

    The same rule as between rounds, applied once more, so a last round that
    made things worse is not what ``compare_models`` calls ``augmented``.
    A loop that already stopped keeps what it kept.
    """
    min_improvement, rounds = config.augment.min_dev_improvement, config.augment.rounds
    report = read_split_report(current.splits)
    keep, reason = "current", ""
    if report.loop_stopped is None and current.evaluation != reference.evaluation:
        now, before = dev_macro_f1(current.evaluation), dev_macro_f1(reference.evaluation)
        if now - before <= min_improvement:
            keep = "reference"
            reason = (
                f"round {rounds} did not improve dev macro-F1 by more than {min_improvement:g} "
                f"({before:.4f} -> {now:.4f}); keeping the earlier model"
            )
    chosen = reference if keep == "reference" else current
    for src, dst in ((chosen.model, out.model), (chosen.evaluation, out.evaluation)):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    kept_splits, labels = read_splits(chosen.splits)
    kept_report = read_split_report(chosen.splits)
    extra = kept_report.model_dump(mode="json", include={"augmentation", "seed", STOPPED_KEY}, exclude_unset=True)
    extra["augmentation_rounds"] = report.augmentation_rounds  # every round that ran
    if keep == "reference":
        extra[STOPPED_KEY] = {"round": rounds + 1, "decision": STOP_KEEP_REFERENCE, "reason": reason}
    write_splits(kept_splits, labels, out.splits, extra=extra)
    return {"kept": keep, "reason": reason}
