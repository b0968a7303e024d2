"""The ftloop pipeline: generate -> split -> format -> fine-tune -> evaluate -> augment -> fine-tune -> evaluate -> compare.

The graph is built from a run config: compile-time choices (data source
kind, cluster vs local) shape it, and the config itself is the pipeline's
``run_config`` parameter so every task reads the same settings.
"""


from typing import Callable

from kfp import dsl
from kfp.dsl import Artifact, Dataset, PipelineTask

from ftloop.components import kfp_components as c
from ftloop.components.config import RunConfig
from ftloop.pipelines.k8s import backend_of, configure_cpu_task, configure_gpu_task, configure_llm_task, quiet_ml_env


def build_pipeline(config: RunConfig, for_cluster: bool = False) -> Callable:
    """Return the ``@dsl.pipeline`` for this config (cluster settings only when compiling for a cluster)."""

    def cpu(task: PipelineTask, name: str) -> PipelineTask:
        task.set_display_name(name)
        return configure_cpu_task(task, config.cluster) if for_cluster else task

    def gpu(task: PipelineTask, name: str) -> PipelineTask:
        task.set_display_name(name)
        quiet_ml_env(task)
        return configure_gpu_task(task, config.cluster) if for_cluster else task

    def llm(task: PipelineTask, section: object) -> PipelineTask:
        # Remote generators (e.g. okareo): no caching, retries, the API key from a Secret.
        return configure_llm_task(task, config.cluster, backend_of(section)) if for_cluster else task

    @dsl.pipeline(
        name=config.name,
        description="ftloop: generate, split, format, LoRA fine-tune, evaluate, augment from errors, retrain, compare.",
        pipeline_root=config.cluster.pipeline_root if for_cluster else None,
    )
    def ftloop_pipeline(run_config: str = config.to_json(), source_uri: str = config.data.source_path) -> Artifact:
        source = dsl.importer(artifact_uri=source_uri, artifact_class=Dataset, reimport=False)
        source.set_display_name("source data")
        examples = cpu(c.prepare_examples(run_config=run_config, source=source.output), "generate questions" if config.data.articles else "import questions")
        if config.data.articles:
            llm(examples, config.generate)
        splits = cpu(c.split_examples(run_config=run_config, examples=examples.output), "split (grouped, stratified)")
        formatted = cpu(c.format_chat(run_config=run_config, splits=splits.output), "format chat data")

        # Baselines on the same rows: what a fine-tune has to beat.
        tfidf = cpu(c.tfidf_baseline(run_config=run_config, formatted=formatted.output), "baseline: TF-IDF + logistic regression")
        zero_shot = gpu(c.evaluate_zero_shot(run_config=run_config, formatted=formatted.output), "baseline: zero-shot base model")

        base_model = gpu(c.finetune(run_config=run_config, formatted=formatted.output), "fine-tune base")
        base_eval = gpu(c.evaluate(run_config=run_config, model_name="base", model=base_model.output, formatted=formatted.output), "evaluate base")

        augmented_splits = cpu(
            c.augment_from_errors(run_config=run_config, splits=splits.output, evaluation=base_eval.outputs["results"]),
            "augment from errors",
        )
        llm(augmented_splits, config.augment)
        augmented_formatted = cpu(c.format_chat(run_config=run_config, splits=augmented_splits.output), "format augmented data")
        augmented_model = gpu(c.finetune(run_config=run_config, formatted=augmented_formatted.output), "fine-tune augmented")
        # Same rows as the base evaluation, so the two models are compared pairwise.
        augmented_eval = gpu(
            c.evaluate(run_config=run_config, model_name="augmented", model=augmented_model.output, formatted=formatted.output),
            "evaluate augmented",
        )

        comparison = cpu(
            c.compare_models(
                run_config=run_config,
                base_evaluation=base_eval.outputs["results"],
                augmented_evaluation=augmented_eval.outputs["results"],
                tfidf_evaluation=tfidf.outputs["results"],
                zero_shot_evaluation=zero_shot.outputs["results"],
                base_splits=splits.output,
                augmented_splits=augmented_splits.output,
            ),
            "compare models",
        )
        return comparison.outputs["results"]

    return ftloop_pipeline
