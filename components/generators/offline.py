"""The offline generator: deterministic templates over article key phrases, for tests and the demo (it says so)."""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import TYPE_CHECKING

from ftloop.components.records import Article, Example

if TYPE_CHECKING:
    pass


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


def _tokens(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def key_phrases(article: Article, stats: CorpusStats, limit: int = 8) -> list[str]:
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
                a, b = rng.sample(phrases, 2) if len(phrases) > 1 else (phrases[0], phrases[0])
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

    def rephrase(self, examples: list[Example], n: int, hint: dict[str, str] | None = None, round: int | None = None) -> list[Example]:
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
