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
        kubernetes.add_toleration(task, key=GKE_SPOT_LABEL, operator="Equal", value="true", effect="NoSchedule")
    return task
