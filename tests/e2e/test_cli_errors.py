"""Bad input through the real CLI: a clear message naming file/line/key, exit 2, no traceback, no results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.data import corpus_subset, write_config, write_lines


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftloop.pipelines.cli", *args], capture_output=True, text=True, cwd=cwd)


def good_articles() -> list:
    return corpus_subset(["returns", "shipping", "payments"], 4)


def malformed_line(rows):
    return rows[:3] + ['{"id": "broken", "text": "oops"'] + rows[3:]


def missing_label(rows):
    rows = list(rows)
    rows[4] = {k: v for k, v in rows[4].items() if k != "label"}
    return rows


def empty_text(rows):
    rows = list(rows)
    rows[6] = {**rows[6], "text": ""}
    return rows


def single_article_label(rows):
    return rows + [{"id": "lonely", "text": "Our newsletter arrives every Monday.", "label": "newsletter"}]


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (malformed_line, "articles.jsonl:4: malformed JSON"),
        (missing_label, "articles.jsonl:5: field 'label': missing required field"),
        (empty_text, "articles.jsonl:7: field 'text': is empty"),
        (single_article_label, "label 'newsletter' has 1 source group(s)"),
    ],
)
def test_bad_articles(tmp_path, mutate, expected):
    articles = write_lines(tmp_path / "articles.jsonl", mutate(good_articles()))
    config = write_config(tmp_path / "run.yaml", articles)
    result = run_cli("run", "--local", "--config", str(config), "--workdir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert str(articles) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out" / "summary.json").exists()


def test_unknown_config_key(tmp_path):
    articles = write_lines(tmp_path / "articles.jsonl", good_articles())
    config = write_config(tmp_path / "run.yaml", articles, lora={"rank": 8})
    result = run_cli("run", "--local", "--config", str(config), "--workdir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{config}:" in result.stderr and "lora.rank: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_run_removes_an_older_runs_results(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"models": {}}))
    articles = write_lines(tmp_path / "articles.jsonl", single_article_label(good_articles()))
    result = run_cli("run", "--local", "--config", str(write_config(tmp_path / "run.yaml", articles)), "--workdir", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert not (out / "summary.json").exists()


def test_a_user_error_inside_a_stage_fails_the_run_cleanly(tmp_path):
    """Caught only once the fine-tune stage tokenizes: still one clear line, exit 2, no traceback, no summary."""
    articles = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping"], 5))
    config = write_config(
        tmp_path / "run.yaml", articles, model={"name_or_path": "builtin:tiny-phi3"}, train={"max_length": 8, "epochs": 1}
    )
    result = run_cli("run", "--local", "--config", str(config), "--workdir", str(tmp_path / "out"), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "ftloop: error: every train row is longer than train.max_length=8 tokens" in output
    assert "pipeline failed" in result.stderr
    assert "Traceback" not in output
    assert not (tmp_path / "out" / "summary.json").exists()


def _main(args: list[str], capsys) -> tuple[int, str]:
    """The CLI in-process: an uncaught exception (a raw traceback for the user) fails the test."""
    from ftloop.pipelines.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(
    "name, expected",
    [
        ("p.json", "the pipeline is written as YAML; the file name must end in .yaml or .yml"),
        ("p.txt", "the pipeline is written as YAML; the file name must end in .yaml or .yml"),
        ("out", "is a directory; name the pipeline file, e.g. "),
    ],
)
def test_compile_output_that_is_not_a_yaml_file_is_a_clear_error(tmp_path, capsys, name, expected):
    from tests.fixtures.data import REPO

    output = tmp_path / name
    if name == "out":
        output.mkdir()
    code, err = _main(
        [
            "compile",
            "--config",
            str(REPO / "configs" / "webbizz-gke.yaml"),
            "--output",
            str(output),
            "--image",
            "cpu=registry.example/ftloop-cpu:abc",
            "--image",
            "gpu=registry.example/ftloop-gpu:abc",
        ],
        capsys,
    )
    assert code == 2
    assert err == f"ftloop: error: --output {output}: {expected}" + (f"{output / 'pipeline.yaml'}\n" if name == "out" else "\n")
    assert list(tmp_path.iterdir()) == ([output] if name == "out" else [])  # kfp's .json path left an empty file behind
    if name == "out":
        assert list(output.iterdir()) == []


@pytest.mark.parametrize("existing", ["file", "foreign-dir"])
def test_tiny_model_output_that_cannot_hold_a_model_is_a_clear_error(tmp_path, capsys, existing):
    articles = write_lines(tmp_path / "articles.jsonl", good_articles())
    config = write_config(tmp_path / "run.yaml", articles)
    output = tmp_path / "model"
    if existing == "file":
        output.write_text("notes\n")
        expected = f"ftloop: error: {output}: exists and is not a directory; choose a directory for the tiny model\n"
    else:
        output.mkdir()
        (output / "notes.txt").write_text("mine\n")
        expected = f"ftloop: error: {output}: directory is not empty and holds no tiny model; choose a new or empty directory\n"
    code, err = _main(["tiny-model", "--config", str(config), "--output", str(output)], capsys)
    assert (code, err) == (2, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["articles.jsonl", "model", "run.yaml"]  # nothing left behind
    if existing == "file":
        assert output.read_text() == "notes\n"  # untouched
    else:
        assert [p.name for p in output.iterdir()] == ["notes.txt"]


def test_tiny_model_command_writes_a_complete_model_and_replaces_an_earlier_one(tmp_path, capsys):
    from ftloop.components.modeling.loading import check_model_dir

    articles = write_lines(tmp_path / "articles.jsonl", good_articles())
    config = write_config(tmp_path / "run.yaml", articles)
    output = tmp_path / "model"
    for _ in range(2):  # the second run replaces the first model
        code, err = _main(["tiny-model", "--config", str(config), "--output", str(output)], capsys)
        assert code == 0, err
        check_model_dir(output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["articles.jsonl", "model", "run.yaml"]  # no temp dirs left


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--source-uri", "gs://user:hunter2@bucket/articles.jsonl"),
        ("--source-uri", "gs://bucket/articles.jsonl?token=hunter2"),
    ],
)
def test_credentials_in_a_compile_uri_are_refused_and_never_echoed(tmp_path, flag, value):
    from tests.fixtures.data import REPO

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftloop.pipelines.cli",
            "compile",
            "--config",
            str(REPO / "configs" / "webbizz-gke.yaml"),
            "--output",
            str(tmp_path / "p.yaml"),
            flag,
            value,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{flag}: the URI contains" in result.stderr and "hunter2" not in result.stderr + result.stdout
    assert not (tmp_path / "p.yaml").exists()


def test_the_demo_runs_the_real_model_and_the_tiny_one_on_request(monkeypatch, tmp_path):
    from ftloop.components.config import SMOLLM2_MODEL_REF, TINY_MODEL_REF, load_config
    from ftloop.pipelines import cli

    ran: list[Path] = []
    monkeypatch.setattr(cli, "_run", lambda config, workdir, use_cache=True, verbose=False: ran.append(config) or 0)
    assert cli.main(["demo", "--workdir", str(tmp_path)]) == 0
    assert cli.main(["demo", "--tiny", "--workdir", str(tmp_path)]) == 0
    assert [load_config(path).model.name_or_path for path in ran] == [SMOLLM2_MODEL_REF, TINY_MODEL_REF]
