"""A planted API key must appear nowhere: not in logs, artifacts, summary.json, the compiled YAML or error messages.

The whole local pipeline runs with Okareo as generator, rephraser and evaluation
sink (a local fake of its API, so the key is really sent and really accepted),
then every byte it left behind is searched for the key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, corpus_subset, write_config, write_lines
from fake_servers import FakeOkareo

PLANTED = "okareo-PLANTED-7f3a9c1e5b"


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            hits.append(str(path))
    return hits


def _okareo_config(tmp: Path, url: str) -> Path:
    articles = write_lines(tmp / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    return write_config(
        tmp / "run.yaml", articles,
        generate={"backend": "okareo", "questions_per_article": 4},
        split={"train": 0.5, "dev": 0.25, "test": 0.25},
        model={"name_or_path": "builtin:tiny-phi3", "dtype": "float32"},
        train={"epochs": 1, "learning_rate": 0.002, "batch_size": 8, "max_length": 128, "early_stopping_metric": "none"},
        augment={"backend": "okareo", "rephrasings_per_error": 2, "rounds": 1},
        generators={"okareo": {"base_url": url, "backoff_seconds": 0.0, "max_retries": 1, "upload_eval": True}},
    )


@pytest.mark.slow
def test_planted_key_is_used_but_never_written_anywhere(tmp_path):
    env = {**os.environ, "OKAREO_API_KEY": PLANTED, "HF_HUB_OFFLINE": "1"}
    workdir = tmp_path / "out"
    with FakeOkareo() as fake:
        config = _okareo_config(tmp_path, fake.url)
        run = subprocess.run(
            [sys.executable, "-m", "ftloop.pipelines.cli", "run", "--local", "--config", str(config), "--workdir", str(workdir)],
            capture_output=True, text=True, env=env, timeout=900,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        # the key was really in use: every Okareo call carried it, and predictions were uploaded
        assert fake.requests and {r["api_key"] for r in fake.requests} == {PLANTED}
        assert fake.test_runs

        # a failing call: the error message must not echo the key either
        fake.faults = [("status", 500)] * 50
        failed = subprocess.run(
            [sys.executable, "-m", "ftloop.pipelines.cli", "run", "--local", "--config", str(config),
             "--workdir", str(tmp_path / "failed"), "--no-cache"],
            capture_output=True, text=True, env=env, timeout=900,
        )
    assert failed.returncode == 2
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if "ftloop: error:" in line]
    assert any("500" in line for line in errors), errors  # it failed on the Okareo calls, as planned

    assert (workdir / "summary.json").is_file()
    for output in (run.stdout, run.stderr, failed.stdout, failed.stderr):
        assert PLANTED not in output
    assert _files_containing(workdir, PLANTED.encode()) == []  # artifacts, executor outputs, cache, reports
    assert _files_containing(tmp_path / "failed", PLANTED.encode()) == []

    # and the pipeline compiled for the cluster carries a Secret reference, never the value
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw["data"]["articles"] = "gs://ftloop-data/articles.jsonl"
    raw["model"] = {"name_or_path": "microsoft/Phi-3-mini-4k-instruct"}  # the pinned default revision
    raw["cluster"] = {"pipeline_root": "gs://ftloop-artifacts/root"}
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(raw))
    compiled = tmp_path / "pipeline.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "ftloop.pipelines.cli", "compile", "--config", str(cluster), "--output", str(compiled),
         "--image", "cpu=registry.example/ftloop-cpu:abc123", "--image", "gpu=registry.example/ftloop-gpu:abc123"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    text = compiled.read_text()
    assert PLANTED not in text + result.stdout + result.stderr
    assert "OKAREO_API_KEY" in text and "okareo-api-key" in text  # secret-as-env by name


def test_the_repository_holds_no_key_like_strings():
    """No committed file carries something shaped like a real key (tests use obviously fake ones)."""
    import re

    suspicious = re.compile(rb"(sk-[A-Za-z0-9]{32,}|AIza[0-9A-Za-z_-]{35}|-----BEGIN [A-Z ]*PRIVATE KEY-----)")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    hits = [name for name in tracked if (REPO / name).is_file() and suspicious.search((REPO / name).read_bytes())]
    assert hits == []
