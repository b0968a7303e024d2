"""Planted API keys must appear nowhere: not in logs, artifacts, summary.json, the compiled YAML or error messages.

The whole local pipeline runs with Okareo as generator and evaluation sink and the
openai backend (the key named by ``generators.openai.api_key_env``) as rephraser,
each against a local fake of its API, so both keys are really sent and accepted;
then every byte the run left behind is searched for either key.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import run_local_cli
from tests.fixtures.data import REPO, corpus_subset, write_config, write_lines
from tests.fixtures.fake_servers import FakeOkareo, FakeOpenAI

PLANTED = "okareo-PLANTED-7f3a9c1e5b"
OPENAI_PLANTED = "openai-PLANTED-2d8e4b6a9c"
OPENAI_KEY_ENV = "FTLOOP_TEST_LLM_KEY"


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            hits.append(str(path))
    return hits


def _openai_settings(url: str) -> dict:
    return {
        "base_url": f"{url}/v1",
        "model": "served-model",
        "api_key_env": OPENAI_KEY_ENV,
        "backoff_seconds": 0.0,
        "max_retries": 1,
        "secret_name": "llm-api-key",
    }


def _okareo_config(tmp: Path, url: str, openai_url: str) -> Path:
    articles = write_lines(tmp / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    return write_config(
        tmp / "run.yaml",
        articles,
        generate={"backend": "okareo", "questions_per_article": 4},
        split={"train": 0.5, "dev": 0.25, "test": 0.25},
        model={"name_or_path": "builtin:tiny-phi3", "dtype": "float32"},
        train={"epochs": 1, "learning_rate": 0.002, "batch_size": 8, "max_length": 128, "early_stopping_metric": "none"},
        augment={"backend": "openai", "rephrasings_per_error": 2, "rounds": 1},
        generators={
            "okareo": {"base_url": url, "backoff_seconds": 0.0, "max_retries": 1, "upload_eval": True},
            "openai": _openai_settings(openai_url),
        },
    )


@pytest.mark.slow
def test_planted_key_is_used_but_never_written_anywhere(tmp_path):
    env = {**os.environ, "OKAREO_API_KEY": PLANTED, OPENAI_KEY_ENV: OPENAI_PLANTED, "HF_HUB_OFFLINE": "1"}
    workdir = tmp_path / "out"
    with FakeOkareo() as fake, FakeOpenAI() as llm:
        config = _okareo_config(tmp_path, fake.url, llm.url)
        run = run_local_cli(config, workdir, env=env)
        # the key was really in use: every Okareo call carried it, and predictions were uploaded
        assert fake.requests and {r["api_key"] for r in fake.requests} == {PLANTED}
        assert fake.test_runs
        # the openai key too: the rephrasing round sent it on every request (1 epoch leaves train/dev errors to mine)
        assert llm.requests and {r["auth"] for r in llm.requests} == {f"Bearer {OPENAI_PLANTED}"}

        # a failing call: the error message must not echo the key either
        fake.faults = [("status", 500)] * 50
        failed = subprocess.run(
            [
                sys.executable,
                "-m",
                "ftloop.pipelines.cli",
                "run",
                "--local",
                "--config",
                str(config),
                "--workdir",
                str(tmp_path / "failed"),
                "--no-cache",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
    assert failed.returncode == 2
    errors = [line for line in (failed.stdout + failed.stderr).splitlines() if "ftloop: error:" in line]
    assert any("500" in line for line in errors), errors  # it failed on the Okareo calls, as planned

    assert (workdir / "summary.json").is_file()
    for key in (PLANTED, OPENAI_PLANTED):
        for output in (run.stdout, run.stderr, failed.stdout, failed.stderr):
            assert key not in output
        assert _files_containing(workdir, key.encode()) == []  # artifacts, executor outputs, cache, reports
        assert _files_containing(tmp_path / "failed", key.encode()) == []

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
        [
            sys.executable,
            "-m",
            "ftloop.pipelines.cli",
            "compile",
            "--config",
            str(cluster),
            "--output",
            str(compiled),
            "--image",
            "cpu=registry.example/ftloop-cpu:abc123",
            "--image",
            "gpu=registry.example/ftloop-gpu:abc123",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    text = compiled.read_text()
    assert PLANTED not in text + result.stdout + result.stderr
    assert OPENAI_PLANTED not in text + result.stdout + result.stderr
    assert "OKAREO_API_KEY" in text and "okareo-api-key" in text  # secret-as-env by name
    assert OPENAI_KEY_ENV in text and "llm-api-key" in text


def test_the_openai_key_never_reaches_a_prepare_stage_output_or_its_errors(tmp_path, monkeypatch, capfd):
    """Fast check of the openai backend alone: the generate stage sends the key, writes it nowhere,
    and a server that echoes it back in a refusal does not get it into the error message."""
    import json

    from ftloop.components.config import load_config
    from ftloop.components.errors import FtloopError
    from ftloop.components.stages.prepare_examples import run as run_prepare

    monkeypatch.setenv(OPENAI_KEY_ENV, OPENAI_PLANTED)
    articles = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 3))
    with FakeOpenAI() as llm:
        config = load_config(
            write_config(
                tmp_path / "run.yaml",
                articles,
                generate={"backend": "openai", "questions_per_article": 2},
                generators={"openai": _openai_settings(llm.url)},
            )
        )
        meta = run_prepare(config, str(articles), tmp_path / "examples")
        assert meta["rows"] > 0 and {r["auth"] for r in llm.requests} == {f"Bearer {OPENAI_PLANTED}"}

        echo = json.dumps({"error": {"message": f"Incorrect API key provided: Bearer {OPENAI_PLANTED}"}}).encode()
        llm.faults = [("reply", (401, echo))] * 50
        with pytest.raises(FtloopError) as err:
            run_prepare(config, str(articles), tmp_path / "refused")
    message = str(err.value)
    assert "HTTP 401" in message and f"<{OPENAI_KEY_ENV}>" in message  # the server's answer, key masked
    out, errout = capfd.readouterr()
    for text in (message, out, errout):
        assert OPENAI_PLANTED not in text
    assert _files_containing(tmp_path, OPENAI_PLANTED.encode()) == []  # examples, checkpoints, config


# Shapes of real credentials: OpenAI (legacy sk-..., project/service-account/admin keys sk-proj-..., sk-svcacct-...,
# sk-admin-...), Hugging Face (hf_...), GitHub (classic ghp_/gho_/ghu_/ghs_/ghr_..., fine-grained github_pat_...),
# Google API keys, PEM private keys.
KEY_LIKE = re.compile(
    rb"(sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,}"
    rb"|sk-[A-Za-z0-9]{32,}"
    rb"|hf_[A-Za-z0-9]{30,}"
    rb"|gh[pousr]_[A-Za-z0-9]{36,}"
    rb"|github_pat_[A-Za-z0-9_]{22,}"
    rb"|AIza[0-9A-Za-z_-]{35}"
    # a PEM header followed by key material (a line break, raw or escaped as in JSON/YAML, then base64); a
    # documentation placeholder such as "-----BEGIN PRIVATE KEY-----\\n<private-key>" (a vendored CRD schema) is not one
    rb"|-----BEGIN [A-Z ]*PRIVATE KEY-----(?:\r?\n|\\n)[A-Za-z0-9+/=]{40,})"
)


def _fake(prefix: str, body: str) -> bytes:
    """A key-shaped example built at run time, so this file itself never matches KEY_LIKE."""
    return (prefix + body).encode()


@pytest.mark.parametrize(
    "key",
    [
        _fake("sk-", "A1b2" * 12),  # legacy OpenAI, 48 chars
        _fake("sk-proj-", "Ab3_" * 10 + "-x9" * 20),  # OpenAI project key: _ and - inside
        _fake("sk-svcacct-", "Zz9-" * 12),
        _fake("sk-admin-", "Q7w" * 10),
        _fake("hf_", "aBcDeFgHiJkLmNoPqRsTuVwXyZ01234567"),  # Hugging Face, 34 chars
        _fake("ghp_", "x" * 36),  # GitHub classic PAT
        _fake("gho_", "Y1" * 18),  # GitHub OAuth token
        _fake("github_pat_", "11ABCDEFG0" + "a" * 12 + "_" + "b" * 59),  # GitHub fine-grained PAT
        _fake("AIza", "S" * 35),
        _fake("-----BEGIN ", "RSA PRIVATE KEY-----\n" + "MIIEow" * 11),
        _fake("-----BEGIN ", "PRIVATE KEY-----\\n" + "MIIEvQ" * 11),  # escaped inside a JSON string
    ],
)
def test_key_patterns_catch_real_key_shapes(key):
    assert KEY_LIKE.search(b"token = '" + key + b"'\n")


@pytest.mark.parametrize(
    "text",
    [
        b"sk-test-123",
        b"OPENAI_API_KEY",
        b"openai-PLANTED-2d8e4b6a9c",
        b"okareo-PLANTED-7f3a9c1e5b",
        b"hf_hub_download(repo_id)",
        b"HF_HUB_OFFLINE",
        b"ghp_short",
        b"github_pat_",
        b"sk-proj-abc",
        b'"-----BEGIN PRIVATE KEY-----\\n<private-key>\\n-----END PRIVATE KEY-----"',  # a schema's placeholder
    ],
)
def test_key_patterns_leave_ordinary_text_alone(text):
    assert not KEY_LIKE.search(text)


def test_key_patterns_match_inside_longer_text():
    """A key pasted into a URL, JSON or a shell line is still found."""
    line = b'curl -H "Authorization: Bearer ' + _fake("sk-proj-", "k" * 40) + b'" https://api.example.com'
    assert KEY_LIKE.search(line).group(0) == _fake("sk-proj-", "k" * 40)
    assert KEY_LIKE.search(b'{"token": "' + _fake("hf_", "t" * 34) + b'"}').group(0) == _fake("hf_", "t" * 34)


def test_the_repository_holds_no_key_like_strings():
    """No committed file carries something shaped like a real key (tests use obviously fake ones)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    hits = [name for name in tracked if (REPO / name).is_file() and KEY_LIKE.search((REPO / name).read_bytes())]
    assert hits == []
