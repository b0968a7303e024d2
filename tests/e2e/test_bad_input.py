"""The bad-input corpus (tests/data/bad): every case stops with a clear error, exit code 2, and no results.

Each case is a directory with case.yaml (what it breaks, the expected error as a
regex, and for model cases how a freshly built tiny model is damaged), a run
config and the input files. Cases run `ftloop run --local` in-process (an
uncaught exception fails the test, so a raw traceback cannot slip through); a
sample also runs as a real subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftloop.pipelines.cli import main

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
CASES = sorted(p.name for p in BAD.iterdir() if p.is_dir() and not p.name.startswith("_"))
_TINY: dict[str, Path] = {}


def test_the_corpus_covers_every_input_kind():
    kinds = {name.split("-", 1)[0] for name in CASES}
    assert len(CASES) >= 30 and kinds >= {"articles", "questions", "config", "model", "generator"}


def _tiny_model(tmp_path_factory) -> Path:
    if "model" not in _TINY:
        from ftloop.components.modeling.tiny import build_tiny_model
        from ftloop.components.records import read_jsonl

        rows = read_jsonl(BAD / "_shared" / "articles.jsonl")
        labels = sorted({r["label"] for r in rows})
        _TINY["model"] = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", [r["text"] for r in rows], labels, seed=0)
    return _TINY["model"]


def _stage(case: str, tmp_path: Path, tmp_path_factory) -> tuple[Path, dict]:
    """Copy the case (and the shared inputs it points to) out of the repo; damage a model if the case says so."""
    root = tmp_path / "bad"
    shutil.copytree(BAD / "_shared", root / "_shared")
    shutil.copytree(BAD / case, root / case)
    spec = yaml.safe_load((root / case / "case.yaml").read_text())
    damage = spec.get("model")
    if damage:
        model = root / case / "model"
        shutil.copytree(_tiny_model(tmp_path_factory), model)
        for name in damage.get("delete", []):
            (model / name).unlink()
        for name, text in damage.get("write", {}).items():
            (model / name).write_text(text)
        for name, key in damage.get("drop_key", {}).items():
            data = json.loads((model / name).read_text())
            data.pop(key, None)
            (model / name).write_text(json.dumps(data))
    return root / case, spec


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("generator-")])
def test_bad_input_is_a_clear_error(case, tmp_path, tmp_path_factory, capsys):
    case_dir, spec = _stage(case, tmp_path, tmp_path_factory)
    workdir = tmp_path / "out"
    code = main(["run", "--local", "--config", str(case_dir / "config.yaml"), "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("ftloop: error: "), err
    assert re.search(spec["expect"], err), f"{spec['description']}: {err!r} does not match {spec['expect']!r}"
    assert "Traceback" not in err
    # nothing that looks like a finished (or even started) run
    assert not (workdir / "summary.json").exists() and not (workdir / "kfp").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("generator-")])
def test_bad_generator_response_fails_the_stage_with_a_clear_error(case, tmp_path, tmp_path_factory, capfd):
    """The generator runs inside the pipeline's generate task: that task prints one error line, the run fails."""
    from tests.fixtures.fake_servers import FakeOpenAI

    case_dir, spec = _stage(case, tmp_path, tmp_path_factory)
    workdir = tmp_path / "out"
    with FakeOpenAI() as server:
        server.faults = [("raw", reply.encode()) for reply in spec["generator"]["replies"]] * 50
        config = case_dir / "config.yaml"
        config.write_text(config.read_text().replace("GENERATOR_URL", server.url))
        code = main(["run", "--local", "--config", str(config), "--workdir", str(workdir)])
        assert server.requests, "the generator was never called"
    out, err = capfd.readouterr()
    assert code == 2
    assert err.rstrip().endswith(
        "ftloop: error: pipeline failed: a stage did not finish (its error is in the log above); no results were written"
    )
    task_errors = [
        line.strip() for line in (out + err).splitlines() if line.strip().startswith("ftloop: error:") and "pipeline failed" not in line
    ]
    assert task_errors and all(re.search(spec["expect"], line) for line in task_errors), (spec["description"], task_errors)
    assert "Traceback" not in out + err
    assert not (workdir / "summary.json").exists()


@pytest.mark.parametrize("case", ["articles-line-not-json", "config-unknown-nested-key", "model-pickle-weights"])
def test_bad_input_exit_code_from_the_real_command(case, tmp_path, tmp_path_factory):
    case_dir, spec = _stage(case, tmp_path, tmp_path_factory)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftloop.pipelines.cli",
            "run",
            "--local",
            "--config",
            str(case_dir / "config.yaml"),
            "--workdir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert re.search(spec["expect"], result.stderr)


def test_a_utf8_byte_order_mark_is_not_an_error(tmp_path):
    """Excel's "CSV UTF-8" and Notepad write a byte-order mark first: articles, questions and the config still load."""
    import codecs
    import csv
    import io

    from ftloop.components.config import load_config
    from ftloop.components.records import read_jsonl
    from ftloop.components.stages.prepare_examples import load_source

    bom = codecs.BOM_UTF8
    shared = BAD / "_shared"
    questions = [{k: v for k, v in r.items() if k != "__line__"} for r in read_jsonl(shared / "questions.jsonl")]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=["text", "label"], lineterminator="\r\n")  # as Excel writes it
    writer.writeheader()
    writer.writerows(questions)
    (tmp_path / "questions.csv").write_bytes(bom + table.getvalue().encode("utf-8"))
    (tmp_path / "questions.jsonl").write_bytes(bom + (shared / "questions.jsonl").read_bytes())
    (tmp_path / "articles.jsonl").write_bytes(bom + (shared / "articles.jsonl").read_bytes())
    n_articles = len(read_jsonl(shared / "articles.jsonl"))
    plain = tmp_path / "plain.yaml"  # the same questions without a BOM: duplicates among them are dropped either way
    plain.write_text(f"name: bom\nseed: 1\ndata:\n  questions: {shared / 'questions.jsonl'}\n", encoding="utf-8")
    n_questions = len(load_source(load_config(plain), generate=False)[0])
    for key, name, rows in (
        ("articles", "articles.jsonl", n_articles),
        ("questions", "questions.csv", n_questions),
        ("questions", "questions.jsonl", n_questions),
    ):
        config = tmp_path / f"{name}.yaml"
        config.write_bytes(bom + f"name: bom\nseed: 1\ndata:\n  {key}: {name}\n".encode())
        examples, labels = load_source(load_config(config), generate=False)
        assert len(examples) == rows, name
        assert not any("\ufeff" in e.text or "\ufeff" in e.id for e in examples), name
        assert labels == sorted({q["label"] for q in questions}), name
