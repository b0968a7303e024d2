"""The generator interface, and the prompted re-ask machinery every LLM backend shares (prompts, parsing, checkpoint file)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ftloop.components.errors import FtloopError
from ftloop.components.records import Article, Example

if TYPE_CHECKING:
    pass
from ftloop.components.prompts import Message


class Generator(Protocol):
    """What every backend provides (docs/architecture.md, Generators)."""

    name: str

    def questions(self, articles: list[Article], n: int) -> list[Example]: ...

    def rephrase(self, examples: list[Example], n: int, hint: dict[str, str] | None = None, round: int | None = None) -> list[Example]:
        """``n`` rephrasings per example; ``hint`` maps example id -> the label it was confused with;
        ``round`` (default: the parent's round + 1) goes into each new row's id and ``round``."""
        ...


class GeneratorError(FtloopError):
    """A generator backend failed (unreachable, refused, or unparseable output) after its retries."""


SYSTEM = (
    "You write realistic messages that customers type into an online shop's help-center chat. "
    "Answer with only a JSON array of strings, no commentary."
)


def question_messages(article: Article, n: int) -> list[Message]:
    title = f"Title: {article.title}\n" if article.title else ""
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": (
                f"Help-center article:\n{title}{article.text}\n\n"
                f"Write {n} different questions a customer might ask that this article answers. "
                "Vary the wording, length and tone; do not copy sentences from the article; "
                f"do not mention categories or labels. Reply with a JSON array of {n} strings."
            ),
        },
    ]


def rephrase_messages(example: Example, n: int, confused_with: str | None) -> list[Message]:
    contrast = (
        f' A classifier mistook it for "{confused_with}". Make each rephrasing clearly about "{example.label}",'
        f' not "{confused_with}", without naming either.'
        if confused_with
        else ""
    )
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": (
                f'A customer wrote: "{example.text}"\nIts intent is "{example.label}".{contrast}\n'
                f"Write {n} different ways a customer could ask the same thing, keeping the meaning and the intent. "
                f"Reply with a JSON array of {n} strings."
            ),
        },
    ]


class MalformedOutput(ValueError):
    """A reply that holds no list of strings."""


_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


_NUMBERED = re.compile(r"^\s*(?:\d{1,3}\s*[.)]|[-*\u2022])\s+(.+?)\s*$")


def parse_list(reply: str, n: int) -> list[str]:
    """The strings of a JSON array (possibly fenced or surrounded by prose), else numbered/bulleted lines.

    At most ``n`` items are kept. Raises ``MalformedOutput`` when neither form
    yields at least one non-empty string.
    """
    text = _FENCE.sub("", reply.strip())
    start, end = text.find("["), text.rfind("]")
    if start != -1 and end > start:
        try:
            value = json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list):
            items = [v.strip() for v in value if isinstance(v, str) and v.strip()]
            if items and len(items) == len(value):
                return items[:n]
            if value and not items:
                raise MalformedOutput("the JSON array holds no strings")
            if items:
                return items[:n]
    items = [m.group(1).strip() for line in text.splitlines() if (m := _NUMBERED.match(line)) and m.group(1).strip()]
    if items:
        return items[:n]
    raise MalformedOutput("expected a JSON array of strings or numbered lines")


class Checkpoint:
    """Completed requests, one JSON line each, appended as they finish; a later attempt reuses them."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._done: dict[str, list[str]] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._done[row["key"]] = list(row["items"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a crash: that request runs again

    def __len__(self) -> int:
        return len(self._done)

    def get(self, key: str) -> list[str] | None:
        return self._done.get(key)

    def put(self, key: str, items: list[str]) -> None:
        with self._lock:
            self._done[key] = items
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as out:
                    out.write(json.dumps({"key": key, "items": items}, ensure_ascii=False) + "\n")
                    out.flush()


def request_key(identity: str, messages: list[Message], n: int) -> str:
    blob = json.dumps([identity, messages, n], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class PromptedGenerator:
    """Shared logic of the hf and openai backends; subclasses implement ``complete``."""

    name = "prompted"

    def __init__(self, identity: str, seed: int, max_attempts: int, checkpoint: str | Path | None = None):
        self.identity = identity  # model (and endpoint) that produced the rows; part of every request key
        self.seed = seed
        self.max_attempts = max_attempts
        self.checkpoint = Checkpoint(checkpoint)
        self.stats: Counter = Counter()

    def complete(self, requests: list[list[Message]], attempt: int) -> list[str | Exception]:
        """One reply per request, or the exception that ended that request after transport retries."""
        raise NotImplementedError

    def question_messages(self, article: Article, n: int) -> list[Message]:
        """The chat asking for ``n`` questions about ``article``; a backend may word it for its models."""
        return question_messages(article, n)

    def rephrase_messages(self, example: Example, n: int, confused_with: str | None) -> list[Message]:
        """The chat asking for ``n`` rephrasings of ``example``; a backend may word it for its models."""
        return rephrase_messages(example, n, confused_with)

    def _run(self, jobs: list[tuple[str, list[Message], int]]) -> dict[str, list[str]]:
        keys = {key for key, _, _ in jobs}
        results = {key: items for key in keys if (items := self.checkpoint.get(key)) is not None}
        self.stats["reused_from_checkpoint"] += len(results)
        pending = [job for job in jobs if job[0] not in results]
        last_problem: dict[str, str] = {}
        for attempt in range(self.max_attempts):
            if not pending:
                break
            replies = self.complete([messages for _, messages, _ in pending], attempt)
            failed, transport = [], None
            for job, reply in zip(pending, replies):
                key, _, n = job
                if isinstance(reply, Exception):
                    transport = transport or reply
                    failed.append(job)
                    continue
                try:
                    items = parse_list(reply, n)
                except MalformedOutput as exc:
                    self.stats["malformed_replies"] += 1
                    last_problem[key] = f"{exc}; reply began {reply[:80]!r}"
                    failed.append(job)
                    continue
                results[key] = items
                self.checkpoint.put(key, items)
            if transport is not None:
                raise GeneratorError(
                    f"{self.name} backend: {transport}; {len(results)} of {len(keys)} requests completed" + self._saved_note()
                )
            pending = failed
        if pending:
            key = pending[0][0]
            raise GeneratorError(
                f"{self.name} backend: {len(pending)} of {len(keys)} requests gave no parseable list after "
                f"{self.max_attempts} attempt(s) (e.g. request {key[:8]}: {last_problem.get(key, 'no reply')})" + self._saved_note()
            )
        return results

    def _saved_note(self) -> str:
        if self.checkpoint.path and len(self.checkpoint):
            return f"; completed requests are saved in {self.checkpoint.path} and reused by the next attempt"
        return ""

    def questions(self, articles: list[Article], n: int) -> list[Example]:
        jobs = [(request_key(self.identity, m, n), m, n) for m in (self.question_messages(a, n) for a in articles)]
        results = self._run(jobs)
        rows: list[Example] = []
        for article, (key, _, _) in zip(articles, jobs):
            for i, text in enumerate(results[key], start=1):
                rows.append(
                    Example(
                        id=f"{article.id}-q{i:02d}",
                        text=text,
                        label=article.label,
                        group=article.id,
                        origin="generated",
                        parent_id=article.id,
                        generator=f"{self.name}:{self.identity}",
                        round=0,
                    )
                )
        return rows

    def rephrase(self, examples: list[Example], n: int, hint: dict[str, str] | None = None, round: int | None = None) -> list[Example]:
        hint = hint or {}
        jobs = [(request_key(self.identity, m, n), m, n) for m in (self.rephrase_messages(e, n, hint.get(e.id)) for e in examples)]
        results = self._run(jobs)
        rows: list[Example] = []
        for example, (key, _, _) in zip(examples, jobs):
            r = example.round + 1 if round is None else round
            for i, text in enumerate(results[key], start=1):
                rows.append(
                    Example(
                        id=f"{example.id}-r{r}.{i}",
                        text=text,
                        label=example.label,
                        group=example.group,
                        origin="rephrased",
                        parent_id=example.id,
                        generator=f"{self.name}:{self.identity}",
                        round=r,
                        meta={"confused_with": hint[example.id]} if example.id in hint else {},
                    )
                )
        return rows
