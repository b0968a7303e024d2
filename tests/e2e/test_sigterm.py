"""SIGTERM (pod deletion, Spot preemption, `kill`) and SIGINT stop `ftloop run --local` and every task it started.

kfp.local's SubprocessRunner runs each task as a child process; ftloop starts each in its
own process group and, when it is stopped, signals that group, waits for the task (the
fine-tune task saves a checkpoint first) and exits with one line and 128 + the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.fixtures.data import corpus_subset, write_lines

REPO = Path(__file__).resolve().parents[2]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _small_config(tmp_path: Path, epochs: int) -> Path:
    articles = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 6))
    config = {
        "name": "sigterm-test",
        "seed": 7,
        "data": {"articles": str(articles)},
        "generate": {"backend": "offline", "questions_per_article": 4},
        "model": {"name_or_path": "builtin:tiny-phi3", "dtype": "float32"},
        # a quiet task that runs every epoch: no early stop may finish it before the signal arrives
        "train": {"epochs": epochs, "batch_size": 4, "max_length": 128, "logging_steps": 10_000, "early_stopping_metric": "none"},
        "augment": {"backend": "offline", "rounds": 1},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                parent_of[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parent_of.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize(
    "signum, task, code, last_line",
    [
        (signal.SIGTERM, "evaluate", 143, "ftloop: stopped by SIGTERM; 1 running task(s) stopped; no results were written to {workdir}"),
        (signal.SIGINT, "finetune", 130, "ftloop: interrupted"),
    ],
    ids=["sigterm-during-evaluate", "sigint-during-finetune"],
)
def test_a_signal_stops_the_run_and_its_running_task(tmp_path, signum, task, code, last_line):
    workdir = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    ftloop = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ftloop.pipelines.cli",
            "run",
            "--local",
            "--config",
            str(_small_config(tmp_path, 30 if task == "finetune" else 1)),
            "--workdir",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=env,
        start_new_session=True,
        # As from a terminal: a shell starts background jobs (`nohup make test &`, some CI runners) with SIGINT
        # ignored, which the child inherits and rightly keeps, so the interrupt would never arrive.
        preexec_fn=_default_sigint,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(ftloop.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any("Executing task" in line and f"'{task}'" in line for line in lines):
            assert ftloop.poll() is None and time.monotonic() < deadline, "".join(lines[-40:])
            time.sleep(0.2)
        if task == "finetune":  # into training proper, so the task answers the signal at a step's end
            while not any("LoRA r=" in line for line in lines):
                assert ftloop.poll() is None and time.monotonic() < deadline, "".join(lines[-40:])
                time.sleep(0.2)
        time.sleep(2)  # the task process is up and working (and quiet: a task that prints dies of the closed pipe anyway)
        children = _descendants(ftloop.pid)
        assert children, "no task process was running"
        os.kill(ftloop.pid, signum)  # ftloop alone, as Kubernetes or `kill` does, not its process group
        assert ftloop.wait(timeout=60) == code, "".join(lines[-40:])
    finally:
        if ftloop.poll() is None:
            os.killpg(ftloop.pid, signal.SIGKILL)
            ftloop.wait()
    reader.join(timeout=10)
    output = "".join(lines)
    assert output.rstrip().splitlines()[-1] == last_line.format(workdir=workdir)
    assert "Traceback" not in output
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)], "a task process outlived ftloop"
    leftover = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes still using {workdir}: {leftover}"
    assert not (workdir / "summary.json").exists()  # nothing that looks like a finished run
    if task == "finetune":  # the stopped fine-tune removed what it had written: no model that looks finished
        assert not list(workdir.glob("kfp/**/ftloop_model.json"))
