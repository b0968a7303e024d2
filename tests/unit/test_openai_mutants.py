"""Mutation-testing kills for ``components/generators/openai.py`` (the SDK rewrite): see bench/README.md.

Unit-level on ``retry_after_seconds`` (milliseconds, seconds, HTTP dates, junk), the rest through the local
fake server (``tests/fixtures/fake_servers.py``): fast, no network beyond 127.0.0.1.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from ftloop.components.generators.openai import MAX_BACKOFF_SECONDS, RETRYABLE_STATUS, retry_after_seconds


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # the millisecond header wins
        ({"retry-after-ms": "-40"}, 0.0),  # never negative
        ({"retry-after-ms": "0"}, 0.0),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),  # junk milliseconds: fall back to Retry-After
        ({"retry-after-ms": "soon"}, None),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": " 7 "}, 7.0),  # surrounding blanks
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "1.2.3"}, None),  # one decimal point at most
        ({"retry-after": "-1"}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "   "}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past: no wait
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 -0000"}, 0.0),  # the same, without a zone
        ({}, None),
    ],
)
def test_retry_after_seconds(headers, expected):
    assert retry_after_seconds(httpx.Headers(headers)) == expected


def test_retry_after_seconds_without_headers_is_none():
    assert retry_after_seconds(None) is None


@pytest.mark.parametrize("usegmt", [True, False])
def test_retry_after_an_http_date_in_the_future_is_the_time_until_then(usegmt):
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=30)
    # usegmt=False on a naive datetime gives the "-0000" form: no zone, read as UTC
    value = format_datetime(when if usegmt else when.replace(tzinfo=None), usegmt=usegmt)
    assert 27.0 <= retry_after_seconds(httpx.Headers({"Retry-After": value})) <= 30.0


def test_retryable_statuses_and_the_backoff_cap():
    assert frozenset({408, 409, 429, 500, 502, 503, 504}) == RETRYABLE_STATUS
    assert MAX_BACKOFF_SECONDS == 60.0


@pytest.mark.parametrize("key", ["sk-mutant-key-42", None])
def test_openai_sends_only_its_own_key_and_no_org_or_project_from_the_environment(monkeypatch, key):
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders, openai_backend

    monkeypatch.setenv("OPENAI_ORG_ID", "org-ambient")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-ambient")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-should-not-be-sent")
    if key:
        monkeypatch.setenv("FTLOOP_SURVIVOR_KEY", key)
    else:
        monkeypatch.delenv("FTLOOP_SURVIVOR_KEY", raising=False)
    with FakeOpenAIWithHeaders() as server:
        assert len(openai_backend(server, []).questions(ARTICLE, 1)) == 1
    sent = server.headers[0]
    assert "openai-organization" not in sent and "openai-project" not in sent
    assert sent.get("authorization") == (f"Bearer {key}" if key else None)


def test_openai_base_url_is_used_as_given_up_to_the_trailing_slash():
    """A base URL that ends in a letter (``/vX``) is kept whole, in the request path and in the error message."""
    from ftloop.components.generators.base import GeneratorError
    from ftloop.components.generators.factory import make_generator
    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders, openai_config

    with FakeOpenAIWithHeaders() as server:
        gen = make_generator("openai", openai_config(server, base_url=f"{server.url}/vX/"))
        with pytest.raises(GeneratorError, match=r"/vX/chat/completions: HTTP 404"):
            gen.questions(ARTICLE, 1)
    assert [r["path"] for r in server.requests] == ["/vX/chat/completions"]
