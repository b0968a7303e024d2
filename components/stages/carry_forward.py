"""Stage `carry_forward`: the loop stopped; pass the kept model and its evaluation on unchanged."""

from __future__ import annotations

import shutil

from ftloop.components.artifacts import RoundArtifacts
from ftloop.components.stages.augment_from_errors import STOP_KEEP_CURRENT, STOP_KEEP_REFERENCE


def run(decision: str, current: RoundArtifacts, reference: RoundArtifacts, out: RoundArtifacts) -> str:
    """When the loop stops: copy the kept (model, evaluation) to the round's outputs; returns which was kept."""
    if decision not in (STOP_KEEP_CURRENT, STOP_KEEP_REFERENCE):
        raise ValueError(f"carry_forward runs only when the loop stops, got decision {decision!r}")
    chosen = reference if decision == STOP_KEEP_REFERENCE else current
    for src, dst in ((chosen.model, out.model), (chosen.evaluation, out.evaluation)):
        shutil.copytree(src, dst, dirs_exist_ok=True)
    return "reference" if decision == STOP_KEEP_REFERENCE else "current"
