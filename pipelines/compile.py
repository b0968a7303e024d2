"""Compile a run config into a KFP pipeline YAML for the cluster."""

from __future__ import annotations

from pathlib import Path

from kfp import compiler

from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from ftloop.pipelines.pipeline import build_pipeline


def compile_pipeline(config: RunConfig, output: str | Path) -> Path:
    output = Path(output)
    if config.model.name_or_path.startswith("builtin:"):
        raise FtloopError(
            f"model.name_or_path: '{config.model.name_or_path}' is built on the fly for local runs only; "
            "a cluster pipeline needs a hub id with a pinned revision or a path in the image/cache"
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(build_pipeline(config, for_cluster=True), str(output))
    except OSError as exc:
        raise FtloopError(f"{output}: cannot write pipeline: {exc.strerror or exc}") from None
    return output
