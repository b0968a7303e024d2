"""The console of a local run: one line per task and training progress by default, kfp's whole stream with --verbose.

kfp.local prints every task's executor input (a JSON blob) and its streamed log; ftloop sends that
to WORKDIR/kfp-tasks.log (pipelines/console.py) and, when a task fails, shows the end of its log.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from ftloop.pipelines.cli import main
from ftloop.pipelines.console import TASKS_LOG
from tests.fixtures.cli import run_local_cli
from tests.fixtures.data import corpus_subset, write_lines

pytestmark = pytest.mark.slow
BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
EXECUTOR_NOISE = ('"inputs": {', '"outputs": {', "executor_input", "[KFP Executor", "Streamed logs", "finished with status")
TASK_LINE = re.compile(r"^\[ftloop\] \[(\d+)/(\d+)\] (?:Executing task '([^']+)'|'([^']+)' reused from the cache)$")


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    articles = write_lines(tmp / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    config = {
        "name": "console-test",
        "seed": 7,
        "data": {"articles": str(articles)},
        "generate": {"backend": "offline", "questions_per_article": 4},
        "model": {"name_or_path": "builtin:tiny-phi3", "dtype": "float32"},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 96, "logging_steps": 2},
        "augment": {"backend": "offline", "rounds": 1},
    }
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    workdir = tmp / "out"
    result = run_local_cli(path, workdir)
    return workdir, result.stdout, result.stderr


def test_default_output_is_one_line_per_task_without_kfp_noise(quiet_run):
    workdir, out, err = quiet_run
    for noise in EXECUTOR_NOISE:
        assert noise not in out + err, noise
    task_lines = [m for m in map(TASK_LINE.match, out.splitlines()) if m]
    names = [m.group(3) or m.group(4) for m in task_lines]
    assert len(names) == len(set(names)) >= 8  # one line per task
    assert [int(m.group(1)) for m in task_lines] == list(range(1, len(names) + 1))
    assert {"prepare-examples", "finetune", "evaluate", "compare-models"} <= set(names)
    assert len(out.splitlines()) < 80, out
    assert re.search(r"train epoch \S+ step \d+/\d+ loss \S+ \(\S+ elapsed, ETA \d+:\d\d\)", out)
    assert "delta = augmented - base" in out  # the results table
    log = (workdir / TASKS_LOG).read_text()
    assert "executor_input" in log and '"inputs": {' in log  # everything kfp printed is kept


def _generator_case(tmp_path: Path, server_url: str) -> Path:
    case = "generator-response-not-json"
    shutil.copytree(BAD / "_shared", tmp_path / "bad" / "_shared")
    shutil.copytree(BAD / case, tmp_path / "bad" / case)
    config = tmp_path / "bad" / case / "config.yaml"
    config.write_text(config.read_text().replace("GENERATOR_URL", server_url))
    return config


def _failing_run(tmp_path: Path, capfd, *flags: str) -> tuple[int, str, str, Path]:
    from tests.fixtures.fake_servers import FakeOpenAI

    workdir = tmp_path / "out"
    with FakeOpenAI() as server:
        server.faults = [("raw", b"<html><body>502 Bad Gateway</body></html>")] * 50
        config = _generator_case(tmp_path, server.url)
        code = main(["run", "--local", "--config", str(config), "--workdir", str(workdir), *flags])
    out, err = capfd.readouterr()
    return code, out, err, workdir


def test_a_failed_task_shows_the_end_of_its_log_and_where_the_log_is(tmp_path, capfd):
    code, out, err, workdir = _failing_run(tmp_path, capfd)
    assert code == 2
    for noise in EXECUTOR_NOISE:
        assert noise not in out + err, noise
    assert "[ftloop] task 'prepare-examples' failed after" in err
    assert f"[ftloop] the whole log: {workdir / TASKS_LOG} (or rerun with --verbose)" in err
    tail = err.split("the end of its log:", 1)[1]
    assert re.search(r"^    ftloop: error: openai backend: .*malformed chat completion", tail, re.M), err
    assert err.rstrip().endswith(
        "ftloop: error: pipeline failed: a stage did not finish (its error is in the log above); no results were written"
    )
    assert "ftloop: error: openai backend" in (workdir / TASKS_LOG).read_text()


def test_verbose_shows_kfps_whole_stream(tmp_path, capfd):
    code, out, err, workdir = _failing_run(tmp_path, capfd, "--verbose")
    assert code == 2
    assert "Got executor_input" in out and '"inputs": {' in out and "Executing task" in out
    assert "ftloop: error: openai backend" in out + err
    assert "the end of its log" not in out + err and not (workdir / TASKS_LOG).exists()
