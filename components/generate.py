"""Question generation from labeled articles (reverse-question generation) and rephrasing.

One interface (``Generator``), four backends, picked by ``generate.backend`` /
``augment.backend`` in the run config:

- ``offline`` (here): deterministic template filling over each article's
  distinctive key phrases. It exists so tests and the local demo run with no
  model and no network, and it says so in every row's ``generator``.
- ``okareo`` (gen_okareo.py): the official SDK's reverse-question and rephrase generators.
- ``hf`` (gen_hf.py): self-hosted sampling with transformers.
- ``openai`` (gen_openai.py): any OpenAI-compatible chat-completions endpoint.

The two prompted backends (hf, openai) share ``PromptedGenerator``: the
prompts, the parser for their structured output (a JSON array, or numbered
lines), retries of unparseable replies, and a checkpoint file of completed
requests that a retried attempt reuses.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ftloop.components.errors import FtloopError
from ftloop.components.records import Article, Example

if TYPE_CHECKING:
    from ftloop.components.config import RunConfig

OFFLINE_QUESTIONS = "offline-templates-v1"
OFFLINE_REPHRASE = "offline-rephrase-v1"

_STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each either every few for from
    further get gets got had has have having he her here hers him his how i if in into is it its itself
    just least less let lets like may me might more most much must my no nor not now of off on once only
    or other our ours out over own per please same she should so some such than that the their theirs
    them then there these they this those through to too under until up upon us very via was we were
    what when where which while who whom why will with within without would you your yours yourself
    one two three four five six seven eight nine ten first second new also simply just still well
    webbizz days day within across using use used make makes made need needs take takes""".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]")

QUESTION_TEMPLATES = (
    "how does {a} work?",
    "can you explain {a} to me?",
    "what is your policy on {a}?",
    "I have a question about {a} and {b}",
    "where can I find information on {a}?",
    "is there a fee for {a}?",
    "what should I know about {a} before ordering?",
    "how do I sort out {a} for my account?",
    "who do I talk to about {a}?",
    "any tips on {a} and {b}?",
    "does WebBizz offer {a}?",
    "what happens with {a} if something goes wrong?",
    "how long does {a} take?",
    "can I change my {a}?",
    "help with {a} please",
    "quick question on {a}, how does it work with {b}?",
)


class Generator(Protocol):
    """What every backend provides (DESIGN.md §3, Generators)."""

    name: str

    def questions(self, articles: list[Article], n: int) -> list[Example]: ...

    def rephrase(
        self, examples: list[Example], n: int, hint: dict[str, str] | None = None, round: int | None = None
    ) -> list[Example]:
        """``n`` rephrasings per example; ``hint`` maps example id -> the label it was confused with;
        ``round`` (default: the parent's round + 1) goes into each new row's id and ``round``."""
        ...


class GeneratorError(FtloopError):
    """A generator backend failed (unreachable, refused, or unparseable output) after its retries."""


def _tokens(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def key_phrases(article: Article, stats: "CorpusStats", limit: int = 8) -> list[str]:
    """Phrases a customer would ask about: frequent in the article, in its title, and specific to its label.

    Ranked by tf x title boost x label specificity (share of the articles
    containing the words that carry this label) x label coverage; ties break
    alphabetically so the result is deterministic.
    """
    title_words = set(_tokens(article.title or ""))
    words = _tokens(f"{article.title or ''} {article.text}")
    candidates: Counter = Counter()
    for i, word in enumerate(words):
        if word not in _STOPWORDS and len(word) > 2:
            candidates[word] += 1
            if i + 1 < len(words) and words[i + 1] not in _STOPWORDS and len(words[i + 1]) > 2:
                candidates[f"{word} {words[i + 1]}"] += 1
    scored = []
    for phrase, tf in candidates.items():
        parts = phrase.split()
        specificity = min(stats.label_df[article.label][w] / stats.df[w] for w in parts)
        coverage = min(stats.label_df[article.label][w] for w in parts)
        title_boost = 1 + 2 * any(w in title_words for w in parts)
        scored.append((tf * title_boost * specificity * coverage**2, phrase))
    scored.sort(key=lambda item: (-item[0], item[1]))
    chosen: list[str] = []
    for _, phrase in scored:
        if any(phrase in c for c in chosen):
            continue
        chosen.append(phrase)
        if len(chosen) == limit:
            break
    return chosen


class CorpusStats:
    """Document frequencies over the whole corpus and within each label."""

    def __init__(self, articles: list[Article]):
        self.df: Counter = Counter()
        self.label_df: dict[str, Counter] = {}
        for article in articles:
            vocab = set(_tokens(f"{article.title or ''} {article.text}"))
            self.df.update(vocab)
            self.label_df.setdefault(article.label, Counter()).update(vocab)


class OfflineGenerator:
    """Deterministic template backend: same articles and seed give the same rows."""

    name = "offline"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def questions(self, articles: list[Article], n: int) -> list[Example]:
        stats = CorpusStats(articles)
        rows: list[Example] = []
        for article in articles:
            rng = random.Random(f"{self.seed}:{article.id}")
            phrases = key_phrases(article, stats) or [article.label]
            seen: set[str] = set()
            attempts = 0
            while len(seen) < n and attempts < n * 20:
                attempts += 1
                template = rng.choice(QUESTION_TEMPLATES)
                a, b = (rng.sample(phrases, 2) if len(phrases) > 1 else (phrases[0], phrases[0]))
                text = template.format(a=a, b=b)
                text = text[0].upper() + text[1:]
                if text.lower() in seen:
                    continue
                seen.add(text.lower())
                rows.append(
                    Example(
                        id=f"{article.id}-q{len(seen):02d}",
                        text=text,
                        label=article.label,
                        group=article.id,
                        origin="generated",
                        parent_id=article.id,
                        generator=OFFLINE_QUESTIONS,
                        round=0,
                    )
                )
        return rows

    def rephrase(
        self, examples: list[Example], n: int, hint: dict[str, str] | None = None, round: int | None = None
    ) -> list[Example]:
        """Surface rewrites (fillers, synonyms, casing); ``hint`` maps example id -> confused label."""
        hint = hint or {}
        out: list[Example] = []
        for example in examples:
            r = example.round + 1 if round is None else round
            rng = random.Random(f"{self.seed}:rephrase:{example.id}:{r - 1}")
            seen = {example.text.lower()}
            for _ in range(n * 10):
                text = _rewrite(example.text, rng)
                if text.lower() in seen:
                    continue
                seen.add(text.lower())
                out.append(
                    Example(
                        id=f"{example.id}-r{r}.{len(seen) - 1}",
                        text=text,
                        label=example.label,
                        group=example.group,
                        origin="rephrased",
                        parent_id=example.id,
                        generator=OFFLINE_REPHRASE,
                        round=r,
                        meta={"confused_with": hint[example.id]} if example.id in hint else {},
                    )
                )
                if len(seen) - 1 == n:
                    break
        return out


_PREFIXES = ("hi, ", "hey ", "quick question: ", "sorry to bother you, ", "hello! ", "", "", "")
_SUFFIXES = (" thanks", " thank you!", " asap", "", "", " cheers")
_SYNONYMS = {
    "how do i": ("what's the way to", "how can i"),
    "can you explain": ("could you walk me through", "please explain"),
    "what is": ("what's", "tell me"),
    "where can i find": ("where do i get", "where is"),
    "information": ("info", "details"),
    "policy": ("rules", "policy"),
    "question": ("query", "question"),
    "tips": ("advice", "pointers"),
    "work": ("function", "work"),
    "my account": ("my profile", "my webbizz account"),
    "help with": ("need help with", "assistance with"),
    "ordering": ("buying", "placing an order"),
}


def _rewrite(text: str, rng: random.Random) -> str:
    out = text.rstrip("?!. ").lower()
    for source, options in _SYNONYMS.items():
        if source in out and rng.random() < 0.7:
            out = out.replace(source, rng.choice(options), 1)
    out = rng.choice(_PREFIXES) + out + rng.choice(("?", "?", "", "??")) + rng.choice(_SUFFIXES)
    return out.strip()


# ------------------------------------------------------- prompted backends

Message = dict[str, str]
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
                    f"{self.name} backend: {transport}; {len(results)} of {len(keys)} requests completed"
                    + self._saved_note()
                )
            pending = failed
        if pending:
            key = pending[0][0]
            raise GeneratorError(
                f"{self.name} backend: {len(pending)} of {len(keys)} requests gave no parseable list after "
                f"{self.max_attempts} attempt(s) (e.g. request {key[:8]}: {last_problem.get(key, 'no reply')})"
                + self._saved_note()
            )
        return results

    def _saved_note(self) -> str:
        if self.checkpoint.path and len(self.checkpoint):
            return f"; completed requests are saved in {self.checkpoint.path} and reused by the next attempt"
        return ""

    def questions(self, articles: list[Article], n: int) -> list[Example]:
        jobs = [(request_key(self.identity, m, n), m, n) for m in (question_messages(a, n) for a in articles)]
        results = self._run(jobs)
        rows: list[Example] = []
        for article, (key, _, _) in zip(articles, jobs):
            for i, text in enumerate(results[key], start=1):
                rows.append(
                    Example(
                        id=f"{article.id}-q{i:02d}", text=text, label=article.label, group=article.id,
                        origin="generated", parent_id=article.id, generator=f"{self.name}:{self.identity}", round=0,
                    )
                )
        return rows

    def rephrase(
        self, examples: list[Example], n: int, hint: dict[str, str] | None = None, round: int | None = None
    ) -> list[Example]:
        hint = hint or {}
        jobs = [
            (request_key(self.identity, m, n), m, n)
            for m in (rephrase_messages(e, n, hint.get(e.id)) for e in examples)
        ]
        results = self._run(jobs)
        rows: list[Example] = []
        for example, (key, _, _) in zip(examples, jobs):
            r = example.round + 1 if round is None else round
            for i, text in enumerate(results[key], start=1):
                rows.append(
                    Example(
                        id=f"{example.id}-r{r}.{i}", text=text, label=example.label, group=example.group,
                        origin="rephrased", parent_id=example.id, generator=f"{self.name}:{self.identity}", round=r,
                        meta={"confused_with": hint[example.id]} if example.id in hint else {},
                    )
                )
        return rows


# ------------------------------------------------------------------- factory


def make_generator(backend: str, config: "RunConfig", checkpoint_dir: str | Path | None = None) -> Generator:
    """The configured backend; prompted backends checkpoint completed requests under ``checkpoint_dir``."""
    checkpoint = Path(checkpoint_dir) / f"{backend}-requests.jsonl" if checkpoint_dir else None
    if backend == "offline":
        return OfflineGenerator(config.seed)
    if backend == "openai":
        from ftloop.components.gen_openai import OpenAIGenerator

        return OpenAIGenerator(config.generators.openai, config.seed, checkpoint)
    if backend == "hf":
        from ftloop.components.gen_hf import HFGenerator

        return HFGenerator(config.generators.hf, config.seed, checkpoint)
    if backend == "okareo":
        from ftloop.components.gen_okareo import OkareoGenerator

        return OkareoGenerator(config.generators.okareo, config.seed, checkpoint)
    raise ValueError(f"unknown generator backend {backend!r}")


def generate_questions(
    articles: list[Article], config: "RunConfig", checkpoint_dir: str | Path | None = None
) -> list[Example]:
    backend = config.generate.backend
    return make_generator(backend, config, checkpoint_dir).questions(articles, config.generate.questions_per_article)
