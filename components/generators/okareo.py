"""The ``okareo`` backend (official SDK) and the optional evaluation upload to Okareo.

Generation uses Okareo's own generators, as the published notebooks do:
the articles (or the rows to rephrase) are uploaded as a seed scenario, then
``TEXT_REVERSE_QUESTION`` (questions) or ``REPHRASE_INVARIANT`` (rephrasings)
generates from it. Each seed row's ``result`` is our row id, so every generated
row maps back to its article or parent row, and from there to its label and
group (the split stays leakage-free). Okareo's rephrase generator takes no
prompt, so the confusion hint is recorded in the row's ``meta`` but cannot
steer the generation; the label-consistency filter does that job.

Scenario names carry a hash of their content: the SDK returns an existing
scenario for a reused name, which is then the same data, never stale data.

The key comes from ``OKAREO_API_KEY`` only (never a config field or pipeline
parameter). 429 and 5xx answers, timeouts (``timeout_seconds`` per request:
the SDK sets none), network errors and success answers whose body is not the
API's reply (an HTML page from a proxy, a cut-off or wrong-shaped JSON) are
retried with exponential backoff; other errors fail at once with the server's
message. No message carries the key.
A generation that yields zero rows (the SDK warns and returns no scenario id)
gives zero rows, counted in ``stats``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ftloop.components.config import OkareoConfig
from ftloop.components.errors import ConfigError
from ftloop.components.generators.base import Checkpoint, GeneratorError
from ftloop.components.records import SPLITS, Article, Example, read_jsonl

API_KEY_ENV = "OKAREO_API_KEY"
MAX_BACKOFF_SECONDS = 60.0
T = TypeVar("T")


def api_key() -> str:
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise ConfigError(
            f"{API_KEY_ENV} is not set: the okareo backend and upload read the Okareo API key from this "
            "environment variable only (on the cluster, from the okareo Kubernetes secret)"
        )
    return key


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:12]


def _reply_being_parsed(exc: BaseException) -> Any:
    """The httpx reply the SDK was reading when it raised ``exc``; None when it raised anywhere else.

    The generated client reads every reply in a ``_parse_response`` function. A body it cannot read
    surfaces there as JSONDecodeError, KeyError, TypeError or ValueError, the same types the SDK uses
    for a 4xx answer or a bad argument; only where it was raised tells a garbled reply (worth retrying)
    from a refusal (not worth retrying).
    """
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "_parse_response" and str(frame.f_globals.get("__name__", "")).startswith("okareo_api_client."):
            return frame.f_locals.get("response")
        tb = tb.tb_next
    return None


def _malformed(reply: Any, status: int, body: bytes, why: str) -> str:
    """The retry problem for a success answer that is not the API's reply, naming the endpoint that gave it."""
    try:
        where = f" from {reply.request.method} {reply.request.url.path}"
    except (AttributeError, RuntimeError):  # no reply object, or one without its request
        where = ""
    return f"malformed reply{where}: HTTP {status} with {why}: {body[:80]!r}"


class OkareoSession:
    """An SDK client with retries; connects on first use."""

    def __init__(self, cfg: OkareoConfig, sleep: Callable[[float], None] = time.sleep):
        self.cfg = cfg
        self._key = api_key()
        self._client = None
        self._sleep = sleep
        self.stats: Counter = Counter()

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        import httpx
        from okareo_api_client.errors import UnexpectedStatus

        problem = ""
        for attempt in range(self.cfg.max_retries + 1):
            try:
                return fn(*args, **kwargs)
            except UnexpectedStatus as exc:
                if 200 <= exc.status_code < 300:  # a success status this endpoint never answers with: not Okareo's reply
                    reply = _reply_being_parsed(exc)
                    problem = _malformed(reply, exc.status_code, exc.content, "an unexpected success status")
                elif exc.status_code != 429 and exc.status_code < 500:
                    raise GeneratorError(f"okareo {what}: HTTP {exc.status_code}: {self._clean(exc.content[:200])}") from None
                else:
                    problem = f"HTTP {exc.status_code}"
            except httpx.TransportError as exc:  # timeouts, refused connections, broken reads
                problem = f"{type(exc).__name__}: {exc}"
            except (TypeError, ValueError, KeyError, AttributeError) as exc:
                reply = _reply_being_parsed(exc)
                if reply is None and isinstance(exc, (TypeError, ValueError)):
                    # the SDK's way of reporting 4xx ErrorResponse bodies, or a local check (e.g. an unknown project)
                    raise GeneratorError(f"okareo {what}: {self._clean(exc)}") from None
                if reply is not None and not reply.is_success:  # a refusal whose body the SDK cannot read
                    raise GeneratorError(f"okareo {what}: HTTP {reply.status_code}: {self._clean(reply.content[:200])}") from None
                if reply is not None:  # a success status with a body that is not JSON or not the documented shape
                    why = f"a body not in the expected shape ({type(exc).__name__}: {exc})"
                    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
                        why = "a body that is not JSON"
                    problem = _malformed(reply, reply.status_code, reply.content, why)
                else:
                    problem = f"malformed response ({type(exc).__name__}: {exc})"
            if attempt < self.cfg.max_retries:
                self.stats["retries"] += 1
                self._sleep(min(MAX_BACKOFF_SECONDS, self.cfg.backoff_seconds * 2**attempt))
        raise GeneratorError(f"okareo {what}: gave up after {self.cfg.max_retries + 1} tries: {self._clean(problem)}")

    def _clean(self, detail: Any) -> str:
        """A detail for an error message: one line, without the key (a proxy's debug page may echo headers)."""
        text = repr(detail) if isinstance(detail, bytes) else str(detail)
        return " ".join(text.replace(self._key, "<OKAREO_API_KEY>").split())

    @property
    def client(self):
        if self._client is None:
            import httpx
            import okareo.okareo as sdk

            kwargs: dict[str, Any] = {"project": self.cfg.project}
            if self.cfg.base_url:
                kwargs["base_path"] = self.cfg.base_url.rstrip("/")
            # The SDK does not pass a timeout to its HTTP client (okareo 0.0.162's Okareo()), and its constructor
            # already makes a request: give the client class it builds a timeout for the time of the call.
            timeout = httpx.Timeout(self.cfg.timeout_seconds)
            plain = sdk.Client
            sdk.Client = functools.partial(plain, timeout=timeout)
            try:
                self._client = self.call("connect (GET /v0/projects)", sdk.Okareo, self._key, **kwargs)
            finally:
                sdk.Client = plain
        return self._client

    def scenario(self, name: str, rows: list[tuple[Any, Any]]):
        from okareo_api_client.models import ScenarioSetCreate, SeedData

        seed = [SeedData(input_=inp, result=res) for inp, res in rows]
        return self.call(f"create scenario {name!r}", self.client.create_scenario_set, ScenarioSetCreate(name=name, seed_data=seed))

    def generate(self, source, name: str, n: int, kind: str) -> list:
        """Rows generated from scenario ``source``; [] when Okareo generated none."""
        from okareo_api_client.models import GenerationTone, ScenarioSetGenerate, ScenarioType
        from okareo_api_client.types import Unset

        request = ScenarioSetGenerate(
            name=name,
            number_examples=n,
            source_scenario_id=source.scenario_id,
            generation_type=ScenarioType[kind],
            generation_tone=GenerationTone[self.cfg.tone.upper()],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the SDK's zero-row warning; counted below instead
            generated = self.call(f"generate {kind} {name!r}", self.client.generate_scenario_set, request)
        if generated.scenario_id is None or isinstance(generated.scenario_id, Unset):
            self.stats["empty_generations"] += 1
            return []
        return self.call(f"fetch rows of {name!r}", self.client.get_scenario_data_points, str(generated.scenario_id))


class OkareoGenerator:
    name = "okareo"

    def __init__(self, cfg: OkareoConfig, seed: int, checkpoint: str | Path | None = None, sleep=time.sleep):
        self.cfg = cfg
        self.seed = seed
        self.session = OkareoSession(cfg, sleep)
        self.checkpoint = Checkpoint(checkpoint)

    @property
    def stats(self) -> Counter:
        return self.session.stats

    def _generate(self, kind: str, label: str, seeds: dict[str, str], n: int) -> list[tuple[str, str]]:
        """(parent id, text) pairs generated from ``seeds`` (id -> text); checkpointed per request."""
        digest = _digest([kind, seeds, n, self.cfg.tone])
        key = f"okareo:{kind}:{digest}"
        done = self.checkpoint.get(key)
        if done is not None:
            self.stats["reused_from_checkpoint"] += 1
            return [tuple(json.loads(item)) for item in done]  # type: ignore[misc]
        prefix = f"{self.cfg.name_prefix}-{label}-{digest}"
        source = self.session.scenario(f"{prefix}-seed", [(text, row_id) for row_id, text in seeds.items()])
        points = self.session.generate(source, f"{prefix}-generated", n, kind)
        pairs: list[tuple[str, str]] = []
        for point in points:
            result = point.result[0] if isinstance(point.result, list) and point.result else point.result
            text = point.input_
            if not isinstance(text, str) or not isinstance(result, str) or result not in seeds:
                self.stats["unusable_rows"] += 1  # no text, or no link back to a seed row
                continue
            pairs.append((result, text))
        self.checkpoint.put(key, [json.dumps(p, ensure_ascii=False) for p in pairs])
        return pairs

    def questions(self, articles: list[Article], n: int) -> list[Example]:
        by_id = {a.id: a for a in articles}
        pairs = self._generate("TEXT_REVERSE_QUESTION", "questions", {a.id: a.text for a in articles}, n)
        counter: Counter = Counter()
        rows = []
        for article_id, text in pairs:
            counter[article_id] += 1
            article = by_id[article_id]
            rows.append(
                Example(
                    id=f"{article_id}-q{counter[article_id]:02d}",
                    text=text,
                    label=article.label,
                    group=article.id,
                    origin="generated",
                    parent_id=article.id,
                    generator="okareo:TEXT_REVERSE_QUESTION",
                    round=0,
                )
            )
        return rows

    def rephrase(self, examples: list[Example], n: int, hint: dict[str, str] | None = None, round: int | None = None) -> list[Example]:
        if not examples:
            return []
        hint = hint or {}
        by_id = {e.id: e for e in examples}
        pairs = self._generate("REPHRASE_INVARIANT", "rephrase", {e.id: e.text for e in examples}, n)
        counter: Counter = Counter()
        rows = []
        for parent_id, text in pairs:
            counter[parent_id] += 1
            parent = by_id[parent_id]
            r = parent.round + 1 if round is None else round
            rows.append(
                Example(
                    id=f"{parent_id}-r{r}.{counter[parent_id]}",
                    text=text,
                    label=parent.label,
                    group=parent.group,
                    origin="rephrased",
                    parent_id=parent_id,
                    generator="okareo:REPHRASE_INVARIANT",
                    round=r,
                    meta={"confused_with": hint[parent_id]} if parent_id in hint else {},
                )
            )
        return rows


# --------------------------------------------------------- evaluation upload


def _replay_model(name: str, predictions: dict[str, str]):
    """A CustomModel that answers with the prediction this run already made for each question."""
    from okareo.model_under_test import CustomModel, ModelInvocation

    class RecordedPredictions(CustomModel):
        def invoke(self, input_value):
            return ModelInvocation(
                model_prediction=predictions.get(str(input_value), "<missing>"),
                model_input=input_value,
                model_output_metadata={"source": "ftloop predictions file"},
            )

    return RecordedPredictions(name=name)


def upload_evaluation(
    cfg: OkareoConfig, run_name: str, eval_dirs: dict[str, str | Path], splits: tuple[str, ...] = SPLITS
) -> dict[str, dict[str, str]]:
    """Each split becomes a scenario (question -> true label); each model's predictions are reported as a
    MULTI_CLASS_CLASSIFICATION test run through a CustomModel, so they show in Okareo's UI. Returns app links."""
    from okareo_api_client.models import TestRunType

    from ftloop.components.artifacts import predictions_path

    session = OkareoSession(cfg)
    first = next(iter(eval_dirs.values()))
    scenarios = {}
    for split in splits:
        rows = read_jsonl(predictions_path(first, split))
        pairs = [(r["text"], r["label"]) for r in rows]
        if pairs:
            scenarios[split] = session.scenario(f"{cfg.name_prefix}-{run_name}-{split}-{_digest(pairs)}", pairs)
    links: dict[str, dict[str, str]] = {}
    for model_name, eval_dir in eval_dirs.items():
        predictions = {split: {r["text"]: r["prediction"] for r in read_jsonl(predictions_path(eval_dir, split))} for split in scenarios}
        merged = {text: pred for split_preds in predictions.values() for text, pred in split_preds.items()}
        mut = session.call(
            f"register model {model_name!r}",
            session.client.register_model,
            name=f"{cfg.name_prefix}-{run_name}-{model_name}",
            model=_replay_model(f"{cfg.name_prefix}-{run_name}-{model_name}", merged),
            update=True,
        )
        links[model_name] = {}
        for split, scenario in scenarios.items():
            run = session.call(
                f"test run {model_name}/{split}",
                mut.run_test,
                scenario=scenario,
                name=f"{run_name} {model_name} {split}",
                test_run_type=TestRunType.MULTI_CLASS_CLASSIFICATION,
                calculate_metrics=True,
            )
            links[model_name][split] = str(getattr(run, "app_link", "") or "")
    return links
