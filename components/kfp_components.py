"""Thin KFP wrappers over the stage functions.

Each body imports its stage from the installed ``ftloop`` package (baked into
the image; installed in the local environment for the local runner), so the
compiled YAML carries no logic of its own. Images are set per task at compile
time (``pipelines.k8s``), never hard-coded here.
"""


from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

# Overridden per task at compile time with the image skaffold built.
PLACEHOLDER_IMAGE = "ftloop:unset"
_component = dict(base_image=PLACEHOLDER_IMAGE, install_kfp_package=False, packages_to_install=[])


@dsl.component(**_component)
def prepare_examples(run_config: str, source: Input[Dataset], examples: Output[Dataset]):
    """Labeled articles -> generated questions, or imported labeled questions."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.sources import run_prepare

        examples.metadata.update(run_prepare(RunConfig.from_json(run_config), source.path, examples.path))


@dsl.component(**_component)
def split_examples(run_config: str, examples: Input[Dataset], splits: Output[Dataset]):
    """Grouped, stratified train/dev/test split with a leakage report."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.split import run_split

        config = RunConfig.from_json(run_config)
        splits.metadata.update(run_split(examples.path, splits.path, config.split.dev, config.split.test, config.seed))


@dsl.component(**_component)
def format_chat(run_config: str, splits: Input[Dataset], formatted: Output[Dataset]):
    """Splits -> conversational prompt/completion rows."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.chat_format import run_format
        from ftloop.components.config import RunConfig

        config = RunConfig.from_json(run_config)
        formatted.metadata.update(run_format(splits.path, formatted.path, config.format.system_prompt))


@dsl.component(**_component)
def finetune(run_config: str, formatted: Input[Dataset], model: Output[Model]):
    """LoRA fine-tune (trl SFTTrainer + peft) of the configured base model."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.finetune import finetune as run_finetune

        meta = run_finetune(RunConfig.from_json(run_config), formatted.path, model.path)
        model.metadata.update({k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))})
        model.metadata["framework"] = "peft-lora"
        model.metadata["base_model"] = meta["base_model"]["name_or_path"]
        model.metadata["base_model_revision"] = meta["base_model"]["revision"] or ""
        if meta["dev"]["best_metric"] is not None:
            model.metadata[f"dev_best_{meta['dev']['metric']}"] = meta["dev"]["best_metric"]


@dsl.component(**_component)
def evaluate(
    run_config: str,
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
        from ftloop.components.evaluate import evaluate_model
        from ftloop.components.metrics import log_evaluation

        all_metrics = evaluate_model(RunConfig.from_json(run_config), model.path, formatted.path, results.path)
        log_evaluation(metrics, confusion_matrix, all_metrics)
        results.metadata.update({"model": model_name, **{f"{s}_rows": m["n"] for s, m in all_metrics.items()}})


@dsl.component(**_component)
def evaluate_zero_shot(
    run_config: str,
    formatted: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
):
    """Baseline: the base model prompted with the same instruction, no fine-tuning."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.evaluate import evaluate_zero_shot as run_zero_shot
        from ftloop.components.metrics import log_evaluation

        all_metrics = run_zero_shot(RunConfig.from_json(run_config), formatted.path, results.path)
        log_evaluation(metrics, confusion_matrix, all_metrics)
        results.metadata["model"] = "zero-shot"


@dsl.component(**_component)
def tfidf_baseline(
    run_config: str,
    formatted: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
):
    """Baseline: TF-IDF + logistic regression trained on the same train split."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.baselines import run_tfidf_baseline
        from ftloop.components.config import RunConfig
        from ftloop.components.metrics import log_evaluation

        all_metrics = run_tfidf_baseline(formatted.path, results.path, RunConfig.from_json(run_config).seed)
        log_evaluation(metrics, confusion_matrix, all_metrics)
        results.metadata["model"] = "tfidf"


@dsl.component(**_component)
def augment_from_errors(
    run_config: str,
    round: int,
    splits: Input[Dataset],
    evaluation: Input[Dataset],
    model: Input[Model],
    reference_splits: Input[Dataset],
    reference_evaluation: Input[Dataset],
    augmented: Output[Dataset],
) -> NamedTuple("AugmentDecision", [("decision", str), ("reason", str)]):
    """One loop round: rephrase misclassified train/dev rows into an augmented train split, or decide to stop."""
    from collections import namedtuple

    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.augment import run_augment
        from ftloop.components.config import RunConfig

        meta = run_augment(
            RunConfig.from_json(run_config), splits.path, evaluation.path, augmented.path, round=round,
            reference_eval_dir=reference_evaluation.path, reference_split_dir=reference_splits.path, model_dir=model.path,
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
        from ftloop.components.augment import carry_forward as run_carry

        kept = run_carry(
            decision, (model.path, evaluation.path), (reference_model.path, reference_evaluation.path),
            (kept_model.path, kept_evaluation.path),
        )
        sources = (reference_model, reference_evaluation) if kept == "reference" else (model, evaluation)
        for src, dst in zip(sources, (kept_model, kept_evaluation)):
            dst.metadata.update({**src.metadata, "kept_by_loop_stop": kept})


@dsl.component(**_component)
def select_final_model(
    run_config: str,
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
        from ftloop.components.augment import select_final
        from ftloop.components.config import RunConfig

        config = RunConfig.from_json(run_config)
        result = select_final(
            (model.path, evaluation.path, splits.path),
            (reference_model.path, reference_evaluation.path, reference_splits.path),
            (kept_model.path, kept_evaluation.path, kept_splits.path),
            config.augment.min_dev_improvement,
            config.augment.rounds,
        )
        sources = (reference_model, reference_evaluation, reference_splits) if result["kept"] == "reference" else (model, evaluation, splits)
        for src, dst in zip(sources, (kept_model, kept_evaluation, kept_splits)):
            dst.metadata.update({**src.metadata, "kept": result["kept"], "reason": result["reason"]})
        return result["kept"]


@dsl.component(**_component)
def compare_models(
    run_config: str,
    base_evaluation: Input[Dataset],
    augmented_evaluation: Input[Dataset],
    tfidf_evaluation: Input[Dataset],
    zero_shot_evaluation: Input[Dataset],
    base_splits: Input[Dataset],
    augmented_splits: Input[Dataset],
    results: Output[Artifact],
    report_markdown: Output[Markdown],
    report_html: Output[HTML],
    metrics: Output[Metrics],
):
    """Side-by-side comparison: summary.json, predictions and reports in one bundle; every model's scalars on one task."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.compare import run_compare
        from ftloop.components.config import RunConfig
        from ftloop.components.metrics import log_comparison

        config = RunConfig.from_json(run_config)
        summary = run_compare(
            {
                "base": base_evaluation.path,
                "augmented": augmented_evaluation.path,
                "tfidf": tfidf_evaluation.path,
                "zero-shot": zero_shot_evaluation.path,
            },
            {"base": base_splits.path, "augmented": augmented_splits.path},
            results.path,
            report_markdown.path,
            report_html.path,
            {"run_name": config.name, "seed": config.seed, "config": config.model_dump(mode="json")},
        )
        results.metadata.update({f"delta_test_{k}": v for k, v in summary["deltas"].get("test", {}).items()})
        log_comparison(metrics, summary)


@dsl.component(**_component)
def upload_to_okareo(
    run_config: str,
    base_evaluation: Input[Dataset],
    augmented_evaluation: Input[Dataset],
    links: Output[Artifact],
):
    """Optional: the splits as Okareo scenarios and each model's predictions as Okareo test runs (key from OKAREO_API_KEY)."""
    from ftloop.components.errors import exit_on_user_error

    with exit_on_user_error():
        from ftloop.components.config import RunConfig
        from ftloop.components.gen_okareo import upload_evaluation
        from ftloop.components.records import write_json

        config = RunConfig.from_json(run_config)
        result = upload_evaluation(
            config.generators.okareo, config.name, {"base": base_evaluation.path, "augmented": augmented_evaluation.path}
        )
        write_json(links.path, result)
        links.metadata.update({f"{model}_{split}": url for model, splits in result.items() for split, url in splits.items()})
