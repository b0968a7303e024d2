"""Per-stage caching through kfp.local: a rerun that changes only augmentation reuses everything upstream of it.

Each task's local cache key chains its own config slice, its run parameters, the keys of the tasks it
reads from, the ftloop code and the source file's content (``placement.local_cache_key``), so a changed
``augment.label_margin`` changes the augment tasks' keys and those downstream of them, and nothing else.
"""

import json
from pathlib import Path

import pytest
import yaml

from tests.fixtures.cli import run_local_cli
from tests.fixtures.data import corpus_subset, write_config, write_lines

# Upstream of the first augment task: served from the cache when only augmentation changes.
UPSTREAM_OF_AUGMENT = {"prepare-examples", "split-examples", "format-chat", "tfidf-baseline", "evaluate-zero-shot", "finetune", "evaluate"}


def _config(tmp: Path, **augment) -> Path:
    articles = write_lines(tmp / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    return write_config(
        tmp / "run.yaml",
        articles,
        generate={"questions_per_article": 5},
        split={"train": 0.5, "dev": 0.25, "test": 0.25},
        model={"name_or_path": "builtin:tiny-phi3", "dtype": "float32"},
        train={"epochs": 2, "learning_rate": 0.002, "batch_size": 8, "max_length": 96, "early_stopping_metric": "none"},
        augment={"rephrasings_per_error": 2, "rounds": 1, **augment},
    )


def _run(config: Path, workdir: Path, *extra: str) -> str:
    result = run_local_cli(config, workdir, *extra)
    return result.stdout + result.stderr


def _run_roots(workdir: Path) -> list[Path]:
    """kfp.local's run folders (one per run, oldest first), the cache folder aside."""
    return sorted((p for p in (workdir / "kfp").iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)


def _executed(run_root: Path) -> set[str]:
    """The tasks that ran in this run. A cache hit writes nothing here: kfp.local hands on the outputs recorded in
    .kfp_cache, which point into the earlier run's folder (its "cache hit" line is logged at INFO, not shown)."""
    return {p.name for p in run_root.iterdir() if p.is_dir()}


@pytest.mark.slow
def test_changing_only_augmentation_reuses_the_data_stages_the_base_fine_tune_and_its_evaluation(tmp_path):
    config = _config(tmp_path, label_margin=0.1)
    workdir = tmp_path / "out"
    _run(config, workdir)
    [first] = _run_roots(workdir)
    assert UPSTREAM_OF_AUGMENT | {"augment-from-errors", "compare-models"} <= _executed(first)

    raw = yaml.safe_load(config.read_text())
    raw["augment"]["label_margin"] = 0.3
    config.write_text(yaml.safe_dump(raw))
    output = _run(config, workdir)
    first, second = _run_roots(workdir)
    executed = _executed(second)
    assert not executed & UPSTREAM_OF_AUGMENT, executed  # served from WORKDIR/kfp/.kfp_cache
    assert {"augment-from-errors", "select-final-model", "compare-models"} <= executed  # the changed round reruns
    assert "unchanged stages reused from the cache" in output
    # the new setting took effect, and the base model and baselines are the first run's, to the digit
    summary = json.loads((workdir / "summary.json").read_text())
    before = json.loads((workdir / "previous" / "summary.json").read_text())  # the first run's, moved aside
    assert (before["config"]["augment"]["label_margin"], summary["config"]["augment"]["label_margin"]) == (0.1, 0.3)
    for model in ("base", "tfidf", "zero-shot"):
        assert summary["models"][model]["test"]["predictions"] and all(
            summary["models"][model][split]["macro_f1"] == before["models"][model][split]["macro_f1"] for split in ("dev", "test")
        )

    # --no-cache reruns everything
    _run(config, workdir, "--no-cache")
    assert UPSTREAM_OF_AUGMENT <= _executed(_run_roots(workdir)[-1])
