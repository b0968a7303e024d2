"""Same config, same seed: identical split and format artifacts and identical CPU metrics; data stages cached."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import compiler

from conftest import corpus_subset, write_config, write_lines

from ftloop.components.config import load_config
from ftloop.pipelines.pipeline import build_pipeline

CACHED = {"prepare-examples", "split-examples", "format-chat"}


def _config(tmp: Path) -> Path:
    articles = write_lines(tmp / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    return write_config(
        tmp / "run.yaml", articles,
        generate={"questions_per_article": 5},
        split={"train": 0.5, "dev": 0.25, "test": 0.25},
        model={"name_or_path": "builtin:tiny-phi3", "dtype": "float32"},
        train={"epochs": 2, "learning_rate": 0.002, "batch_size": 8, "max_length": 96, "early_stopping_metric": "none"},
        augment={"rephrasings_per_error": 2, "rounds": 1},
    )


def test_only_the_deterministic_data_stages_are_cached_locally(tmp_path):
    config = load_config(_config(tmp_path))
    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_pipeline(config, source_sha256="f" * 64), str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    for name, task in tasks.items():
        if name == "importer":
            continue
        options = task.get("cachingOptions", {})
        base = name.rsplit("-", 1)[0] if name.rsplit("-", 1)[-1].isdigit() else name
        if name in CACHED:
            assert options.get("enableCache") is True, name
            assert options.get("cacheKey") == "source-sha256:" + "f" * 64, name  # an edited file misses the cache
        else:
            assert not options.get("enableCache"), f"{name} ({base}) must always run"


def _run(config: Path, workdir: Path, *extra: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ftloop.pipelines.cli", "run", "--local", "--config", str(config), "--workdir", str(workdir), *extra],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _artifacts(workdir: Path) -> dict[str, str]:
    """Content hashes of the first run's examples, splits and formatted data in this work dir."""
    run_root = sorted(p for p in (workdir / "kfp").iterdir() if p.is_dir() and not p.name.startswith("."))[0]
    outputs = {"prepare-examples": "examples", "split-examples": "splits", "format-chat": "formatted"}
    return {task: _tree_hash(run_root / task / name) for task, name in outputs.items()}


def _metrics(workdir: Path) -> dict:
    summary = json.loads((workdir / "summary.json").read_text())
    keys = ("accuracy", "macro_f1", "weighted_f1", "ece")
    return {name: {split: {k: m[split][k] for k in keys} for split in ("train", "dev", "test")}
            for name, m in summary["models"].items()}


@pytest.mark.slow
def test_same_config_twice_gives_identical_artifacts_and_metrics_and_reuses_the_data_stages(tmp_path):
    config = _config(tmp_path)
    first = tmp_path / "first"
    _run(config, first, "--no-cache")
    second = tmp_path / "second"
    _run(config, second)
    assert _artifacts(first) == _artifacts(second)
    assert _metrics(first) == _metrics(second)

    _run(config, second)  # same work dir: the data stages come from the cache
    runs = sorted(p for p in (second / "kfp").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 2
    executed = {p.name for p in runs[1].iterdir() if p.is_dir()}
    assert not executed & CACHED, executed  # served from WORKDIR/kfp/.kfp_cache
    assert {"finetune", "evaluate", "tfidf-baseline", "compare-models"} <= executed  # models always retrain
    assert _metrics(second) == _metrics(first)
