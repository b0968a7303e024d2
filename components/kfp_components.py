"""Thin KFP wrappers over the stage functions.

Each body imports its stage from the installed ``ftloop`` package (baked into
the image; installed in the local environment for the local runner), so the
compiled YAML carries no logic of its own. Images are set per task at compile
time (``pipelines.placement``), never hard-coded here.

Each task gets ``config_slice``, the compile-time part of the run config its stage reads
(``RunConfig.slice``), and, as typed parameters, the run parameters inside that part;
``RunConfig.from_slice(config_slice, locals())`` rebuilds the RunConfig the stage takes,
picking from the wrapper's arguments exactly the run parameters the slice lists.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

# Overridden per task at compile time with the image skaffold built.
PLACEHOLDER_IMAGE = "ftloop:unset"
_component = dict(base_image=PLACEHOLDER_IMAGE, install_kfp_package=False, packages_to_install=[])


@dsl.component(**_component)
def prepare_examples(
    config_slice: str,
    seed: int,
    source: Input[Dataset],
    examples: Output[Dataset],
):
    """Labeled articles -> generated questions, or imported labeled questions."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.stages import prepare_examples

        examples.metadata.update(prepare_examples.run(RunConfig.from_slice(config_slice, locals()), source.path, examples.path))


@dsl.component(**_component)
def split_examples(
    config_slice: str,
    seed: int,
    examples: Input[Dataset],
    splits: Output[Dataset],
):
    """Grouped, stratified train/dev/test split with a leakage report."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.stages import split_examples

        splits.metadata.update(split_examples.run(RunConfig.from_slice(config_slice, locals()), examples.path, splits.path))


@dsl.component(**_component)
def format_chat(
    config_slice: str,
    splits: Input[Dataset],
    formatted: Output[Dataset],
):
    """Splits -> conversational prompt/completion rows."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.stages import format_chat

        formatted.metadata.update(format_chat.run(RunConfig.from_slice(config_slice, locals()), splits.path, formatted.path))


@dsl.component(**_component)
def finetune(
    config_slice: str,
    model_name_or_path: str,
    model_revision: str,
    train_learning_rate: float,
    train_epochs: float,
    train_batch_size: int,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    eval_batch_size: int,
    seed: int,
    formatted: Input[Dataset],
    model: Output[Model],
):
    """LoRA fine-tune (trl SFTTrainer + peft) of the configured base model."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.stages import finetune

        meta = finetune.run(RunConfig.from_slice(config_slice, locals()), formatted.path, model.path)
        model.metadata.update({k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))})
        model.metadata["framework"] = "peft-lora"
        model.metadata["base_model"] = meta["base_model"]["name_or_path"]
        model.metadata["base_model_revision"] = meta["base_model"]["revision"] or ""
        # which weights ran, for lineage in the KFP UI (the full record is ftloop_model.json's base_model_provenance)
        provenance = meta["base_model_provenance"]
        model.metadata["base_model_source"] = provenance["source"]
        model.metadata["base_model_weights_sha256"] = provenance.get("weights_sha256") or ""
        if meta["dev"]["best_metric"] is not None:
            model.metadata[f"dev_best_{meta['dev']['metric']}"] = meta["dev"]["best_metric"]


@dsl.component(**_component)
def evaluate(
    config_slice: str,
    model_name_or_path: str,
    model_revision: str,
    eval_batch_size: int,
    model_name: str,
    model: Input[Model],
    formatted: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
):
    """Label-scoring inference on every split; metrics for the KFP UI."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.kfp_metrics import log_evaluation
        from ftloop.components.stages import evaluate

        all_metrics = evaluate.run(RunConfig.from_slice(config_slice, locals()), model.path, formatted.path, results.path)
        log_evaluation(metrics, confusion_matrix, all_metrics)
        results.metadata.update({"model": model_name, **{f"{s}_rows": m["n"] for s, m in all_metrics.items()}})


@dsl.component(**_component)
def evaluate_zero_shot(
    config_slice: str,
    model_name_or_path: str,
    model_revision: str,
    eval_batch_size: int,
    formatted: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
):
    """Baseline: the base model prompted with the same instruction, no fine-tuning."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.kfp_metrics import log_evaluation
        from ftloop.components.stages import evaluate_zero_shot

        all_metrics = evaluate_zero_shot.run(RunConfig.from_slice(config_slice, locals()), formatted.path, results.path)
        log_evaluation(metrics, confusion_matrix, all_metrics)
        results.metadata["model"] = "zero-shot"


@dsl.component(**_component)
def tfidf_baseline(
    config_slice: str,
    seed: int,
    formatted: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
):
    """Baseline: TF-IDF + logistic regression trained on the same train split."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.kfp_metrics import log_evaluation
        from ftloop.components.stages import tfidf_baseline

        all_metrics = tfidf_baseline.run(RunConfig.from_slice(config_slice, locals()), formatted.path, results.path)
        log_evaluation(metrics, confusion_matrix, all_metrics)
        results.metadata["model"] = "tfidf"


@dsl.component(**_component)
def augment_from_errors(
    config_slice: str,
    augment_rephrasings_per_error: int,
    augment_label_margin: float,
    augment_min_dev_improvement: float,
    seed: int,
    round: int,
    splits: Input[Dataset],
    evaluation: Input[Dataset],
    model: Input[Model],
    reference_splits: Input[Dataset],
    reference_evaluation: Input[Dataset],
    augmented: Output[Dataset],
    # Only with augment.label_filter "model" (the judge scores as evaluation does); passed only then.
    model_name_or_path: str = "",
    model_revision: str = "",
    eval_batch_size: int = 0,
) -> NamedTuple("AugmentDecision", [("decision", str), ("reason", str)]):
    """One loop round: rephrase misclassified train/dev rows into an augmented train split, or decide to stop."""
    from collections import namedtuple

    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.stages import augment_from_errors

        meta = augment_from_errors.run(
            RunConfig.from_slice(config_slice, locals()),
            splits.path,
            evaluation.path,
            augmented.path,
            round=round,
            reference_eval_dir=reference_evaluation.path,
            reference_split_dir=reference_splits.path,
            model_dir=model.path,
        )
        augmented.metadata.update(meta)
        return namedtuple("AugmentDecision", ["decision", "reason"])(meta["decision"], meta["stop_reason"])


@dsl.component(**_component)
def carry_forward(
    decision: str,
    model: Input[Model],
    evaluation: Input[Dataset],
    reference_model: Input[Model],
    reference_evaluation: Input[Dataset],
    kept_model: Output[Model],
    kept_evaluation: Output[Dataset],
):
    """The loop stopped: pass the kept model and its evaluation on unchanged."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.artifacts import RoundArtifacts
        from ftloop.components.stages import carry_forward

        kept = carry_forward.run(
            decision,
            current=RoundArtifacts(model.path, evaluation.path),
            reference=RoundArtifacts(reference_model.path, reference_evaluation.path),
            out=RoundArtifacts(kept_model.path, kept_evaluation.path),
        )
        sources = (reference_model, reference_evaluation) if kept == "reference" else (model, evaluation)
        for src, dst in zip(sources, (kept_model, kept_evaluation)):
            dst.metadata.update({**src.metadata, "kept_by_loop_stop": kept})


@dsl.component(**_component)
def select_final_model(
    config_slice: str,
    augment_min_dev_improvement: float,
    model: Input[Model],
    evaluation: Input[Dataset],
    splits: Input[Dataset],
    reference_model: Input[Model],
    reference_evaluation: Input[Dataset],
    reference_splits: Input[Dataset],
    kept_model: Output[Model],
    kept_evaluation: Output[Dataset],
    kept_splits: Output[Dataset],
) -> str:
    """After the last round: keep it only if it improved dev macro-F1 over the round before; returns which was kept."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.artifacts import RoundArtifacts
        from ftloop.components.config import RunConfig
        from ftloop.components.stages import select_final_model

        result = select_final_model.run(
            RunConfig.from_slice(config_slice, locals()),
            current=RoundArtifacts(model.path, evaluation.path, splits.path),
            reference=RoundArtifacts(reference_model.path, reference_evaluation.path, reference_splits.path),
            out=RoundArtifacts(kept_model.path, kept_evaluation.path, kept_splits.path),
        )
        sources = (
            (reference_model, reference_evaluation, reference_splits) if result["kept"] == "reference" else (model, evaluation, splits)
        )
        for src, dst in zip(sources, (kept_model, kept_evaluation, kept_splits)):
            dst.metadata.update({**src.metadata, "kept": result["kept"], "reason": result["reason"]})
        return result["kept"]


@dsl.component(**_component)
def compare_models(
    config_slice: str,
    source_uri: str,
    model_name_or_path: str,
    model_revision: str,
    train_learning_rate: float,
    train_epochs: float,
    train_batch_size: int,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    eval_batch_size: int,
    augment_rephrasings_per_error: int,
    augment_label_margin: float,
    augment_min_dev_improvement: float,
    seed: int,
    base_evaluation: Input[Dataset],
    tfidf_evaluation: Input[Dataset],
    zero_shot_evaluation: Input[Dataset],
    base_splits: Input[Dataset],
    results: Output[Artifact],
    report_markdown: Output[Markdown],
    report_html: Output[HTML],
    metrics: Output[Metrics],
    # The loop's final model; not passed with augment.rounds 0 (augmentation off: no augmented model).
    augmented_evaluation: Input[Dataset] = None,
    augmented_splits: Input[Dataset] = None,
):
    """Side-by-side comparison: summary.json, predictions and reports in one bundle; every model's scalars on one task."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.kfp_metrics import log_comparison
        from ftloop.components.stages import compare_models

        evaluations = {
            "base": base_evaluation,
            "augmented": augmented_evaluation,
            "tfidf": tfidf_evaluation,
            "zero-shot": zero_shot_evaluation,
        }
        splits = {"base": base_splits, "augmented": augmented_splits}
        summary = compare_models.run(
            RunConfig.from_slice(config_slice, locals(), source_uri=source_uri),
            {name: artifact.path for name, artifact in evaluations.items() if artifact is not None},
            {name: artifact.path for name, artifact in splits.items() if artifact is not None},
            results.path,
            report_markdown.path,
            report_html.path,
        )
        results.metadata.update({f"delta_test_{k}": v for k, v in summary["deltas"].get("test", {}).items()})
        log_comparison(metrics, summary)


@dsl.component(**_component)
def upload_to_okareo(
    config_slice: str,
    base_evaluation: Input[Dataset],
    links: Output[Artifact],
    augmented_evaluation: Input[Dataset] = None,  # not passed with augment.rounds 0
):
    """Optional: the splits as Okareo scenarios and each model's predictions as Okareo test runs (key from OKAREO_API_KEY)."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.stages import upload_to_okareo

        evaluations = {"base": base_evaluation, "augmented": augmented_evaluation}
        result = upload_to_okareo.run(
            RunConfig.from_slice(config_slice, locals()),
            {name: artifact.path for name, artifact in evaluations.items() if artifact is not None},
            links.path,
        )
        links.metadata.update({f"{model}_{split}": url for model, splits in result.items() for split, url in splits.items()})
