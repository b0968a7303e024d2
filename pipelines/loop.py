"""The error-driven augmentation loop: ``augment.rounds`` rounds, unrolled at compile time.

Each round's augment task decides. On "continue" (``dsl.If``) the round formats its augmented
splits, fine-tunes a new model and evaluates it on the base model's rows; otherwise
(``dsl.Else``) ``carry_forward`` passes the kept model and its evaluation on unchanged, and
every later round stops at once. ``dsl.OneOf`` hands whichever branch ran to the next round.
With ``augment.rounds: 0`` (augmentation off) ``pipeline.py`` builds no round at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from kfp import dsl

from ftloop.components import kfp_components as c
from ftloop.components.config import RunConfig
from ftloop.pipelines.placement import Placement


class RoundOutputs(NamedTuple):
    """What a round hands on: the kept model, its evaluation and the splits it was trained on.

    Each field is a KFP output channel (a task output, or a ``dsl.OneOf`` over a round's branches).
    """

    model: Any
    evaluation: Any
    splits: Any


class LoopOutputs(NamedTuple):
    """The outcome of the last round and of the one before it (the base model's before round 2)."""

    last: RoundOutputs
    previous: RoundOutputs


def augmentation_round(
    r: int,
    config: RunConfig,
    place: Placement,
    args: Callable[[str], dict[str, Any]],
    formatted: Any,
    current: RoundOutputs,
    reference: RoundOutputs,
) -> RoundOutputs:
    """Round ``r``: augment ``current``'s errors and retrain, or stop and keep a model.

    ``reference`` is the previous round's outcome, which the augment task compares ``current``
    against to decide whether the last round helped (and which model a stop keeps).
    ``formatted`` is the base formatted data: every round is evaluated on the same rows.
    ``args(stage)`` gives a stage's config slice and run parameters (``pipeline.stage_arguments``).
    """
    augment = c.augment_from_errors(
        round=r,
        splits=current.splits,
        evaluation=current.evaluation,
        model=current.model,
        reference_splits=reference.splits,
        reference_evaluation=reference.evaluation,
        **args("augment_from_errors"),
    )
    place.generation(augment, f"augment round {r}", config.augment.backend, needs_gpu=config.augment.label_filter == "model")
    with dsl.If(augment.outputs["decision"] == "continue", name=f"round-{r}-continue"):
        round_formatted = place.data(
            place.cpu(c.format_chat(splits=augment.outputs["augmented"], **args("format_chat")), f"format round {r} data")
        )
        round_model = place.training(place.gpu(c.finetune(formatted=round_formatted.output, **args("finetune")), f"fine-tune round {r}"))
        # Same rows as the base evaluation, so the models are compared pairwise.
        round_eval = place.training(
            place.gpu(
                c.evaluate(model_name="augmented", model=round_model.output, formatted=formatted, **args("evaluate")),
                f"evaluate round {r}",
            )
        )
    with dsl.Else(name=f"round-{r}-stop"):
        kept = place.data(
            place.cpu(
                c.carry_forward(
                    decision=augment.outputs["decision"],
                    model=current.model,
                    evaluation=current.evaluation,
                    reference_model=reference.model,
                    reference_evaluation=reference.evaluation,
                ),
                f"round {r}: loop stopped, keep model",
            )
        )
    return RoundOutputs(
        model=dsl.OneOf(round_model.output, kept.outputs["kept_model"]),
        evaluation=dsl.OneOf(round_eval.outputs["results"], kept.outputs["kept_evaluation"]),
        # On a stop the augment task itself writes the kept splits, so no OneOf is needed here.
        splits=augment.outputs["augmented"],
    )


def augmentation_rounds(
    config: RunConfig,
    place: Placement,
    args: Callable[[str], dict[str, Any]],
    formatted: Any,
    base: RoundOutputs,
) -> LoopOutputs:
    """``config.augment.rounds`` rounds starting from the base model; round 1 compares against the base itself."""
    current = reference = base
    for r in range(1, config.augment.rounds + 1):
        current, reference = augmentation_round(r, config, place, args, formatted, current, reference), current
    return LoopOutputs(last=current, previous=reference)
