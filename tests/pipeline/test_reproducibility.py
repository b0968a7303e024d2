"""Same config, same seed: identical split and format artifacts and identical CPU metrics; every stage keyed for the cache."""

import hashlib
import json
import tempfile
from pathlib import Path

import pytest
import yaml
from kfp import compiler

from ftloop.components.config import load_config
from ftloop.pipelines.pipeline import build_pipeline
from ftloop.pipelines.placement import code_fingerprint
from tests.fixtures.cli import run_local_cli
from tests.fixtures.data import corpus_subset, write_config, write_lines

CACHED = {"prepare-examples", "split-examples", "format-chat"}  # the data stages, whose artifacts must be identical
NEVER_CACHED_LOCALLY = {"compare-models"}  # fresh reports (and timings) every run


def _config(tmp: Path) -> Path:
    articles = write_lines(tmp / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    return write_config(
        tmp / "run.yaml",
        articles,
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
    return {
        name: (bool(task.get("cachingOptions", {}).get("enableCache")), task.get("cachingOptions", {}).get("cacheKey"))
        for name, task in tasks.items()
        if name != "importer" and not name.startswith("condition-")
    }


def test_every_stage_but_the_comparison_is_cached_locally_under_its_own_chained_key(tmp_path):
    import ftloop

    config = load_config(_config(tmp_path))
    keys = _cache_keys(config)
    for name, (enabled, key) in keys.items():
        if name in NEVER_CACHED_LOCALLY:
            assert not enabled and key is None, name
            continue
        assert enabled, name
        # kfp.local hashes only the component name and this key, so the key names everything the stage
        # depends on: its inputs and upstream tasks (task-sha256), the source file's content and the ftloop code.
        assert f"source-sha256:{'f' * 64}" in key and key.startswith(f"{code_fingerprint()}:"), name
        assert f"ftloop-{ftloop.__version__}-" in key
    assert len({key for _, key in keys.values() if key}) == len(keys) - len(NEVER_CACHED_LOCALLY)  # one key per task
    assert _cache_keys(config) == keys  # deterministic: the same config and file give the same keys


def test_cache_training_false_reruns_training_and_scoring_and_everything_after_them(tmp_path):
    config = load_config(_config(tmp_path))
    config = config.model_copy(update={"cluster": config.cluster.model_copy(update={"cache_training": False})})
    keys = _cache_keys(config)
    for name in ("finetune", "evaluate", "evaluate-zero-shot", "finetune-2", "evaluate-2"):
        assert keys[name] == (False, None), name
    assert keys["split-examples"][0] and keys["tfidf-baseline"][0]
    # what reads a rerun task is keyed to this run only, so it is never served from an earlier one
    assert _cache_keys(config)["augment-from-errors"][1] != keys["augment-from-errors"][1]


# change -> the tasks whose key must stay (everything upstream of what the change touches)
@pytest.mark.parametrize(
    "change, unchanged",
    [
        ({"seed": 99}, set()),
        ({"split": {"train": 0.6, "dev": 0.2, "test": 0.2}}, set()),  # prepare checks the data can be split so
        ({"generate": {"questions_per_article": 3}}, set()),
        ({"data": {"labels": ["payments", "returns", "shipping"]}}, set()),
        ({"format": {"system_prompt": "Classify: {labels}"}}, {"prepare-examples", "split-examples"}),
        ({"filters": {"min_words": 3}}, set()),
        ({"train": {"epochs": 3}}, {"prepare-examples", "split-examples", "format-chat", "tfidf-baseline", "evaluate-zero-shot"}),
        ({"eval": {"mode": "generate"}}, {"prepare-examples", "split-examples", "format-chat", "tfidf-baseline", "finetune"}),
        (
            {"augment": {"label_margin": 0.3}},
            {"prepare-examples", "split-examples", "format-chat", "tfidf-baseline", "evaluate-zero-shot", "finetune", "evaluate"},
        ),
    ],
)
def test_a_changed_setting_misses_the_cache_of_exactly_the_stages_that_depend_on_it(tmp_path, change, unchanged):
    """Rerunning into the same work dir with another setting recomputes what reads it and everything downstream."""
    from kfp.local.cache import LocalCache

    path = _config(tmp_path)
    before = load_config(path)
    raw = yaml.safe_load(path.read_text())
    for section, value in change.items():
        raw[section] = {**raw.get(section, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(raw))
    after = load_config(path)
    assert after != before
    keys_before, keys_after = _cache_keys(before), _cache_keys(after)
    for name in set(keys_before) - NEVER_CACHED_LOCALLY:
        assert (keys_before[name] == keys_after[name]) == (name in unchanged), name
    for name in CACHED - unchanged:
        # what kfp.local itself stores the result under (the arguments do not count, only this key)
        cache = LocalCache(str(tmp_path / ".kfp_cache"))
        stored = [
            cache.compute_key(name, "img", [], {"config_slice": "same"}, custom_cache_key=keys[name][1])
            for keys in (keys_before, keys_after)
        ]
        assert stored[0] != stored[1], name


def test_another_source_file_or_ftloop_version_misses_the_local_cache(tmp_path, monkeypatch):
    import ftloop

    config = load_config(_config(tmp_path))
    keys = _cache_keys(config, "a" * 64)
    other = _cache_keys(config, "b" * 64)
    assert all(keys[name] != other[name] for name in set(keys) - NEVER_CACHED_LOCALLY)
    code_fingerprint.cache_clear()
    monkeypatch.setattr(ftloop, "__version__", "999.0.0")
    try:
        newer = _cache_keys(config, "a" * 64)
    finally:
        code_fingerprint.cache_clear()
    assert all(keys[name] != newer[name] for name in set(keys) - NEVER_CACHED_LOCALLY)


def _run(config: Path, workdir: Path, *extra: str) -> str:
    result = run_local_cli(config, workdir, *extra)
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
    return {name: {split: {k: m[split][k] for k in keys} for split in ("train", "dev", "test")} for name, m in summary["models"].items()}


@pytest.mark.slow
def test_same_config_twice_gives_identical_artifacts_and_metrics_and_reuses_every_stage(tmp_path):
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
    assert executed == NEVER_CACHED_LOCALLY, executed  # everything else served from WORKDIR/kfp/.kfp_cache
    assert _metrics(second) == _metrics(first)
