"""The cluster pipeline for configs/webbizz-gke.yaml: L4 only where a model runs, images as built, secrets by reference."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from ftloop.components.config import load_config
from ftloop.pipelines.compile import compile_pipeline
from tests.fixtures.data import REPO

GKE_CONFIG = REPO / "configs" / "webbizz-gke.yaml"
# Every task that loads the language model: fine-tunes, their evaluations, the zero-shot baseline.
GPU_TASKS = {"finetune", "finetune-2", "evaluate", "evaluate-2", "evaluate-zero-shot"}
CPU_TASKS = {
    "prepare-examples",
    "split-examples",
    "format-chat",
    "format-chat-2",
    "tfidf-baseline",
    "augment-from-errors",
    "carry-forward",
    "select-final-model",
    "compare-models",
}
L4 = {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "ftloop.pipelines.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def load(path):
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec):
    """Tasks of the root DAG and of the sub-DAGs (an augmentation round's retrain sits inside dsl.If/Else)."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return {name: task for name, task in tasks.items() if not name.startswith("condition-")}


def executor_of(spec, task):
    return all_tasks(spec)[task]["componentRef"]["name"].replace("comp-", "exec-", 1)


@pytest.fixture(scope="module")
def build_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("skaffold") / "build.json"
    path.write_text(
        json.dumps(
            {
                "builds": [
                    {"imageName": "ftloop-cpu", "tag": "us-docker.pkg.dev/p/ftloop/ftloop-cpu:9f1c2ab@sha256:" + "a" * 64},
                    {"imageName": "ftloop-gpu", "tag": "us-docker.pkg.dev/p/ftloop/ftloop-gpu:9f1c2ab@sha256:" + "b" * 64},
                ]
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, build_json):
    out = tmp_path_factory.mktemp("compile") / "pipeline.yaml"
    result = run_cli(
        "compile",
        "--config",
        str(GKE_CONFIG),
        "--output",
        str(out),
        "--images-from",
        str(build_json),
        env={"OKAREO_API_KEY": "okareo-FAKE-KEY-planted-7c1d"},
    )
    assert result.returncode == 0, result.stderr
    return out


def test_exactly_the_model_tasks_request_one_l4(compiled):
    spec, k8s = load(compiled)
    tasks = all_tasks(spec)
    assert set(tasks) - {"importer"} == GPU_TASKS | CPU_TASKS
    for task in GPU_TASKS | CPU_TASKS:
        executor = executor_of(spec, task)
        resources = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
        if task in GPU_TASKS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu" and resources["accelerator"]["resourceCount"] == "1"
            assert resources["resourceCpuRequest"] == "6" and resources["resourceMemoryRequest"] == "24G"
            assert k8s[executor]["nodeSelector"] == L4
            assert k8s[executor]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            # cached per stage (cluster.cache_training, default true); a preempted run resumes by retry
            assert tasks[task]["cachingOptions"] == {"enableCache": True} and tasks[task]["retryPolicy"]["maxRetryCount"] == 2
            assert resources["resourceMemoryLimit"] == "26G" and "resourceCpuLimit" not in resources
        else:
            assert "accelerator" not in resources, task
            assert "nodeSelector" not in k8s.get(executor, {}) and "tolerations" not in k8s.get(executor, {}), task
            assert resources["resourceCpuRequest"] == "1"
            assert resources["resourceCpuLimit"] == "2" and resources["resourceMemoryLimit"] == "4G", task


def test_images_come_from_skaffold_build_output(compiled, build_json):
    spec, _ = load(compiled)
    builds = {b["imageName"]: b["tag"] for b in json.loads(build_json.read_text())["builds"]}
    for task in GPU_TASKS | CPU_TASKS:
        image = spec["deploymentSpec"]["executors"][executor_of(spec, task)]["container"]["image"]
        assert image == builds["ftloop-gpu" if task in GPU_TASKS else "ftloop-cpu"], task
    # The config compare_models records (summary.json) carries the same images, so tasks and config agree.
    compare = all_tasks(spec)["compare-models"]["inputs"]["parameters"]["config_slice"]["runtimeValue"]["constant"]
    assert json.loads(compare)["config"]["cluster"]["gpu_image"] == builds["ftloop-gpu"]


def test_image_flags_override_build_json(tmp_path, build_json):
    out = tmp_path / "p.yaml"
    result = run_cli(
        "compile",
        "--config",
        str(GKE_CONFIG),
        "--output",
        str(out),
        "--images-from",
        str(build_json),
        "--image",
        "gpu=reg.example/ftloop-gpu:hotfix",
    )
    assert result.returncode == 0, result.stderr
    spec, _ = load(out)
    executors = spec["deploymentSpec"]["executors"]
    assert executors[executor_of(spec, "finetune")]["container"]["image"] == "reg.example/ftloop-gpu:hotfix"
    assert executors[executor_of(spec, "split-examples")]["container"]["image"].startswith("us-docker.pkg.dev/p/ftloop/ftloop-cpu:9f1c2ab@")


def test_no_secret_anywhere_in_the_compiled_yaml(tmp_path):
    """Okareo generates the questions and the rephrasings, so those tasks need the key: by reference only."""
    planted = "okareo-FAKE-KEY-planted-7c1d"
    raw = yaml.safe_load(GKE_CONFIG.read_text())
    raw["data"]["articles"] = str((GKE_CONFIG.parent / raw["data"]["articles"]).resolve())
    raw["generate"]["backend"] = raw["augment"]["backend"] = "okareo"
    config = tmp_path / "okareo.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "p.yaml"
    result = run_cli("compile", "--config", str(config), "--output", str(out), env={"OKAREO_API_KEY": planted})
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert planted not in text + result.stdout + result.stderr
    spec, k8s = load(out)
    with_secret = {task for task in GPU_TASKS | CPU_TASKS if "secretAsEnv" in k8s.get(executor_of(spec, task), {})}
    assert with_secret == {"prepare-examples", "augment-from-errors"}
    for task in with_secret:
        [ref] = k8s[executor_of(spec, task)]["secretAsEnv"]
        assert (ref["secretName"], ref["keyToEnv"]) == ("okareo-api-key", [{"secretKey": "api-key", "envVar": "OKAREO_API_KEY"}])
    assert text.count("OKAREO_API_KEY") == 2  # the two references, nothing else


def test_offline_backends_reference_no_secret(compiled):
    assert "OKAREO_API_KEY" not in compiled.read_text()


def test_gcs_pipeline_root_and_importer(compiled):
    spec, _ = load(compiled)
    assert spec["defaultPipelineRoot"] == load_config(GKE_CONFIG).cluster.pipeline_root
    assert spec["defaultPipelineRoot"].startswith("gs://")
    importer = spec["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert importer["artifactUri"] == {"runtimeParameter": "uri"}
    assert spec["root"]["dag"]["tasks"]["importer"]["inputs"]["parameters"]["uri"] == {"componentInputParameter": "source_uri"}


def test_a_local_data_path_never_becomes_the_source_default(compiled):
    """webbizz-gke.yaml's data path is local: source_uri is required at run time, not a path on this machine."""
    spec, _ = load(compiled)
    source = spec["root"]["inputDefinitions"]["parameters"]["source_uri"]
    assert "defaultValue" not in source and source.get("isOptional") is not True


def test_compile_source_uri_flag_sets_the_default(tmp_path):
    out = tmp_path / "p.yaml"
    uri = "gs://ftloop-data/webbizz/articles.jsonl"
    result = run_cli("compile", "--config", str(GKE_CONFIG), "--output", str(out), "--source-uri", uri)
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stdout
    spec, _ = load(out)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["source_uri"]["defaultValue"] == uri
    prepare = all_tasks(spec)["prepare-examples"]["inputs"]["parameters"]["config_slice"]["runtimeValue"]["constant"]
    assert json.loads(prepare)["config"]["data"]["articles"] == uri
    assert "/data/webbizz/articles.jsonl" not in out.read_text().replace(uri, "")


def test_compile_without_a_gs_source_says_source_uri_is_required(tmp_path):
    result = run_cli("compile", "--config", str(GKE_CONFIG), "--output", str(tmp_path / "p.yaml"))
    assert result.returncode == 0, result.stderr
    assert "is a local path, so source_uri has no default" in result.stdout


def test_compile_refuses_a_local_source_uri(tmp_path):
    result = run_cli("compile", "--config", str(GKE_CONFIG), "--output", str(tmp_path / "p.yaml"), "--source-uri", "articles.jsonl")
    assert result.returncode == 2
    assert "--source-uri 'articles.jsonl': expected an object-store URI" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.yaml").exists()


def cluster_variant(tmp_path, **cluster):
    config = load_config(GKE_CONFIG)
    return config.model_copy(update={"cluster": config.cluster.model_copy(update=cluster)})


def test_gs_source_goes_through_the_importer(tmp_path):
    config = load_config(GKE_CONFIG)
    config = config.model_copy(update={"data": config.data.model_copy(update={"articles": "gs://ftloop-data/webbizz/articles.jsonl"})})
    spec, _ = load(compile_pipeline(config, tmp_path / "p.yaml"))
    assert spec["root"]["inputDefinitions"]["parameters"]["source_uri"]["defaultValue"] == "gs://ftloop-data/webbizz/articles.jsonl"


def test_spot_and_model_cache_only_on_gpu_tasks(tmp_path):
    config = cluster_variant(tmp_path, spot=True, model_cache_pvc="ftloop-model-cache", model_cache_gcsfuse=True)
    spec, k8s = load(compile_pipeline(config, tmp_path / "p.yaml"))
    for task in GPU_TASKS | CPU_TASKS:
        executor = executor_of(spec, task)
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        if task in GPU_TASKS:
            assert k8s[executor]["nodeSelector"] == {
                "labels": {"cloud.google.com/gke-accelerator": "nvidia-l4", "cloud.google.com/gke-spot": "true"}
            }
            assert {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"} in k8s[executor][
                "tolerations"
            ]
            assert k8s[executor]["pvcMount"] == [
                {
                    "mountPath": "/cache/hf",
                    "constant": "ftloop-model-cache",
                    "pvcNameParameter": {"runtimeValue": {"constant": "ftloop-model-cache"}},
                }
            ]
            assert env["HF_HOME"] == "/cache/hf" and env["HF_HUB_OFFLINE"] == "1"
            assert k8s[executor]["podMetadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
        else:
            assert executor not in k8s, task
            assert "HF_HOME" not in env


def with_backends(**backends):
    config = load_config(GKE_CONFIG)
    return config.model_copy(
        update={
            name: type(getattr(config, name)).model_validate({**getattr(config, name).model_dump(), "backend": backend})
            for name, backend in backends.items()
        }
    )


def model_cache_volume(k8s_executor, env):
    return (
        k8s_executor.get("pvcMount"),
        env.get("HF_HOME"),
        env.get("HF_HUB_OFFLINE"),
        k8s_executor.get("podMetadata", {}).get("annotations"),
    )


CACHE = (
    [
        {
            "mountPath": "/cache/hf",
            "constant": "ftloop-model-cache",
            "pvcNameParameter": {"runtimeValue": {"constant": "ftloop-model-cache"}},
        }
    ],
    "/cache/hf",
    "1",
    {"gke-gcsfuse/volumes": "true"},
)


@pytest.mark.parametrize(
    "backends, also_on_gpu",
    [
        ({}, set()),
        ({"generate": "hf"}, {"prepare-examples"}),
        ({"augment": "hf"}, {"augment-from-errors"}),
        ({"generate": "hf", "augment": "hf"}, {"prepare-examples", "augment-from-errors"}),
    ],
)
def test_hf_generation_runs_on_the_l4_with_the_model_cache(tmp_path, backends, also_on_gpu):
    """Self-hosted generation is a GPU task; by default only the model tasks get the L4."""
    config = with_backends(**backends)
    spec, k8s = load(compile_pipeline(config, tmp_path / "p.yaml"))
    tasks = all_tasks(spec)
    for task in GPU_TASKS | CPU_TASKS:
        executor = executor_of(spec, task)
        container = spec["deploymentSpec"]["executors"][executor]["container"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        if task in GPU_TASKS | also_on_gpu:
            assert container["resources"]["accelerator"]["resourceCount"] == "1", task
            assert container["image"] == config.cluster.gpu_image, task
            assert k8s[executor]["nodeSelector"] == L4, task
            assert model_cache_volume(k8s[executor], env) == CACHE, task
        else:
            assert "accelerator" not in container["resources"], task
            assert container["image"] == config.cluster.cpu_image, task
            assert "nodeSelector" not in k8s.get(executor, {}) and "HF_HOME" not in env, task
    for task in also_on_gpu:  # generation samples: never cached, retried like the other GPU tasks
        assert tasks[task]["cachingOptions"] == {} and tasks[task]["retryPolicy"]["maxRetryCount"] == 2


def test_webbizz_gke_reads_weights_from_the_model_cache(compiled):
    """Every task that loads weights mounts the cache PVC of manifests/base/model-cache.yaml at the image's HF_HOME."""
    spec, k8s = load(compiled)
    claim = next(
        d for d in yaml.safe_load_all((REPO / "manifests/base/model-cache.yaml").read_text()) if d["kind"] == "PersistentVolumeClaim"
    )
    gpu_dockerfile = (REPO / "images/gpu/Dockerfile").read_text()
    assert claim["metadata"]["name"] == CACHE[0][0]["constant"] and f"HF_HOME={CACHE[1]}" in gpu_dockerfile
    for task in GPU_TASKS:
        executor = executor_of(spec, task)
        env = {e["name"]: e["value"] for e in spec["deploymentSpec"]["executors"][executor]["container"].get("env", [])}
        assert model_cache_volume(k8s[executor], env) == CACHE, task


@pytest.mark.parametrize(
    "sections, secret_tasks",
    [
        (("generate",), {"prepare-examples"}),
        (("augment",), {"augment-from-errors"}),
        (("generate", "augment"), {"prepare-examples", "augment-from-errors"}),
    ],
)
def test_okareo_key_only_on_tasks_that_call_okareo(tmp_path, monkeypatch, sections, secret_tasks):
    monkeypatch.setenv("OKAREO_API_KEY", "okareo-FAKE-KEY-planted-7c1d")
    config = with_backends(**{name: "okareo" for name in sections})
    out = tmp_path / "p.yaml"
    compile_pipeline(config, out)
    text = out.read_text()
    assert "okareo-FAKE-KEY-planted-7c1d" not in text
    spec, k8s = load(out)
    tasks = all_tasks(spec)
    for task in GPU_TASKS | CPU_TASKS:
        secrets = k8s.get(executor_of(spec, task), {}).get("secretAsEnv")
        if task in secret_tasks:
            assert secrets == [
                {
                    "secretName": "okareo-api-key",
                    "keyToEnv": [{"secretKey": "api-key", "envVar": "OKAREO_API_KEY"}],
                    "secretNameParameter": {"runtimeValue": {"constant": "okareo-api-key"}},
                    "optional": False,
                }
            ]
            assert tasks[task]["cachingOptions"] == {}, task
            assert tasks[task]["retryPolicy"]["maxRetryCount"] == 2
        else:
            assert secrets is None, task


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{", "build.json:1: not valid JSON"),
        ('{"builds": [{"imageName": "ftloop-cpu", "tag": "r/ftloop-cpu:1"}]}', "no build for ftloop-gpu"),
        ('{"builds": [{"imageName": "ftloop-cpu"}]}', "builds[0]: needs string fields 'imageName' and 'tag'"),
        ("[]", "expected a JSON object with a 'builds' list"),
    ],
)
def test_bad_build_json_is_a_clear_error(tmp_path, content, expected):
    bad = tmp_path / "build.json"
    bad.write_text(content)
    result = run_cli("compile", "--config", str(GKE_CONFIG), "--output", str(tmp_path / "p.yaml"), "--images-from", str(bad))
    assert result.returncode == 2
    assert expected in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("cpu", "--image 'cpu': expected cpu=IMAGE_REF or gpu=IMAGE_REF"),
        ("tpu=x:1", "expected cpu=IMAGE_REF"),
        ("cpu=registry:5000/ftloop-cpu", "cluster.cpu_image: image 'registry:5000/ftloop-cpu' has no tag or digest"),
    ],
)
def test_bad_image_flags(tmp_path, flag, expected):
    result = run_cli("compile", "--config", str(GKE_CONFIG), "--output", str(tmp_path / "p.yaml"), "--image", flag)
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_local_pipeline_root_is_refused(tmp_path):
    with pytest.raises(Exception, match="cluster.pipeline_root: '/tmp/root' is not an object-store URI"):
        compile_pipeline(cluster_variant(tmp_path, pipeline_root="/tmp/root"), tmp_path / "p.yaml")
