"""The ``openai`` backend: any OpenAI-compatible chat-completions endpoint, through the official SDK.

Meant for a vLLM (or similar) server inside the cluster, so generation needs no
third-party API; works with any server that speaks ``POST {base_url}/chat/completions``.
The official ``openai`` SDK does the HTTP (a per-request timeout, typed errors,
the chat-completion model, ``seed``); the retry policy stays here, because it is
configured by ``generators.openai.*`` and must also cover a 200 reply that is not
a chat completion: a thread pool bounded by ``concurrency``, and retries with
exponential backoff on timeouts, connection errors, 408/409/429/5xx and malformed
bodies, honouring ``retry-after-ms`` and ``Retry-After`` (seconds or an HTTP date),
capped at a minute. The SDK's own retries are off (``max_retries=0``) so the two
never multiply. The key is read from the environment variable named in the config
and is optional (a server in the cluster may need none: then no ``Authorization``
header is sent at all); it never appears in a log line, error message or artifact.
"""

from __future__ import annotations

import email.utils
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import openai

from ftloop.components.config import OpenAIConfig
from ftloop.components.generators.base import GeneratorError, PromptedGenerator
from ftloop.components.prompts import Message

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF_SECONDS = 60.0
# The SDK requires some key; without one this placeholder is configured and the header is omitted on every
# request (see _headers), so it is never sent.
_NO_KEY = "ftloop-no-key-configured"


class TransientError(Exception):
    """Worth retrying: timeout, connection problem, 408/409/429/5xx, or a reply that is not a chat completion."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(headers) -> float | None:
    """What the server asked us to wait: ``retry-after-ms``, else ``Retry-After`` as seconds or an HTTP date."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    try:
        if millis is not None:
            return max(0.0, float(millis) / 1000)
    except ValueError:
        pass
    value = (headers.get("retry-after") or "").strip()
    if not value:
        return None
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None  # e.g. "soon": fall back to our backoff
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class OpenAIGenerator(PromptedGenerator):
    name = "openai"

    def __init__(self, cfg: OpenAIConfig, seed: int, checkpoint: str | Path | None = None, sleep=time.sleep):
        super().__init__(cfg.model, seed, cfg.max_attempts, checkpoint)
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = os.environ.get(cfg.api_key_env) or None
        self._sleep = sleep
        self._client = openai.OpenAI(
            api_key=self._key or _NO_KEY,
            base_url=cfg.base_url.rstrip("/"),
            timeout=cfg.timeout_seconds,
            max_retries=0,  # retried below, by our policy (config, stats, malformed 200s)
        )
        # Only our key goes to the server: no header without one, and no OPENAI_ORG_ID / OPENAI_PROJECT_ID
        # picked up from the environment (which would go to whatever base_url is).
        self._headers = {"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit}
        if not self._key:
            self._headers["Authorization"] = openai.omit

    def complete(self, requests: list[list[Message]], attempt: int) -> list[str | Exception]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(lambda item: self._one(item[1], item[0], attempt), enumerate(requests)))

    def _one(self, messages: list[Message], index: int, attempt: int) -> str | Exception:
        body = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
            # Reproducible where the server supports it (vLLM does); a retry of a bad reply asks for a new sample.
            "seed": self.seed * 1_000_003 + index * 101 + attempt,
        }
        problem = "no attempt made"
        for retry in range(self.cfg.max_retries + 1):
            try:
                return self._post(body)
            except TransientError as exc:
                problem = str(exc)
                delay = exc.retry_after
            except GeneratorError as exc:
                return exc  # not retryable (e.g. 401, 404): fail with the server's answer
            self.stats["http_retries"] += retry < self.cfg.max_retries
            if retry < self.cfg.max_retries:
                backoff = self.cfg.backoff_seconds * 2**retry
                self._sleep(min(MAX_BACKOFF_SECONDS, delay if delay is not None else backoff))
        return GeneratorError(f"{self.url}: gave up after {self.cfg.max_retries + 1} tries: {problem}")

    def _post(self, body: dict) -> str:
        try:
            response = self._client.chat.completions.with_raw_response.create(**body, extra_headers=self._headers)
        except openai.APIStatusError as exc:
            detail = self._redact(exc.response.text)[:200]  # a server may echo the key back
            if exc.status_code in RETRYABLE_STATUS:
                raise TransientError(f"HTTP {exc.status_code}: {detail}", retry_after_seconds(exc.response.headers)) from None
            hint = f" (is {self.cfg.api_key_env} set?)" if exc.status_code in (401, 403) else ""
            raise GeneratorError(f"{self.url}: HTTP {exc.status_code}{hint}: {detail}") from None
        except openai.APIConnectionError as exc:  # includes APITimeoutError
            reason = self._redact(str(exc.__cause__ or exc))
            raise TransientError(f"connection failed: {reason}") from None
        raw = response.content
        try:
            content = response.parse().choices[0].message.content
            if not isinstance(content, str | None):
                raise TypeError(f"content is {type(content).__name__}")
        except (ValueError, UnicodeDecodeError, AttributeError, IndexError, TypeError):  # JSONDecodeError is a ValueError
            raise TransientError(f"malformed chat completion: {self._redact(repr(raw))[:123]}") from None
        return content or ""

    def _redact(self, text: str) -> str:
        """Error messages end up in task logs: never with the key in them."""
        return text.replace(self._key, f"<{self.cfg.api_key_env}>") if self._key else text
