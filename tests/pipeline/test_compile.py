"""The compiled pipeline: loads back in kfp, GPU settings only on GPU tasks, images as configured."""

import json
import subprocess
import sys

import pytest
import yaml
from kfp import components

from ftloop.components.config import RUNTIME_FIELDS, STAGE_SECTIONS, load_config, param_name, stage_sections
from ftloop.pipelines.compile import compile_pipeline
from tests.fixtures.data import REPO

GPU_EXECUTORS = {"exec-finetune", "exec-finetune-2", "exec-evaluate", "exec-evaluate-2", "exec-evaluate-zero-shot"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftloop.pipelines.cli",
            "compile",
            "--config",
            str(REPO / "configs" / "webbizz-gke.yaml"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_kfp_loads_the_compiled_pipeline_back(compiled):
    pipeline = components.load_component_from_file(str(compiled))
    assert pipeline.name == "webbizz-phi3"
    assert set(pipeline.component_spec.inputs) == {"source_uri"} | {param_name(f) for f in RUNTIME_FIELDS}


# The typed run parameters: KFP type and the webbizz-gke.yaml value as default (shown in the run form and on the Compare page).
TYPED_PARAMETERS = {
    "model_name_or_path": ("STRING", "microsoft/Phi-3-mini-4k-instruct"),
    "model_revision": ("STRING", "0a67737cc96d2554230f90338b163bc6380a2a85"),
    "train_learning_rate": ("NUMBER_DOUBLE", 0.0002),
    "train_epochs": ("NUMBER_DOUBLE", 3),
    "train_batch_size": ("NUMBER_INTEGER", 16),
    "lora_r": ("NUMBER_INTEGER", 16),
    "lora_alpha": ("NUMBER_INTEGER", 32),
    "lora_dropout": ("NUMBER_DOUBLE", 0.05),
    "eval_batch_size": ("NUMBER_INTEGER", 64),
    "augment_rephrasings_per_error": ("NUMBER_INTEGER", 3),
    "augment_label_margin": ("NUMBER_DOUBLE", 0.1),
    "augment_min_dev_improvement": ("NUMBER_DOUBLE", 0.0),
    "seed": ("NUMBER_INTEGER", 42),
}


def test_the_tuned_hyperparameters_are_typed_run_parameters_with_the_configs_defaults(compiled):
    spec = next(yaml.safe_load_all(compiled.read_text()))
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {"source_uri", *TYPED_PARAMETERS}  # no whole-config run_config parameter any more
    for name, (kind, default) in TYPED_PARAMETERS.items():
        assert parameters[name]["parameterType"] == kind, name
        assert parameters[name]["defaultValue"] == default, name
        assert parameters[name]["description"].startswith("run config "), name
    assert parameters["source_uri"]["parameterType"] == "STRING" and "defaultValue" not in parameters["source_uri"]


def test_no_path_of_the_compiling_machine_in_the_yaml(compiled):
    """webbizz-gke.yaml's data path is a local file: neither it nor the checkout's path is compiled in."""
    text = compiled.read_text()
    assert str(REPO) not in text and "articles.jsonl" not in text


def task_slices(spec: dict) -> dict[str, dict]:
    """task -> its embedded config slice (the compile-time constant), for every task that takes one."""
    slices = {}
    for name, task in all_tasks(spec).items():
        constant = task.get("inputs", {}).get("parameters", {}).get("config_slice", {}).get("runtimeValue", {}).get("constant")
        if constant is not None:
            slices[name] = json.loads(constant)
    return slices


def test_each_task_embeds_only_the_config_sections_its_stage_reads(compiled):
    spec = next(yaml.safe_load_all(compiled.read_text()))
    config = load_config(REPO / "configs" / "webbizz-gke.yaml")
    slices = task_slices(spec)
    assert {s["stage"] for s in slices.values()} == set(STAGE_SECTIONS) - {"upload_to_okareo"}
    for name, piece in slices.items():
        stage = piece["stage"]
        paths = stage_sections(stage, config)
        assert piece["paths"] == list(paths), name
        sections = {p.split(".")[0] for p in paths}
        assert set(piece["config"]) <= sections, name  # nothing else travels with the task
        # the runtime fields inside its sections come as typed parameters, not in the constant
        runtime = [f for f in RUNTIME_FIELDS if any(f == p or f.startswith(p + ".") for p in paths)]
        assert piece["runtime"] == runtime, name
        task_parameters = all_tasks(spec)[name]["inputs"]["parameters"]
        for field in runtime:
            # the pipeline's parameter (inside an If/Else group, as that group's pipelinechannel input)
            source = task_parameters[param_name(field)]["componentInputParameter"]
            assert source in (param_name(field), f"pipelinechannel--{param_name(field)}"), (name, field)
        assert not {param_name(f) for f in RUNTIME_FIELDS if f not in runtime} & set(task_parameters), name
    by_stage = {s["stage"]: s for s in slices.values()}
    assert set(by_stage["split_examples"]["config"]) == {"split"} and by_stage["split_examples"]["runtime"] == ["seed"]
    assert set(by_stage["finetune"]["config"]) == {"model", "train", "lora", "format", "eval"}
    # eval.batch_size (a run parameter) and eval.batch_tokens (dev-set label scoring), nothing else of eval
    assert by_stage["finetune"]["config"]["eval"] == {"batch_tokens": None}
    assert "learning_rate" not in by_stage["finetune"]["config"]["train"]  # a run parameter, not a constant
    assert set(by_stage["augment_from_errors"]["config"]) == {"augment", "filters"}
    assert "rounds" not in by_stage["augment_from_errors"]["config"]["augment"]
    assert set(by_stage["format_chat"]["config"]) == {"format"} and by_stage["format_chat"]["runtime"] == []
    assert set(by_stage["compare_models"]["config"]) == set(type(config).model_fields) - {"seed"}  # summary.json records it all
    # the data path is not the compiling machine's: the run reads (and compare_models records) source_uri
    assert by_stage["prepare_examples"]["config"]["data"]["articles"] == "(the source_uri run parameter)"


def test_a_generator_backend_adds_only_its_own_settings_to_the_tasks_that_call_it(tmp_path):
    config = load_config(REPO / "configs" / "webbizz-gke.yaml")
    config = config.model_validate(
        {**config.model_dump(), "generate": {"backend": "okareo"}, "augment": {"backend": "openai", "label_filter": "model"}}
    )
    spec = next(yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml").read_text()))
    by_stage = {s["stage"]: s for s in task_slices(spec).values()}
    assert set(by_stage["prepare_examples"]["config"]["generators"]) == {"okareo"}
    augment = by_stage["augment_from_errors"]
    assert set(augment["config"]["generators"]) == {"openai"}
    # the model label filter scores with the fine-tuned model as evaluation does
    assert {"model", "format", "eval"} <= set(augment["config"])
    assert {"model.name_or_path", "eval.batch_size"} <= set(augment["runtime"])


def test_every_rounds_augment_task_carries_mine_splits_in_its_slice(tmp_path):
    """augment.mine_splits is compile-time: it travels in the augment_from_errors slice, in every round."""
    config = load_config(REPO / "configs" / "webbizz-gke.yaml")
    dumped = config.model_dump()
    config = config.model_validate({**dumped, "augment": {**dumped["augment"], "mine_splits": ["train"], "rounds": 2}})
    spec = next(yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml").read_text()))
    augment = [s for s in task_slices(spec).values() if s["stage"] == "augment_from_errors"]
    assert len(augment) == 2
    for piece in augment:
        assert piece["config"]["augment"]["mine_splits"] == ["train"] and "augment.mine_splits" not in piece["runtime"]


def all_tasks(spec: dict) -> dict:
    """Tasks of the root DAG and of every sub-DAG (the augmentation rounds sit inside dsl.If/Else groups)."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_every_stage_of_the_loop_is_a_task(compiled):
    spec = next(yaml.safe_load_all(compiled.read_text()))
    assert {
        "importer",
        "prepare-examples",
        "split-examples",
        "format-chat",
        "finetune",
        "evaluate",
        "augment-from-errors",
        "compare-models",
        "tfidf-baseline",
        "evaluate-zero-shot",
    } <= set(spec["root"]["dag"]["tasks"])
    # one augmentation round (webbizz-gke.yaml): retrain inside dsl.If, carry the model forward inside dsl.Else
    assert {"format-chat-2", "finetune-2", "evaluate-2", "carry-forward"} <= set(all_tasks(spec))


def output_types(spec: dict, task: str) -> dict:
    """Output artifact name -> KFP type of a task's component."""
    component = spec["components"][all_tasks(spec)[task]["componentRef"]["name"]]
    return {name: out["artifactType"]["schemaTitle"] for name, out in component["outputDefinitions"]["artifacts"].items()}


def test_model_evaluations_and_the_comparison_declare_their_kfp_ui_metrics(compiled):
    spec = next(yaml.safe_load_all(compiled.read_text()))
    evaluation = {"results": "system.Dataset", "metrics": "system.Metrics", "confusion_matrix": "system.ClassificationMetrics"}
    for task in ("evaluate", "evaluate-2", "evaluate-zero-shot", "tfidf-baseline"):
        assert output_types(spec, task) == evaluation, task
    # every model's scalars on one task with a stable name, next to the bundle and the two reports
    assert output_types(spec, "compare-models") == {
        "results": "system.Artifact",
        "report_markdown": "system.Markdown",
        "report_html": "system.HTML",
        "metrics": "system.Metrics",
    }
    assert all_tasks(spec)["compare-models"]["taskInfo"]["name"] == "compare models"


def test_only_gpu_tasks_request_an_l4(compiled):
    spec, platform = yaml.safe_load_all(compiled.read_text())
    config = load_config(REPO / "configs" / "webbizz-gke.yaml")
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        container = executor.get("container")
        if container is None:
            continue  # importer
        accelerator = container.get("resources", {}).get("accelerator")
        if name in GPU_EXECUTORS:
            assert accelerator == {"count": "1", "resourceCount": "1", "resourceType": "nvidia.com/gpu", "type": "nvidia.com/gpu"}
            assert k8s[name]["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[name]["tolerations"]
            assert container["image"] == config.cluster.gpu_image
        else:
            assert accelerator is None, name
            assert name not in k8s, name
            assert container["image"] == config.cluster.cpu_image


def test_gpu_tasks_are_cached_per_stage_unless_switched_off_and_are_retried(compiled, tmp_path):
    """An L4 hour is worth caching: fine-tune and evaluation are cached (cluster.cache_training, default true)."""
    spec = next(yaml.safe_load_all(compiled.read_text()))
    tasks = all_tasks(spec)
    for name in ("finetune", "finetune-2", "evaluate", "evaluate-2", "evaluate-zero-shot"):
        assert tasks[name]["cachingOptions"] == {"enableCache": True}, name
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["split-examples"]["cachingOptions"] == {"enableCache": True}
    config = load_config(REPO / "configs" / "webbizz-gke.yaml")
    config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"cache_training": False})})
    tasks = all_tasks(next(yaml.safe_load_all(compile_pipeline(config, tmp_path / "p.yaml").read_text())))
    for name in ("finetune", "finetune-2", "evaluate", "evaluate-2", "evaluate-zero-shot"):
        assert tasks[name]["cachingOptions"] == {}, name
    assert tasks["split-examples"]["cachingOptions"] == {"enableCache": True}


def test_every_task_has_a_memory_limit_and_cpu_tasks_a_cpu_limit(compiled):
    """From cluster.*: GPU tasks sized for a g2-standard-8, no CPU limit (throttling would starve data loading)."""
    spec = next(yaml.safe_load_all(compiled.read_text()))
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor.get("container", {}).get("resources")
        if resources is None:
            continue  # importer
        if name in GPU_EXECUTORS:
            assert resources["resourceMemoryRequest"] == "24G" and resources["resourceMemoryLimit"] == "26G", name
            assert resources["resourceCpuRequest"] == "6" and "resourceCpuLimit" not in resources, name
        else:
            assert resources["resourceMemoryRequest"] == "2G" and resources["resourceMemoryLimit"] == "4G", name
            assert resources["resourceCpuRequest"] == "1" and resources["resourceCpuLimit"] == "2", name


def test_limits_come_from_the_config(tmp_path):
    config = load_config(REPO / "configs" / "webbizz-gke.yaml")
    cluster = config.cluster.model_copy(
        update={"gpu_cpu_limit": "8", "gpu_memory_limit": "30Gi", "cpu_task_cpu_limit": None, "cpu_task_memory_limit": "8G"}
    )
    spec = next(yaml.safe_load_all(compile_pipeline(config.model_copy(update={"cluster": cluster}), tmp_path / "p.yaml").read_text()))
    executors = spec["deploymentSpec"]["executors"]
    assert executors["exec-finetune"]["container"]["resources"]["resourceCpuLimit"] == "8"
    assert executors["exec-finetune"]["container"]["resources"]["resourceMemoryLimit"] == "30Gi"
    assert "resourceCpuLimit" not in executors["exec-split-examples"]["container"]["resources"]
    assert executors["exec-split-examples"]["container"]["resources"]["resourceMemoryLimit"] == "8G"


def test_a_limit_below_its_request_is_refused():
    config = load_config(REPO / "configs" / "webbizz-gke.yaml")
    with pytest.raises(ValueError, match="gpu_memory_limit 16G is below gpu_memory_request 24G"):
        type(config.cluster).model_validate({**config.cluster.model_dump(), "gpu_memory_limit": "16G"})


def test_the_tiny_local_model_cannot_be_compiled_for_a_cluster(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftloop.pipelines.cli",
            "compile",
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            "--output",
            str(tmp_path / "p.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "builtin:tiny-phi3" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.yaml").exists()
