"""Kubernetes task configuration, applied in one place.

GPU placement on GKE needs both the accelerator resource and a node selector
(KFP v2's ``add_node_selector_constraint`` is not a node selector; see
notes/kfp.md §3). The local runner ignores all of this.
"""

from __future__ import annotations

from kfp import kubernetes
from kfp.dsl import PipelineTask

from ftloop.components.config import ClusterConfig

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


def quiet_ml_env(task: PipelineTask) -> PipelineTask:
    for name, value in QUIET_ML_ENV.items():
        task.set_env_variable(name, value)
    return task


def configure_cpu_task(task: PipelineTask, cluster: ClusterConfig) -> PipelineTask:
    task.set_container_image(cluster.cpu_image)
    task.set_cpu_request("1").set_memory_request("2G")
    return task


def configure_gpu_task(task: PipelineTask, cluster: ClusterConfig) -> PipelineTask:
    """One L4 per task, pinned to the L4 node pool; never cached; retried (training resumes)."""
    task.set_container_image(cluster.gpu_image)
    task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(1)
    task.set_cpu_request(cluster.gpu_cpu_request).set_memory_request(cluster.gpu_memory_request)
    task.set_caching_options(False)
    task.set_retry(cluster.retries, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.add_node_selector(task, label_key=GKE_ACCELERATOR_LABEL, label_value=cluster.accelerator_node_label)
    kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    if cluster.spot:
        kubernetes.add_node_selector(task, label_key=GKE_SPOT_LABEL, label_value="true")
        kubernetes.add_toleration(task, key=GKE_SPOT_LABEL, operator="Equal", value="true", effect="NoSchedule")
    mount_model_cache(task, cluster)
    return task


def mount_model_cache(task: PipelineTask, cluster: ClusterConfig) -> PipelineTask:
    """Base weights from the cache volume at HF_HOME, read offline (no hub download per run)."""
    if cluster.model_cache_pvc is None:
        return task
    kubernetes.mount_pvc(task, pvc_name=cluster.model_cache_pvc, mount_path=cluster.model_cache_mount_path)
    task.set_env_variable("HF_HOME", cluster.model_cache_mount_path)
    task.set_env_variable("HF_HUB_OFFLINE", "1")
    if cluster.model_cache_gcsfuse:
        kubernetes.add_pod_annotation(task, annotation_key=GCSFUSE_ANNOTATION, annotation_value="true")
    return task


def backend_of(section: object) -> str:
    """The generation backend of a config section (``generate`` or ``augment``), as a plain string."""
    return str(getattr(section, "backend", "offline"))


def attach_okareo_secret(task: PipelineTask, cluster: ClusterConfig) -> PipelineTask:
    """OKAREO_API_KEY from the cluster Secret, on this task only; the value never enters the pipeline spec."""
    kubernetes.use_secret_as_env(
        task, secret_name=cluster.okareo_secret_name, secret_key_to_env={cluster.okareo_secret_key: OKAREO_ENV}
    )
    return task


def configure_llm_task(task: PipelineTask, cluster: ClusterConfig, backend: str) -> PipelineTask:
    """A CPU task that may call a remote generator: uncached and retried unless offline, plus its secret."""
    if backend == "offline":
        return task
    task.set_caching_options(False)
    task.set_retry(cluster.retries, backoff_duration="30s", backoff_factor=2.0)
    if backend == "okareo":
        attach_okareo_secret(task, cluster)
    return task
