"""Compile a run config into a KFP pipeline YAML for the cluster.

Image references come from the run config, from skaffold's build output
(``skaffold build --file-output build.json``) or from ``--image cpu=REF``
flags, in increasing priority. A cluster pipeline never runs a ``latest`` or
untagged image: cached steps are keyed on the image string, so a mutable tag
would return stale results.
"""

from __future__ import annotations

import json
from pathlib import Path

from kfp import compiler

from ftloop.components.config import ClusterConfig, RunConfig, url_credentials
from ftloop.components.errors import FtloopError
from ftloop.pipelines.pipeline import build_pipeline
from ftloop.pipelines.placement import REMOTE_SCHEMES

# skaffold artifact names (skaffold.yaml build.artifacts[].image) -> image role.
# What a compiled task's config slice says in place of a local data path (the run reads source_uri).
SOURCE_PLACEHOLDER = "(the source_uri run parameter)"
SKAFFOLD_ARTIFACTS = {"ftloop-cpu": "cpu", "ftloop-gpu": "gpu"}
ROLES = ("cpu", "gpu")


def load_skaffold_builds(path: str | Path) -> dict[str, str]:
    """``{"cpu": REF, "gpu": REF}`` from a skaffold ``--file-output`` file (``{"builds": [{"imageName", "tag"}]}``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FtloopError(f"{path}: skaffold build output not found (write it with 'skaffold build --file-output {path}')") from None
    except json.JSONDecodeError as exc:
        raise FtloopError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FtloopError(f"{path}: cannot read skaffold build output: {exc}") from None
    builds = data.get("builds") if isinstance(data, dict) else None
    if not isinstance(builds, list):
        raise FtloopError(f"{path}: expected a JSON object with a 'builds' list (skaffold build --file-output format)")
    images: dict[str, str] = {}
    for i, build in enumerate(builds):
        if not isinstance(build, dict) or not isinstance(build.get("imageName"), str) or not isinstance(build.get("tag"), str):
            raise FtloopError(f"{path}: builds[{i}]: needs string fields 'imageName' and 'tag'")
        role = SKAFFOLD_ARTIFACTS.get(build["imageName"].rsplit("/", 1)[-1])
        if role is not None:
            images[role] = build["tag"]
    missing = [f"ftloop-{role}" for role in ROLES if role not in images]
    if missing:
        raise FtloopError(f"{path}: no build for {', '.join(missing)} (found: {', '.join(b['imageName'] for b in builds) or 'none'})")
    return images


def parse_image_flags(flags: list[str]) -> dict[str, str]:
    """``["cpu=REF", "gpu=REF"]`` -> ``{"cpu": REF, "gpu": REF}``."""
    images: dict[str, str] = {}
    for flag in flags:
        role, sep, ref = flag.partition("=")
        if not sep or role not in ROLES or not ref:
            raise FtloopError(f"--image {flag!r}: expected cpu=IMAGE_REF or gpu=IMAGE_REF")
        images[role] = ref
    return images


def check_image_ref(field: str, ref: str) -> None:
    name, _, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2] if ":" in last else None
    if not digest and not tag:
        raise FtloopError(f"{field}: image '{ref}' has no tag or digest; use the tag skaffold built (--images-from build.json)")
    if tag == "latest" and not digest:
        raise FtloopError(f"{field}: image '{ref}' uses the mutable 'latest' tag; use the tag skaffold built (--images-from build.json)")


def with_images(config: RunConfig, images: dict[str, str] | None) -> RunConfig:
    """The config with its cluster images replaced by ``images`` (roles cpu/gpu), checked for a pinned tag."""
    updates = {f"{role}_image": ref for role, ref in (images or {}).items()}
    cluster: ClusterConfig = config.cluster.model_copy(update=updates)
    for role in ROLES:
        check_image_ref(f"cluster.{role}_image", getattr(cluster, f"{role}_image"))
    return config.model_copy(update={"cluster": cluster})


def check_cluster_config(config: RunConfig) -> None:
    if config.model.name_or_path.startswith("builtin:"):
        raise FtloopError(
            f"model.name_or_path: '{config.model.name_or_path}' is built on the fly for local runs only; "
            "a cluster pipeline needs a hub id with a pinned revision or a path in the image/cache"
        )
    root = config.cluster.pipeline_root
    if root is not None and not root.startswith(REMOTE_SCHEMES):
        raise FtloopError(f"cluster.pipeline_root: '{root}' is not an object-store URI; use gs://BUCKET/PATH")


def remote_source(config: RunConfig, override: str | None = None) -> str | None:
    """The object-store URI a cluster run reads its data from (``override`` first), or None for a local path."""
    secret = url_credentials(override) if override is not None else None
    if secret:  # never echoed: the value is the secret
        raise FtloopError(
            f"--source-uri: the URI contains {secret}; the pipeline's service account reads the bucket, so no credentials belong in the URI"
        )
    if override is not None and not override.startswith(REMOTE_SCHEMES):
        raise FtloopError(f"--source-uri '{override}': expected an object-store URI such as gs://BUCKET/articles.jsonl")
    uri = override or config.data.source_path
    return uri if uri.startswith(REMOTE_SCHEMES) else None


def with_source(config: RunConfig, uri: str) -> RunConfig:
    """The config with its data path (articles or questions, whichever it has) replaced by ``uri``."""
    key = "articles" if config.data.articles else "questions"
    return config.model_copy(update={"data": config.data.model_copy(update={key: uri})})


def compile_pipeline(config: RunConfig, output: str | Path, images: dict[str, str] | None = None, source_uri: str | None = None) -> Path:
    """Write the cluster pipeline for ``config`` (images overridden by ``images``) to ``output``.

    A gs:// source (``source_uri`` or the config's data path) becomes the default of the
    ``source_uri`` parameter; a local data path leaves the parameter without a default and is
    replaced by ``SOURCE_PLACEHOLDER`` in the tasks' config slices, so the compiled pipeline
    never points at a file on the machine that compiled it.
    """
    output = Path(output)
    check_cluster_config(config)
    config = with_images(config, images)
    uri = remote_source(config, source_uri)
    # The compiled tasks never name a file on this machine: the run's data is the source_uri parameter.
    config = with_source(config, uri if uri is not None else SOURCE_PLACEHOLDER)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(build_pipeline(config, for_cluster=True), str(output))
    except OSError as exc:
        raise FtloopError(f"{output}: cannot write pipeline: {exc.strerror or exc}") from None
    return output
