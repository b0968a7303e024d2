"""The ftloop pipeline: generate -> split -> format -> fine-tune -> evaluate -> N x (augment -> fine-tune -> evaluate) -> compare.

N is ``augment.rounds``; 0 turns augmentation off (no round, no final selection: base and the baselines are compared).

The graph is built from a run config. Compile-time choices (data source kind, number of
rounds, backends, every setting not in ``RUNTIME_FIELDS``) shape it and reach each task as
a JSON constant holding only the part of the config that stage reads (``RunConfig.slice``,
``STAGE_SECTIONS`` in ``components/config.py``). The settings a user tunes per run
(``RUNTIME_FIELDS``: base model, learning rate, epochs, LoRA rank, ...) are typed pipeline
parameters with the config's values as defaults, passed to just the tasks that read them;
so KFP's cache is per stage, and the run form and the Compare page show them. What each task
needs to run where the pipeline runs (images, GPUs, caching, retries, secrets) is the
placement's business (``placement.py``); the augmentation rounds are ``loop.py``'s.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

from kfp import dsl
from kfp.dsl import Artifact, Dataset

from ftloop.components import kfp_components as c
from ftloop.components.config import RUNTIME_FIELDS, RunConfig, param_name, runtime_field_type
from ftloop.pipelines.loop import RoundOutputs, augmentation_rounds
from ftloop.pipelines.placement import placement_for

DESCRIPTION = "ftloop: generate, split, format, LoRA fine-tune, evaluate, augment from errors, retrain, compare."
SOURCE_PARAMETER = "source_uri"


def stage_arguments(config: RunConfig, parameters: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    """``args(stage)``: a stage's config slice and the run parameters inside it, as task arguments."""

    def args(stage: str) -> dict[str, Any]:
        text = config.slice(stage)
        return {"config_slice": text, **{param_name(f): parameters[param_name(f)] for f in json.loads(text)["runtime"]}}

    return args


def pipeline_signature(config: RunConfig, source_default: str | None) -> inspect.Signature:
    """``source_uri`` (required when None) and one typed parameter per runtime field, defaulting to the config's value."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    source = inspect.Parameter(
        SOURCE_PARAMETER, kind, annotation=str, default=inspect.Parameter.empty if source_default is None else source_default
    )
    values = config.runtime_values()
    typed = [
        inspect.Parameter(param_name(f), kind, annotation=runtime_field_type(f), default=values[param_name(f)]) for f in RUNTIME_FIELDS
    ]
    return inspect.Signature([source, *typed], return_annotation=Artifact)


PARAMETER_DOCS = "\n".join(
    [f"{DESCRIPTION}\n\nArgs:", f"    {SOURCE_PARAMETER}: URI of the articles or labeled-questions file (gs://...)."]
    + [f"    {param_name(f)}: run config {f}" + (" ('' for none)" if f == "model.revision" else "") for f in RUNTIME_FIELDS]
)


def build_pipeline(config: RunConfig, for_cluster: bool = False, source_sha256: str | None = None, use_cache: bool = True) -> Callable:
    """Return the ``@dsl.pipeline`` for this config (cluster settings only when compiling for a cluster).

    ``source_sha256`` (local runs) keys the local cache to the source file's content, not just its
    path; every task's key chains its config slice, run parameters, upstream keys and the ftloop
    code (``placement.local_cache_key``), so an edited file or setting reruns exactly what depends on it.
    """
    place = placement_for(config, for_cluster, source_sha256, use_cache)

    def graph(parameters: dict[str, Any]) -> Artifact:
        args = stage_arguments(config, parameters)
        # 1. Generate questions from labeled articles, or import labeled questions.
        source = dsl.importer(artifact_uri=parameters[SOURCE_PARAMETER], artifact_class=Dataset, reimport=False)
        place.source(source, "source data")
        examples = c.prepare_examples(source=source.output, **args("prepare_examples"))
        if config.data.articles:
            place.generation(examples, "generate questions", config.generate.backend)
        else:
            place.data(place.cpu(examples, "import questions"))

        # 2-3. Split (grouped by article, stratified by label) and format as chat rows.
        splits = place.data(place.cpu(c.split_examples(examples=examples.output, **args("split_examples")), "split (grouped, stratified)"))
        formatted = place.data(place.cpu(c.format_chat(splits=splits.output, **args("format_chat")), "format chat data"))

        # Baselines on the same rows: what a fine-tune has to beat. Like `evaluate`, each logs the same
        # <split>_<metric> scalars and the test confusion matrix.
        tfidf = place.data(
            place.cpu(c.tfidf_baseline(formatted=formatted.output, **args("tfidf_baseline")), "baseline: TF-IDF + logistic regression")
        )
        zero_shot = place.training(
            place.gpu(c.evaluate_zero_shot(formatted=formatted.output, **args("evaluate_zero_shot")), "baseline: zero-shot base model")
        )

        # 4-5. Fine-tune the base model and evaluate it.
        base_model = place.training(place.gpu(c.finetune(formatted=formatted.output, **args("finetune")), "fine-tune base"))
        base_eval = place.training(
            place.gpu(
                c.evaluate(model_name="base", model=base_model.output, formatted=formatted.output, **args("evaluate")),
                "evaluate base",
            )
        )

        # 6-7. `augment.rounds` rounds of augment-from-errors -> fine-tune -> evaluate, each able to stop the loop.
        # `augment.rounds: 0` turns augmentation off: no round and no selection, and the comparison below gets
        # no augmented model (its augmented_* inputs are optional; summary.json then has base and the baselines).
        augmented: dict[str, Any] = {}
        if config.augment.rounds:
            base = RoundOutputs(model=base_model.output, evaluation=base_eval.outputs["results"], splits=splits.output)
            last, previous = augmentation_rounds(config, place, args, formatted.output, base)

            # The rule between rounds, applied once more after the last one: a last round that lowered
            # dev macro-F1 is not the final model.
            final = place.data(
                place.cpu(
                    c.select_final_model(
                        model=last.model,
                        evaluation=last.evaluation,
                        splits=last.splits,
                        reference_model=previous.model,
                        reference_evaluation=previous.evaluation,
                        reference_splits=previous.splits,
                        **args("select_final_model"),
                    ),
                    "keep the better of the last two rounds",
                )
            )
            augmented = {"augmented_evaluation": final.outputs["kept_evaluation"], "augmented_splits": final.outputs["kept_splits"]}

        # 8. Compare: summary.json and the reports; its Metrics output puts every model's scalars
        # (<model>_<split>_<metric>) on this one task, so the KFP Compare page lines runs up on the final
        # augmented model whichever round produced it. Not cached locally (fresh reports each run).
        comparison = place.cpu(
            c.compare_models(
                base_evaluation=base_eval.outputs["results"],
                tfidf_evaluation=tfidf.outputs["results"],
                zero_shot_evaluation=zero_shot.outputs["results"],
                base_splits=splits.output,
                **augmented,
                source_uri=parameters[SOURCE_PARAMETER],
                **args("compare_models"),
            ),
            "compare models",
        )

        # Optionally, both evaluations to Okareo (the base model's alone with augmentation off).
        if config.generators.okareo.upload_eval:
            augmented_eval = {"augmented_evaluation": augmented["augmented_evaluation"]} if augmented else {}
            place.generation(
                c.upload_to_okareo(base_evaluation=base_eval.outputs["results"], **augmented_eval, **args("upload_to_okareo")),
                "upload evaluation to Okareo",
                "okareo",
            )
        return comparison.outputs["results"]

    # Without a default (a cluster pipeline compiled from a local data path), source_uri is a
    # required run parameter: ftloop submit passes a gs:// URI.
    signature = pipeline_signature(config, place.source_default(config.data.source_path))

    def ftloop_pipeline(*args: Any, **kwargs: Any) -> Artifact:
        return graph(dict(signature.bind(*args, **kwargs).arguments))

    ftloop_pipeline.__signature__ = signature  # type: ignore[attr-defined]
    ftloop_pipeline.__doc__ = PARAMETER_DOCS  # the parameters' descriptions in the KFP run form
    return dsl.pipeline(name=config.name, description=DESCRIPTION, pipeline_root=place.pipeline_root)(ftloop_pipeline)
