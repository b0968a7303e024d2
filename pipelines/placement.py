"""Task placement: every setting a pipeline task gets beyond its inputs, decided in one place.

``pipeline.py`` and ``loop.py`` only say what each task is -- a CPU stage, a GPU stage, a
call to a generator backend, a deterministic data stage, a stage that trains or scores a
model -- and a placement turns that into task settings. Two policies share one interface:

* ``LocalPlacement`` (kfp.local): display names and a quiet ML environment; every stage whose
  output follows from its inputs is cached, under a key that chains the task's own inputs (its
  config slice and run parameters), the keys of the tasks it reads from, the ftloop code and the
  source file's content (``local_cache_key``). A remote generator call is never cached, nor is
  training and scoring when ``cluster.cache_training`` is false.
* ``ClusterPlacement`` (Kubeflow Pipelines on GKE): images, resource requests and limits, one L4
  per GPU task on the L4 node pool (optionally Spot), the model-cache volume, retries, caching
  (KFP's own, keyed on each task's inputs: its config slice and run parameters) except for remote
  generator calls and, with ``cluster.cache_training: false``, training and scoring, and API keys
  from Kubernetes Secrets (the values never enter the pipeline spec).

GPU placement on GKE needs both the accelerator resource and a Kubernetes node selector on
the node pool's label. KFP v2's ``PipelineTask.add_node_selector_constraint`` is not a node
selector: it is a deprecated alias of ``set_accelerator_type``, which only sets the
container's accelerator resource, so the selector comes from ``kfp.kubernetes.add_node_selector``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from kfp import kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_channel import OneOfMixin, PipelineChannel

from ftloop.components.config import ClusterConfig, OpenAIConfig, RunConfig

# Object stores the KFP launcher reads with dsl.importer; anything else is a path on this machine.
REMOTE_SCHEMES = ("gs://", "s3://", "minio://")

GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
GKE_SPOT_LABEL = "cloud.google.com/gke-spot"
GCSFUSE_ANNOTATION = "gke-gcsfuse/volumes"
OKAREO_ENV = "OKAREO_API_KEY"
QUIET_ML_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """``ftloop-<version>-code-<hash of every components/ module>``: moved or edited code invalidates the local cache."""
    import ftloop
    import ftloop.components

    code = hashlib.sha256()
    root = Path(ftloop.components.__file__).parent
    for path in sorted(root.rglob("*.py")):  # every subpackage: moved code must still invalidate the cache
        code.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return f"ftloop-{ftloop.__version__}-code-{code.hexdigest()[:16]}"


def local_cache_key(
    task: PipelineTask, upstream: dict[str, str], parameters: dict[str, Any], source_sha256: str, nonce: str | None = None
) -> str:
    """The kfp.local cache key of ``task``: everything its output depends on, upstream tasks included.

    kfp.local 2.17.3 hashes only the component name and this custom key (the task's arguments
    play no part once a key is set), so the key names: the task's own inputs (its config slice
    and other constants, the values of the run parameters it takes), for every input another
    task produces that task's key (``upstream``; a ``dsl.OneOf`` names every branch), the ftloop
    code and the source file's content. An edit to augmentation settings changes the augment
    tasks' slices and so their keys and their downstream tasks' keys, and nothing upstream.
    ``nonce`` (a task that is not cached) makes the key unique to this run, so nothing
    downstream of a rerun task is served from an earlier run.
    """

    def encode(value: Any) -> Any:
        if isinstance(value, OneOfMixin):
            return {"one_of": [encode(channel) for channel in value.channels]}
        if isinstance(value, PipelineChannel):
            if value.task_name is None:  # a pipeline parameter: locally always its default, the config's value
                return {"parameter": value.name, "value": parameters[value.name]}
            return {"task": upstream[value.task_name], "output": value.name}
        return value

    identity = {
        "component": task.component_spec.name,
        "inputs": {name: encode(value) for name, value in sorted(task.inputs.items())},
        "nonce": nonce,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()
    return f"{code_fingerprint()}:source-sha256:{source_sha256}:task-sha256:{digest}"


def quiet_ml_env(task: PipelineTask) -> PipelineTask:
    for name, value in QUIET_ML_ENV.items():
        task.set_env_variable(name, value)
    return task


class Placement(ABC):
    """What a task's kind means where the pipeline runs. Every method returns the task it was given.

    Call order per task: ``cpu``/``gpu`` (or ``generation``) first, then ``data`` or ``training``
    if the stage may be cached; a task is placed before any task that reads its outputs is created.
    """

    #: The pipeline's default pipeline_root (None: the runner's own).
    pipeline_root: str | None = None

    @abstractmethod
    def source_default(self, source_path: str) -> str | None:
        """The default of the pipeline's ``source_uri`` parameter; None makes it a required run parameter."""

    def source(self, task: PipelineTask, name: str) -> PipelineTask:
        """The importer of the run's source data."""
        task.set_display_name(name)
        return task

    @abstractmethod
    def cpu(self, task: PipelineTask, name: str) -> PipelineTask:
        """A CPU stage. Locally not cached unless ``data`` says so."""

    @abstractmethod
    def gpu(self, task: PipelineTask, name: str) -> PipelineTask:
        """A stage that loads a model: training, scoring, hf generation. Not cached unless ``training`` says so."""

    @abstractmethod
    def data(self, task: PipelineTask, cacheable: bool = True) -> PipelineTask:
        """A stage whose output is a pure function of its inputs when ``cacheable``."""

    @abstractmethod
    def training(self, task: PipelineTask) -> PipelineTask:
        """A stage that trains or scores a model: cached when ``cluster.cache_training`` allows it.

        Training on a GPU is not bit-reproducible, but an unchanged fine-tune is worth an L4 hour.
        """

    def generation(self, task: PipelineTask, name: str, backend: str, needs_gpu: bool = False) -> PipelineTask:
        """A task that calls a generator backend (or Okareo): on a GPU for hf or when ``needs_gpu``.

        The offline generator is deterministic and cached like the stage it runs in; any other
        backend samples a model or calls a remote API, and is never cached.
        """
        on_gpu = needs_gpu or backend == "hf"
        task = self.gpu(task, name) if on_gpu else self.cpu(task, name)
        if backend == "offline":
            return self.training(task) if on_gpu else self.data(task)
        return self.calls_backend(task, backend)

    def calls_backend(self, task: PipelineTask, backend: str) -> PipelineTask:
        """What calling ``backend`` adds to a task (nothing by default)."""
        return task


class LocalPlacement(Placement):
    """kfp.local: every task gets a key chained from its inputs and its upstream tasks' keys
    (``local_cache_key``); the cacheable ones are cached under it. Without a source hash
    (``source_sha256`` None) or with ``use_cache`` off nothing is cached."""

    def __init__(self, parameters: dict[str, Any], source_sha256: str | None = None, cache_training: bool = True, use_cache: bool = True):
        self.parameters = parameters
        self.source_sha256 = source_sha256
        self.cache_training = cache_training
        self.enabled = use_cache and source_sha256 is not None
        self.keys: dict[str, str] = {}  # task name -> its cache key, for the tasks downstream of it
        self.nonce = uuid.uuid4().hex  # this run: the key of a task that always reruns

    def source_default(self, source_path: str) -> str | None:
        return source_path

    def source(self, task: PipelineTask, name: str) -> PipelineTask:
        task.set_display_name(name)
        self.keys[task.name] = f"source-sha256:{self.source_sha256 or self.nonce}"
        return task

    def _cache(self, task: PipelineTask, cached: bool) -> PipelineTask:
        key = local_cache_key(task, self.keys, self.parameters, self.source_sha256 or "none", nonce=None if cached else self.nonce)
        self.keys[task.name] = key
        cached = cached and self.enabled
        task.set_caching_options(cached, cache_key=key if cached else None)
        return task

    def cpu(self, task: PipelineTask, name: str) -> PipelineTask:
        task.set_display_name(name)
        return self._cache(task, False)  # the deterministic stages opt in with data()

    def gpu(self, task: PipelineTask, name: str) -> PipelineTask:
        task.set_display_name(name)
        return self._cache(quiet_ml_env(task), False)

    def data(self, task: PipelineTask, cacheable: bool = True) -> PipelineTask:
        return self._cache(task, cacheable)

    def training(self, task: PipelineTask) -> PipelineTask:
        return self._cache(task, self.cache_training)


class ClusterPlacement(Placement):
    """Kubeflow Pipelines on GKE, as configured by the run config's ``cluster`` section."""

    def __init__(self, cluster: ClusterConfig, openai: OpenAIConfig):
        self.cluster = cluster
        self.openai = openai
        self.pipeline_root = cluster.pipeline_root

    def source_default(self, source_path: str) -> str | None:
        # Never a path on the machine that compiled the pipeline: ftloop submit passes a gs:// URI.
        return source_path if source_path.startswith(REMOTE_SCHEMES) else None

    def cpu(self, task: PipelineTask, name: str) -> PipelineTask:
        """Requests and limits from the config: a CPU limit is safe here (no accelerator waits on these tasks)."""
        cluster = self.cluster
        task.set_display_name(name)
        task.set_container_image(cluster.cpu_image)
        task.set_cpu_request(cluster.cpu_task_cpu_request).set_memory_request(cluster.cpu_task_memory_request)
        task.set_memory_limit(cluster.cpu_task_memory_limit)
        if cluster.cpu_task_cpu_limit is not None:
            task.set_cpu_limit(cluster.cpu_task_cpu_limit)
        return task

    def gpu(self, task: PipelineTask, name: str) -> PipelineTask:
        """One L4 per task, pinned to the L4 node pool; not cached unless ``training``; retried (training resumes).

        A memory limit always (a leak is killed on its own pod, not the node); a CPU limit only when
        ``gpu_cpu_limit`` is set: CFS throttling of tokenization and data loading would idle the L4.
        """
        cluster = self.cluster
        task.set_display_name(name)
        quiet_ml_env(task)
        task.set_container_image(cluster.gpu_image)
        task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(1)
        task.set_cpu_request(cluster.gpu_cpu_request).set_memory_request(cluster.gpu_memory_request)
        task.set_memory_limit(cluster.gpu_memory_limit)
        if cluster.gpu_cpu_limit is not None:
            task.set_cpu_limit(cluster.gpu_cpu_limit)
        task.set_caching_options(False)
        task.set_retry(cluster.retries, backoff_duration="60s", backoff_factor=2.0)
        kubernetes.add_node_selector(task, label_key=GKE_ACCELERATOR_LABEL, label_value=cluster.accelerator_node_label)
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
        if cluster.spot:
            kubernetes.add_node_selector(task, label_key=GKE_SPOT_LABEL, label_value="true")
            kubernetes.add_toleration(task, key=GKE_SPOT_LABEL, operator="Equal", value="true", effect="NoSchedule")
        return self.mount_model_cache(task)

    def data(self, task: PipelineTask, cacheable: bool = True) -> PipelineTask:
        # KFP caches a task unless told otherwise, keyed on its inputs (config slice, run parameters,
        # upstream artifacts) and image; the tasks that must not be cached are switched off where placed.
        if not cacheable:
            task.set_caching_options(False)
        return task

    def training(self, task: PipelineTask) -> PipelineTask:
        task.set_caching_options(self.cluster.cache_training)
        return task

    def calls_backend(self, task: PipelineTask, backend: str) -> PipelineTask:
        """A remote generator call: uncached and retried, with the backend's key from a Kubernetes Secret.
        The offline backend is a pure function of its inputs and keeps the task's defaults."""
        if backend == "offline":
            return task
        task.set_caching_options(False)
        task.set_retry(self.cluster.retries, backoff_duration="30s", backoff_factor=2.0)
        if backend == "okareo":
            self.attach_okareo_secret(task)
        if backend == "openai" and self.openai.secret_name:
            kubernetes.use_secret_as_env(task, secret_name=self.openai.secret_name, secret_key_to_env={"api-key": self.openai.api_key_env})
        return task

    def mount_model_cache(self, task: PipelineTask) -> PipelineTask:
        """Base weights from the cache volume at HF_HOME, read offline (no hub download per run)."""
        cluster = self.cluster
        if cluster.model_cache_pvc is None:
            return task
        kubernetes.mount_pvc(task, pvc_name=cluster.model_cache_pvc, mount_path=cluster.model_cache_mount_path)
        task.set_env_variable("HF_HOME", cluster.model_cache_mount_path)
        task.set_env_variable("HF_HUB_OFFLINE", "1")
        if cluster.model_cache_gcsfuse:
            kubernetes.add_pod_annotation(task, annotation_key=GCSFUSE_ANNOTATION, annotation_value="true")
        return task

    def attach_okareo_secret(self, task: PipelineTask) -> PipelineTask:
        """OKAREO_API_KEY from the cluster Secret, on this task only; the value never enters the pipeline spec."""
        kubernetes.use_secret_as_env(
            task,
            secret_name=self.cluster.okareo_secret_name,
            secret_key_to_env={self.cluster.okareo_secret_key: OKAREO_ENV},
        )
        return task


def placement_for(config: RunConfig, for_cluster: bool, source_sha256: str | None = None, use_cache: bool = True) -> Placement:
    """The cluster policy, or the local one keyed to ``source_sha256`` (no hash or ``use_cache`` off: no cache)."""
    if for_cluster:
        return ClusterPlacement(config.cluster, config.generators.openai)
    parameters = {**config.runtime_values(), "source_uri": f"sha256:{source_sha256}"}
    return LocalPlacement(parameters, source_sha256, cache_training=config.cluster.cache_training, use_cache=use_cache)
