"""Same config, same seed: identical split and format artifacts and identical CPU metrics; data stages cached."""

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from kfp import compiler

from conftest import corpus_subset, write_config, write_lines

from ftloop.components.config import load_config
from ftloop.pipelines.pipeline import build_pipeline, local_data_cache_key

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


def _cache_keys(config, source_sha256: str = "f" * 64) -> dict[str, tuple[bool, str | None]]:
    """(enableCache, cacheKey) of every task of the local pipeline, as compiled."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "local.yaml"
        compiler.Compiler().compile(build_pipeline(config, source_sha256=source_sha256), str(out))
        spec = next(yaml.safe_load_all(out.read_text()))
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return {name: (bool(task.get("cachingOptions", {}).get("enableCache")), task.get("cachingOptions", {}).get("cacheKey"))
            for name, task in tasks.items() if name != "importer"}


def test_only_the_deterministic_data_stages_are_cached_locally(tmp_path):
    import ftloop

    config = load_config(_config(tmp_path))
    for name, (enabled, key) in _cache_keys(config).items():
        if name in CACHED:
            assert enabled, name
            # kfp.local hashes only the component name and this key, so the key names everything the
            # stage depends on: the source file's content, the run config and the ftloop version.
            assert key == local_data_cache_key(config, "f" * 64), name
            assert f"source-sha256:{'f' * 64}" in key and f"ftloop-{ftloop.__version__}-" in key
            assert hashlib.sha256(config.to_json().encode()).hexdigest() in key
        else:
            assert not enabled, f"{name} must always run"


@pytest.mark.parametrize("change", [
    {"seed": 99},
    {"split": {"train": 0.6, "dev": 0.2, "test": 0.2}},
    {"generate": {"questions_per_article": 3}},
    {"data": {"labels": ["payments", "returns", "shipping"]}},
    {"format": {"system_prompt": "Classify: {labels}"}},
    {"filters": {"min_words": 3}},
])
def test_a_changed_run_config_misses_the_local_data_cache(tmp_path, change):
    """Rerunning into the same work dir with another seed, split, ... must recompute prepare, split and format."""
    from kfp.local.cache import LocalCache

    path = _config(tmp_path)
    before = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for section, value in change.items():
        raw[section] = {**raw[section], **value} if isinstance(value, dict) and section in raw else value
    path.write_text(yaml.safe_dump(raw))
    after = load_config(path)
    assert after != before
    keys_before, keys_after = _cache_keys(before), _cache_keys(after)
    assert _cache_keys(load_config(path)) == keys_after  # the same config and file give the same key
    for name in CACHED:
        assert keys_before[name] != keys_after[name], name
        # what kfp.local itself stores the result under (the arguments do not count, only this key)
        cache = LocalCache(str(tmp_path / ".kfp_cache"))
        stored = [cache.compute_key(name, "img", [], {"run_config": "same"}, custom_cache_key=keys[name][1])
                  for keys in (keys_before, keys_after)]
        assert stored[0] != stored[1], name


def test_another_source_file_or_ftloop_version_misses_the_local_data_cache(tmp_path, monkeypatch):
    import ftloop

    config = load_config(_config(tmp_path))
    key = local_data_cache_key(config, "a" * 64)
    assert local_data_cache_key(config, "b" * 64) != key
    monkeypatch.setattr(ftloop, "__version__", "999.0.0")
    assert local_data_cache_key(config, "a" * 64) != key


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
