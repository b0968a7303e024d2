"""The ftloop pipeline: generate -> split -> format -> fine-tune -> evaluate -> N x (augment -> fine-tune -> evaluate) -> compare.

The graph is built from a run config: compile-time choices (data source
kind, cluster vs local) shape it, and the config itself is the pipeline's
``run_config`` parameter so every task reads the same settings.
"""


import hashlib
from pathlib import Path
from typing import Callable

from kfp import dsl
from kfp.dsl import Artifact, Dataset, PipelineTask

from ftloop.components import kfp_components as c
from ftloop.components.config import OpenAIConfig, RunConfig
from ftloop.pipelines.k8s import configure_cpu_task, configure_gpu_task, configure_llm_task, quiet_ml_env

# Object stores the KFP launcher reads with dsl.importer; anything else is a path on this machine.
REMOTE_SCHEMES = ("gs://", "s3://", "minio://")


def add_openai_secret(task: PipelineTask, openai: OpenAIConfig) -> None:
    """The openai backend's key, if it needs one, from a Kubernetes Secret (never a pipeline parameter)."""
    from kfp import kubernetes

    if openai.secret_name:
        kubernetes.use_secret_as_env(task, secret_name=openai.secret_name, secret_key_to_env={"api-key": openai.api_key_env})


def local_data_cache_key(config: RunConfig, source_sha256: str) -> str:
    """The cache key of the locally cached data stages.

    kfp.local 2.17.3 hashes only the component name and a custom cache key (the
    task's arguments play no part), so the key must name everything those stages'
    output depends on: the source file's content, the whole run config (seed,
    split, labels, generation, filters, prompt) and the ftloop code that runs them.
    """
    import ftloop
    import ftloop.components

    code = hashlib.sha256()
    for path in sorted(Path(ftloop.components.__file__).parent.glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    config_sha256 = hashlib.sha256(config.to_json().encode("utf-8")).hexdigest()
    return (f"ftloop-{ftloop.__version__}-code-{code.hexdigest()[:16]}"
            f":source-sha256:{source_sha256}:config-sha256:{config_sha256}")


def build_pipeline(config: RunConfig, for_cluster: bool = False, source_sha256: str | None = None) -> Callable:
    """Return the ``@dsl.pipeline`` for this config (cluster settings only when compiling for a cluster).

    ``source_sha256`` (local runs) keys the cache of the deterministic data stages to the
    source file's content, not just its path, and to the run config and ftloop code
    (``local_data_cache_key``), so an edited file or config is never served from cache.
    """
    cache_key = local_data_cache_key(config, source_sha256) if source_sha256 and not for_cluster else None

    def cache_locally(task: PipelineTask, cacheable: bool = True) -> PipelineTask:
        # Locally only the data stages whose output is a pure function of their inputs are cached;
        # training, evaluation and LLM calls always run. (On the cluster k8s.py decides.)
        if not for_cluster:
            task.set_caching_options(cacheable and cache_key is not None, cache_key=cache_key if cacheable else None)
        return task

    def cpu(task: PipelineTask, name: str) -> PipelineTask:
        task.set_display_name(name)
        cache_locally(task, cacheable=False)  # the data stages opt back in below
        return configure_cpu_task(task, config.cluster) if for_cluster else task

    def gpu(task: PipelineTask, name: str) -> PipelineTask:
        task.set_display_name(name)
        cache_locally(task, cacheable=False)
        quiet_ml_env(task)
        return configure_gpu_task(task, config.cluster) if for_cluster else task

    def generation(task: PipelineTask, name: str, backend: str, needs_gpu: bool = False) -> PipelineTask:
        """A task that calls a generator backend (or Okareo): on a GPU for hf; on the cluster
        uncached and retried unless offline, with the backend's API key from a Kubernetes Secret."""
        task = gpu(task, name) if needs_gpu or backend == "hf" else cpu(task, name)
        if for_cluster:
            configure_llm_task(task, config.cluster, backend)  # the Okareo secret, no caching, retries
            if backend == "openai":
                add_openai_secret(task, config.generators.openai)
        return task

    augment_on_gpu = config.augment.label_filter == "model"

    def graph(run_config: str, source_uri: str) -> Artifact:
        source = dsl.importer(artifact_uri=source_uri, artifact_class=Dataset, reimport=False)
        source.set_display_name("source data")
        examples = c.prepare_examples(run_config=run_config, source=source.output)
        if config.data.articles:
            generation(examples, "generate questions", config.generate.backend)
        else:
            cpu(examples, "import questions")
        cache_locally(examples, cacheable=not config.data.articles or config.generate.backend == "offline")
        splits = cache_locally(cpu(c.split_examples(run_config=run_config, examples=examples.output), "split (grouped, stratified)"))
        formatted = cache_locally(cpu(c.format_chat(run_config=run_config, splits=splits.output), "format chat data"))

        # Baselines on the same rows: what a fine-tune has to beat. Like `evaluate`, each logs the same
        # <split>_<metric> scalars and the test confusion matrix. (TF-IDF is deterministic but not cached
        # locally: kfp.local 2.17.3 treats a Metrics/ClassificationMetrics output, which has no file, as a cache miss.)
        tfidf = cpu(c.tfidf_baseline(run_config=run_config, formatted=formatted.output), "baseline: TF-IDF + logistic regression")
        zero_shot = gpu(c.evaluate_zero_shot(run_config=run_config, formatted=formatted.output), "baseline: zero-shot base model")

        base_model = gpu(c.finetune(run_config=run_config, formatted=formatted.output), "fine-tune base")
        base_eval = gpu(c.evaluate(run_config=run_config, model_name="base", model=base_model.output, formatted=formatted.output), "evaluate base")

        # Error-driven augmentation, `augment.rounds` rounds unrolled at compile time. Each round's
        # augment task decides: "continue" trains and evaluates a new model (dsl.If); otherwise
        # (dsl.Else) the kept model and its evaluation pass through unchanged and every later
        # round stops at once. dsl.OneOf hands the round's result to the next round.
        current = (base_model.output, base_eval.outputs["results"], splits.output)
        reference = current
        for r in range(1, config.augment.rounds + 1):
            model, evaluation, round_splits = current
            augment_task = c.augment_from_errors(
                run_config=run_config, round=r, splits=round_splits, evaluation=evaluation, model=model,
                reference_splits=reference[2], reference_evaluation=reference[1],
            )
            generation(augment_task, f"augment round {r}", config.augment.backend, needs_gpu=augment_on_gpu)
            with dsl.If(augment_task.outputs["decision"] == "continue", name=f"round-{r}-continue"):
                round_formatted = cpu(c.format_chat(run_config=run_config, splits=augment_task.outputs["augmented"]), f"format round {r} data")
                round_model = gpu(c.finetune(run_config=run_config, formatted=round_formatted.output), f"fine-tune round {r}")
                # Same rows as the base evaluation, so the models are compared pairwise.
                round_eval = gpu(
                    c.evaluate(run_config=run_config, model_name="augmented", model=round_model.output, formatted=formatted.output),
                    f"evaluate round {r}",
                )
            with dsl.Else(name=f"round-{r}-stop"):
                kept = cpu(
                    c.carry_forward(
                        decision=augment_task.outputs["decision"], model=model, evaluation=evaluation,
                        reference_model=reference[0], reference_evaluation=reference[1],
                    ),
                    f"round {r}: loop stopped, keep model",
                )
            reference = current
            current = (
                dsl.OneOf(round_model.output, kept.outputs["kept_model"]),
                dsl.OneOf(round_eval.outputs["results"], kept.outputs["kept_evaluation"]),
                # On a stop the augment task itself writes the kept splits, so no OneOf is needed here.
                augment_task.outputs["augmented"],
            )
        # The rule between rounds, applied once more after the last one: a last round that lowered
        # dev macro-F1 is not the final model.
        final = cpu(
            c.select_final_model(
                run_config=run_config, model=current[0], evaluation=current[1], splits=current[2],
                reference_model=reference[0], reference_evaluation=reference[1], reference_splits=reference[2],
            ),
            "keep the better of the last two rounds",
        )
        augmented_eval, augmented_splits = final.outputs["kept_evaluation"], final.outputs["kept_splits"]

        # summary.json and the reports; its Metrics output puts every model's scalars (<model>_<split>_<metric>)
        # on this one task, so the KFP Compare page lines runs up on the final augmented model whichever
        # round produced it. Never cached (cpu()), so its file-less Metrics output costs nothing locally.
        comparison = cpu(
            c.compare_models(
                run_config=run_config,
                base_evaluation=base_eval.outputs["results"],
                augmented_evaluation=augmented_eval,
                tfidf_evaluation=tfidf.outputs["results"],
                zero_shot_evaluation=zero_shot.outputs["results"],
                base_splits=splits.output,
                augmented_splits=augmented_splits,
            ),
            "compare models",
        )
        if config.generators.okareo.upload_eval:
            generation(
                c.upload_to_okareo(run_config=run_config, base_evaluation=base_eval.outputs["results"], augmented_evaluation=augmented_eval),
                "upload evaluation to Okareo",
                "okareo",
            )
        return comparison.outputs["results"]

    # A cluster pipeline never defaults to a path on the machine that compiled it: with a local
    # data path, source_uri is a required run parameter (ftloop submit passes a gs:// URI).
    run_config_default = config.to_json()
    if for_cluster and not config.data.source_path.startswith(REMOTE_SCHEMES):
        def ftloop_pipeline(source_uri: str, run_config: str = run_config_default) -> Artifact:
            return graph(run_config, source_uri)
    else:
        def ftloop_pipeline(source_uri: str = config.data.source_path, run_config: str = run_config_default) -> Artifact:
            return graph(run_config, source_uri)

    return dsl.pipeline(
        name=config.name,
        description="ftloop: generate, split, format, LoRA fine-tune, evaluate, augment from errors, retrain, compare.",
        pipeline_root=config.cluster.pipeline_root if for_cluster else None,
    )(ftloop_pipeline)
