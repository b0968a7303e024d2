"""The quiet console of a local run: one line per task, training progress with an ETA, the full log in a file.

kfp.local 2.17.3 prints every task's executor input (a JSON blob per task), its outputs and
its streamed log, with no setting to turn that down. While a :class:`TaskConsole` is active,
all of it goes to ``WORKDIR/kfp-tasks.log`` instead: ``sys.stdout`` is redirected there (kfp's
per-task log handler and every task's streamed output write to it), and a filter on the root
logger, which survives kfp swapping the root logger's handlers per task, turns kfp's records
into one progress line per task. Lines a task prints about training (``train ...``) and its
warnings are shown too; a failed task shows the end of its log and where the whole log is.
``ftloop run --local --verbose`` skips all this and shows kfp's stream as it is.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import TextIO

TASKS_LOG = "kfp-tasks.log"
TAIL_LINES = 15  # how much of a failed task's log is shown

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"^Executing task '([^']+)'")
_CACHE_HIT = re.compile(r"^Task (\S+) cache hit")
_FINISHED = re.compile(r"^Task '([^']+)' finished with status (\w+)")
_RETRY = re.compile(r"^Task (\S+) failed \(attempt (\d+)/(\d+)\)")
_TRAIN_STEP = re.compile(r"^train epoch (\S+) step (\d+)/(\d+) loss (\S+)")
_SHOWN = ("train ", "augment round ", "warning:", "kept the best checkpoint", "resuming from")  # task lines worth a console line


def count_tasks(pipeline) -> int | None:
    """How many tasks the pipeline graph holds (both sides of a ``dsl.If`` included), or None if it cannot tell."""
    try:
        spec = pipeline.pipeline_spec

        def count(dag) -> int:
            n = 0
            for task in dag.tasks.values():
                component = spec.components[task.component_ref.name]
                n += count(component.dag) if component.HasField("dag") else 1
            return n

        return count(spec.root.dag) or None
    except Exception:  # a display aid only
        return None


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class TaskConsole(logging.Filter):
    """Quiet console for one local pipeline run; use as a context manager around the pipeline call."""

    def __init__(self, workdir: Path, total: int | None = None, out: TextIO | None = None, err: TextIO | None = None):
        super().__init__()
        self.log_path = Path(workdir) / TASKS_LOG
        self.total = total
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.started = 0  # tasks started or reused so far
        self.task: str | None = None
        self.task_started = 0.0
        self.train_started: float | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._in_executor_json = False
        self._live = False  # a TTY status line is open (no newline yet)
        self._stack = contextlib.ExitStack()
        self._log: TextIO | None = None

    # ------------------------------------------------------------------ setup

    def __enter__(self) -> TaskConsole:
        self._log = self._stack.enter_context(open(self.log_path, "w", encoding="utf-8", buffering=1))
        self._stack.enter_context(contextlib.redirect_stdout(self._log))
        root = logging.getLogger()
        level = root.level
        root.addFilter(self)
        root.setLevel(logging.INFO)  # kfp's cache hits are logged at INFO outside its own logger context

        def restore() -> None:
            root.removeFilter(self)
            root.setLevel(level)

        self._stack.callback(restore)
        return self

    def __exit__(self, *exc) -> None:
        self._end_live()
        self._stack.close()

    # ------------------------------------------------------------------ output

    def _end_live(self) -> None:
        if self._live:
            self.out.write("\n")
            self.out.flush()
            self._live = False

    def _say(self, text: str, live: bool = False) -> None:
        """One ``[ftloop]`` line; on a terminal a ``live`` line is rewritten by the next live one."""
        line = f"[ftloop] {text}"
        if live and self.tty:
            self.out.write(("\r\x1b[K" if self._live else "") + line)
            self._live = True
        else:
            self._end_live()
            self.out.write(line + "\n")
        self.out.flush()

    def _position(self) -> str:
        return f"[{self.started}/{self.total}]" if self.total else f"[{self.started}]"

    # ------------------------------------------------------------------ kfp's log records

    def filter(self, record: logging.LogRecord) -> bool:
        """Every record goes to the log file; kfp's task records also become progress lines. Nothing reaches a handler."""
        try:
            message = _ANSI.sub("", record.getMessage())
        except Exception:
            return False
        if self._log is not None and not self._log.closed:
            self._log.write(f"{record.levelname}: {message}\n")
        if match := _EXECUTING.match(message):
            self._start(match.group(1), "Executing task '{name}'")
        elif match := _CACHE_HIT.match(message):
            self._start(match.group(1), "'{name}' reused from the cache")
        elif (match := _RETRY.match(message)) is not None:
            self._say(f"    '{match.group(1)}' failed (attempt {match.group(2)}/{match.group(3)}); retrying")
        elif (match := _FINISHED.match(message)) is not None and match.group(2) != "SUCCESS":
            self._failed(match.group(1))
        return False

    def _start(self, name: str, what: str) -> None:
        self.started += 1
        self.task, self.task_started, self.train_started = name, time.monotonic(), None
        self.tail.clear()
        self._in_executor_json = False
        self._say(f"{self._position()} {what.format(name=name)}")

    def _failed(self, name: str) -> None:
        self._end_live()
        took = time.monotonic() - self.task_started
        print(f"[ftloop] task '{name}' failed after {took:.0f} s; the end of its log:", file=self.err)
        for line in self.tail:
            print(f"    {line}", file=self.err)
        print(f"[ftloop] the whole log: {self.log_path} (or rerun with --verbose)", file=self.err, flush=True)

    # ------------------------------------------------------------------ the running task's output

    def task_line(self, line: str) -> None:
        """A line a task printed (it is already in the log file)."""
        text = _ANSI.sub("", line).rstrip()
        if self._in_executor_json:
            self._in_executor_json = text != "}"
            return
        if "Got executor_input:" in text:
            self._in_executor_json = True
            return
        if not text.strip() or text.startswith("[KFP Executor"):
            return
        self.tail.append(text)
        if match := _TRAIN_STEP.match(text):
            self._say(self._training(*match.groups()), live=True)
        elif text.startswith(_SHOWN):
            if "LoRA r=" in text:
                self.train_started = time.monotonic()
            self._say(f"    {text}")

    def _training(self, epoch: str, step: str, steps: str, loss: str) -> str:
        done, total = int(step), int(steps)
        started = self.train_started if self.train_started is not None else self.task_started
        elapsed = time.monotonic() - started
        eta = f", ETA {_clock(elapsed / done * (total - done))}" if 0 < done <= total else ""
        return f"    train epoch {epoch} step {done}/{total} loss {loss} ({_clock(elapsed)} elapsed{eta})"
