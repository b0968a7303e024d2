"""The compiled pipeline: loads back in kfp, GPU settings only on GPU tasks, images as configured."""

import subprocess
import sys

import pytest
import yaml
from kfp import components

from ftloop.components.config import load_config

from conftest import REPO

GPU_EXECUTORS = {"exec-finetune", "exec-finetune-2", "exec-evaluate", "exec-evaluate-2", "exec-evaluate-zero-shot"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "ftloop.pipelines.cli", "compile", "--config", str(REPO / "configs" / "webbizz-gke.yaml"), "--output", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_kfp_loads_the_compiled_pipeline_back(compiled):
    pipeline = components.load_component_from_file(str(compiled))
    assert pipeline.name == "webbizz-phi3"
    assert set(pipeline.component_spec.inputs) == {"run_config", "source_uri"}


def all_tasks(spec: dict) -> dict:
    """Tasks of the root DAG and of every sub-DAG (the augmentation rounds sit inside dsl.If/Else groups)."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_every_stage_of_the_loop_is_a_task(compiled):
    spec = next(yaml.safe_load_all(compiled.read_text()))
    assert {
        "importer", "prepare-examples", "split-examples", "format-chat", "finetune", "evaluate",
        "augment-from-errors", "compare-models", "tfidf-baseline", "evaluate-zero-shot",
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
        "results": "system.Artifact", "report_markdown": "system.Markdown", "report_html": "system.HTML", "metrics": "system.Metrics",
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


def test_gpu_tasks_are_not_cached_and_are_retried(compiled):
    spec = next(yaml.safe_load_all(compiled.read_text()))
    tasks = all_tasks(spec)
    for name in ("finetune", "finetune-2", "evaluate", "evaluate-2", "evaluate-zero-shot"):
        assert tasks[name]["cachingOptions"] == {}, name
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    assert tasks["split-examples"]["cachingOptions"] == {"enableCache": True}


def test_the_tiny_local_model_cannot_be_compiled_for_a_cluster(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ftloop.pipelines.cli", "compile", "--config", str(REPO / "configs" / "demo.yaml"), "--output", str(tmp_path / "p.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "builtin:tiny-phi3" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.yaml").exists()
