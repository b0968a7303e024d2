"""The ``openai`` backend: any OpenAI-compatible chat-completions endpoint over plain HTTP.

Meant for a vLLM (or similar) server inside the cluster, so generation needs no
third-party API; works with any server that speaks ``POST {base_url}/chat/completions``.
Standard-library HTTP only (urllib), a thread pool bounded by ``concurrency``,
a per-request timeout, and retries with exponential backoff on timeouts,
connection errors, 429 and 5xx (``Retry-After`` honoured). The key is read
from the environment variable named in the config and is optional (a server
in the cluster may need none); it never appears in a log line or artifact.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ftloop.components.config import OpenAIConfig
from ftloop.components.generators.base import GeneratorError, PromptedGenerator
from ftloop.components.prompts import Message

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_BACKOFF_SECONDS = 60.0


class TransientError(Exception):
    """Worth retrying: timeout, connection problem, 429, 5xx, or a reply that is not a chat completion."""


class OpenAIGenerator(PromptedGenerator):
    name = "openai"

    def __init__(self, cfg: OpenAIConfig, seed: int, checkpoint: str | Path | None = None, sleep=time.sleep):
        super().__init__(cfg.model, seed, cfg.max_attempts, checkpoint)
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._key = os.environ.get(cfg.api_key_env) or None
        self._sleep = sleep

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
                delay = getattr(exc, "retry_after", None)
            except GeneratorError as exc:
                return exc  # not retryable (e.g. 401, 404): fail with the server's answer
            self.stats["http_retries"] += retry < self.cfg.max_retries
            if retry < self.cfg.max_retries:
                backoff = self.cfg.backoff_seconds * 2**retry
                self._sleep(min(MAX_BACKOFF_SECONDS, delay if delay is not None else backoff))
        return GeneratorError(f"{self.url}: gave up after {self.cfg.max_retries + 1} tries: {problem}")

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_seconds) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = self._redact(exc.read().decode("utf-8", "replace"))[:200]  # a server may echo the key back
            if exc.code in RETRYABLE_STATUS:
                err = TransientError(f"HTTP {exc.code}: {detail}")
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                err.retry_after = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
                raise err from None
            hint = f" (is {self.cfg.api_key_env} set?)" if exc.code in (401, 403) else ""
            raise GeneratorError(f"{self.url}: HTTP {exc.code}{hint}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransientError(f"connection failed: {reason}") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise TransientError(f"malformed chat completion: {self._redact(repr(raw))[:123]}") from None

    def _redact(self, text: str) -> str:
        """Error messages end up in task logs: never with the key in them."""
        return text.replace(self._key, f"<{self.cfg.api_key_env}>") if self._key else text
