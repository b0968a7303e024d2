"""Run the whole pipeline on this machine with KFP's local runner (no cluster, no GPU)."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

from ftloop.components.config import TINY_MODEL_REF, RunConfig
from ftloop.components.errors import FtloopError
from ftloop.components.records import content_hash, write_json
from ftloop.components.sources import load_source

RESULT_FILES = ("summary.json", "report.md", "report.html")


def ensure_tiny_model(config: RunConfig, workdir: Path, texts: list[str], labels: list[str], progress: Callable[[str], None]) -> RunConfig:
    """Replace ``builtin:tiny-phi3`` by a model directory built offline from this run's data."""
    if config.model.name_or_path != TINY_MODEL_REF:
        return config
    from ftloop.components.tiny_model import build_tiny_model, reusable_tiny_model

    model_dir = workdir / "models" / "tiny-phi3"
    # Reused only if it was completely written from this data, these labels and this seed.
    if reusable_tiny_model(model_dir, texts, labels, seed=config.seed):
        progress(f"tiny model: reusing {model_dir}")
    else:
        progress(f"tiny model: building a random-init Phi-3-architecture model in {model_dir}")
        build_tiny_model(model_dir, texts, labels, seed=config.seed, replace=True)
    return config.with_model_path(str(model_dir))


def check_base_model(config: RunConfig) -> None:
    """A local base model must be loadable before any stage starts; hub ids are checked when they are loaded."""
    from ftloop.components.finetune import check_model_ref, load_tokenizer

    ref = config.model.name_or_path
    check_model_ref(ref)
    if Path(ref).is_dir():
        load_tokenizer(ref)  # chat template and a pad token distinct from eos
    if "hf" in (config.generate.backend if config.data.articles else None, config.augment.backend):
        check_model_ref(config.generators.hf.name_or_path, key="generators.hf.name_or_path")


def support_oneof_artifacts_locally() -> None:
    """Let kfp.local resolve ``dsl.OneOf`` over artifacts, as the KFP backend does.

    kfp 2.17.3's local orchestrator resolves a OneOf over *parameters* (it takes
    the output of whichever branch ran) but refuses one over *artifacts*:
    ``ValueError: Expected 1 artifact in ArtifactSelectorSpec. Got: 2``
    (``kfp/local/orchestrator/orchestrator_utils.py``, ``get_dag_output_artifacts``).
    The augmentation loop hands each round's model and evaluation on through
    ``dsl.If``/``dsl.Else`` + ``dsl.OneOf``, so the local runner gets the same rule
    for artifacts that it already applies to parameters. Only the local runner
    is affected; compiled pipelines are unchanged. kfp is pinned (==2.17.3).
    """
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    if getattr(OrchestratorUtils.get_dag_output_artifacts, "_ftloop_oneof", False):
        return

    def get_dag_output_artifacts(cls, dag_outputs_spec, io_store):
        outputs = {}
        for key, spec in dag_outputs_spec.artifacts.items():
            found = []
            for selector in spec.artifact_selectors:
                try:
                    found.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
                except (KeyError, ValueError):
                    continue  # that branch did not run
            if len(found) != 1:
                raise ValueError(f"dsl.OneOf output {key!r}: expected exactly one branch to produce it, got {len(found)}")
            outputs[key] = found[0]
        return outputs

    get_dag_output_artifacts._ftloop_oneof = True  # type: ignore[attr-defined]
    OrchestratorUtils.get_dag_output_artifacts = classmethod(get_dag_output_artifacts)


def clear_previous_results(workdir: Path) -> None:
    """A failed run must not leave an older run's results looking current."""
    for name in RESULT_FILES:
        (workdir / name).unlink(missing_ok=True)
    shutil.rmtree(workdir / "predictions", ignore_errors=True)


def source_fingerprint(config: RunConfig) -> str | None:
    """Content hash of a local source file, so the data stages' cache follows the file, not its path."""
    path = Path(config.data.source_path)
    return content_hash([path]) if path.is_file() else None


def run_local(
    config: RunConfig, workdir: str | Path, progress: Callable[[str], None] = print, use_cache: bool = True
) -> dict:
    """Validate inputs, run every stage through kfp.local, and write WORKDIR/summary.json last.

    With ``use_cache`` the deterministic data stages (prepare with the offline generator,
    split, format) are reused from WORKDIR/kfp/.kfp_cache when their inputs are unchanged.
    """
    from kfp import local

    from ftloop.pipelines.pipeline import build_pipeline

    workdir = Path(workdir).resolve()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FtloopError(f"{workdir}: cannot create work directory: {exc.strerror or exc}") from None
    started = time.monotonic()
    clear_previous_results(workdir)
    # Fail fast, with file and line, before any stage starts. Only the offline generator runs here too:
    # a model or a paid API is called once, by the pipeline's own generate step.
    examples, labels = load_source(config, generate=config.generate.backend == "offline")
    config = ensure_tiny_model(config, workdir, [e.text for e in examples], labels, progress)
    check_base_model(config)

    support_oneof_artifacts_locally()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "kfp"),
        raise_on_error=False,
        enable_caching=use_cache,
    )
    cache_note = "data stages cached" if use_cache else "no cache"
    progress(f"pipeline: running {config.name} with kfp.local (artifacts under {workdir / 'kfp'}; {cache_note})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        warnings.filterwarnings("ignore", message=".*image.*", category=RuntimeWarning)
        task = build_pipeline(config, source_sha256=source_fingerprint(config))()
    bundle = task.outputs.get("Output")  # empty when a stage failed
    if bundle is None or not Path(bundle.path).exists():
        raise FtloopError("pipeline failed: a stage did not finish (its error is in the log above); no results were written")

    bundle_dir = Path(bundle.path)
    shutil.copytree(bundle_dir / "predictions", workdir / "predictions")
    for name in ("report.md", "report.html"):
        shutil.copyfile(bundle_dir / name, workdir / name)
    summary = json.loads((bundle_dir / "summary.json").read_text(encoding="utf-8"))
    summary["timings"] = {"total_seconds": round(time.monotonic() - started, 1)}
    summary["artifacts"] = str(bundle_dir)
    write_json(workdir / "summary.json", summary)  # written last: its presence means the run finished
    return summary
