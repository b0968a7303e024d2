"""The generator interface and its prompted backends: openai against a local server, hf with the tiny model."""

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from ftloop.components.config import RunConfig
from ftloop.components.generators.base import Checkpoint, GeneratorError, MalformedOutput, parse_list
from ftloop.components.generators.factory import make_generator
from ftloop.components.generators.offline import OfflineGenerator
from ftloop.components.records import Article, Example
from tests.fixtures.fake_servers import FakeOpenAI

ARTICLES = [
    Article("a1", "Refunds reach your card within five days after the parcel arrives back.", "returns", "Refunds"),
    Article("a2", "Express delivery arrives the next day; tracking numbers come by email.", "shipping", "Delivery"),
]
PARENT = Example("e1", "how long does my refund take", "returns", "a1", "generated")


def config(backend="openai", **sections) -> RunConfig:
    return RunConfig.model_validate(
        {"seed": 3, "data": {"questions": "q.jsonl"}, "generate": {"backend": backend}, "augment": {"backend": backend}, **sections}
    )


# ------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "reply, expected",
    [
        ('["a b?", "c d?"]', ["a b?", "c d?"]),
        ('```json\n["a b?", "c d?", "e f?"]\n```', ["a b?", "c d?"]),
        ('Sure! Here they are: ["a b?"] Hope that helps', ["a b?"]),
        ("1. first one?\n2) second one?\n- third", ["first one?", "second one?"]),
    ],
)
def test_parse_list_accepts_json_arrays_and_numbered_lines(reply, expected):
    assert parse_list(reply, 2) == expected


@pytest.mark.parametrize("reply", ["", "I cannot help with that.", "[1, 2, 3]", '{"questions": 3}'])
def test_parse_list_rejects_replies_without_a_list_of_strings(reply):
    with pytest.raises(MalformedOutput):
        parse_list(reply, 3)


def test_checkpoint_survives_a_truncated_last_line(tmp_path):
    path = tmp_path / "ck.jsonl"
    Checkpoint(path).put("k1", ["x"])
    with path.open("a") as f:
        f.write('{"key": "k2", "ite')  # crash mid-write
    again = Checkpoint(path)
    assert again.get("k1") == ["x"] and again.get("k2") is None and len(again) == 1


def test_factory_picks_each_backend_from_the_config(tmp_path, monkeypatch):
    assert isinstance(make_generator("offline", config("offline")), OfflineGenerator)
    assert make_generator("openai", config()).name == "openai"
    assert make_generator("hf", config("hf")).name == "hf"
    with pytest.raises(ValueError, match="unknown generator backend"):
        make_generator("gpt", config())


# -------------------------------------------------------------------- openai


def openai_config(server, **extra) -> RunConfig:
    settings = {
        "base_url": f"{server.url}/v1",
        "model": "served-model",
        "timeout_seconds": 2,
        "backoff_seconds": 0.0,
        "max_retries": 2,
        "concurrency": 3,
        **extra,
    }
    return config(generators={"openai": settings})


def test_openai_backend_generates_questions_and_conditioned_rephrasings(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-123")
    with FakeOpenAI() as server:
        gen = make_generator("openai", openai_config(server))
        questions = gen.questions(ARTICLES, 3)
        rephrased = gen.rephrase([PARENT], 2, hint={"e1": "shipping"}, round=2)
    assert [q.id for q in questions] == ["a1-q01", "a1-q02", "a1-q03", "a2-q01", "a2-q02", "a2-q03"]
    assert all(q.label == a.label and q.group == a.id for a in ARTICLES for q in questions if q.parent_id == a.id)
    assert questions[0].generator == "openai:served-model" and questions[0].origin == "generated"
    assert "refunds" in questions[0].text and "delivery" in questions[3].text  # built from each article's prompt
    assert [(r.id, r.round, r.label, r.meta) for r in rephrased] == [
        ("e1-r2.1", 2, "returns", {"confused_with": "shipping"}),
        ("e1-r2.2", 2, "returns", {"confused_with": "shipping"}),
    ]
    prompt = server.requests[-1]["body"]["messages"][-1]["content"]
    assert '"shipping"' in prompt and '"returns"' in prompt and "how long does my refund take" in prompt
    assert {r["auth"] for r in server.requests} == {"Bearer sk-test-123"}
    assert {r["body"]["model"] for r in server.requests} == {"served-model"}


def test_openai_key_is_optional_and_read_from_the_named_env_var(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_KEY", "abc")
    with FakeOpenAI() as server:
        make_generator("openai", openai_config(server)).questions(ARTICLES[:1], 1)
        make_generator("openai", openai_config(server, api_key_env="VLLM_KEY")).questions(ARTICLES[:1], 1)
    assert [r["auth"] for r in server.requests] == [None, "Bearer abc"]


def test_openai_retries_429_5xx_timeouts_and_malformed_bodies(monkeypatch):
    with FakeOpenAI() as server:
        server.faults = [("status", 429), ("status", 503), ("sleep", 1.5), ("raw", b"<html>oops")]
        gen = make_generator("openai", openai_config(server, concurrency=1, max_retries=4, timeout_seconds=0.5))
        rows = gen.questions(ARTICLES[:1], 2)
    assert len(rows) == 2
    assert gen.stats["http_retries"] == 4  # 429, 503, the timed-out request and the non-JSON body


def test_openai_unparseable_replies_are_resampled_then_fail_clearly(monkeypatch):
    with FakeOpenAI() as server:
        server.reply = staticmethod(lambda body: "Sorry, I can't do that.")
        gen = make_generator("openai", openai_config(server, max_attempts=2))
        with pytest.raises(GeneratorError, match=r"2 of 2 requests gave no parseable list after 2 attempt\(s\).*can't do"):
            gen.questions(ARTICLES, 2)
    seeds = [r["body"]["seed"] for r in server.requests]
    assert len(seeds) == 4 and len(set(seeds)) == 4  # a retry asks for a different sample


def test_openai_gives_up_after_retries_and_the_next_attempt_reuses_completed_work(tmp_path):
    cfg_extra = {"concurrency": 1, "max_retries": 1}
    with FakeOpenAI() as server:
        # first request fine; the second fails on every try
        server.faults = [None, ("status", 500), ("status", 500)]
        gen = make_generator("openai", openai_config(server, **cfg_extra), checkpoint_dir=tmp_path)
        with pytest.raises(GeneratorError, match=r"gave up after 2 tries: HTTP 500.*1 of 2 requests completed.*reused"):
            gen.questions(ARTICLES, 2)
        calls_before = len(server.requests)
        rows = make_generator("openai", openai_config(server, **cfg_extra), checkpoint_dir=tmp_path).questions(ARTICLES, 2)
    assert len(server.requests) - calls_before == 1  # only the unfinished request is sent again
    assert [r.parent_id for r in rows] == ["a1", "a1", "a2", "a2"]
    assert len(Checkpoint(tmp_path / "openai-requests.jsonl")) == 2


@pytest.mark.parametrize("concurrency", [1, 3])
def test_openai_never_has_more_than_concurrency_requests_in_flight(concurrency):
    """`concurrency` protects a shared inference server: the bound is reached and never exceeded."""
    lock = threading.Lock()
    in_flight = {"now": 0, "max": 0}

    def slow_reply(body: dict) -> str:  # held long enough that requests sent together overlap on the server
        with lock:
            in_flight["now"] += 1
            in_flight["max"] = max(in_flight["max"], in_flight["now"])
        time.sleep(0.25)
        with lock:
            in_flight["now"] -= 1
        return FakeOpenAI.reply(body)

    articles = [Article(f"a{i}", f"Article {i} explains refunds and delivery.", "returns", f"Title {i}") for i in range(7)]
    with FakeOpenAI() as server:
        server.reply = slow_reply
        rows = make_generator("openai", openai_config(server, concurrency=concurrency)).questions(articles, 1)
    assert len(rows) == len(server.requests) == 7  # more requests than twice the bound, so an unbounded pool shows
    assert in_flight["max"] == concurrency


def test_openai_auth_failure_is_not_retried_and_names_the_env_var(monkeypatch):
    with FakeOpenAI() as server:
        server.faults = [("status", 401)]
        with pytest.raises(GeneratorError, match=r"HTTP 401 \(is OPENAI_API_KEY set\?\)"):
            make_generator("openai", openai_config(server)).questions(ARTICLES[:1], 1)
    assert len(server.requests) == 1


def test_openai_unreachable_server_fails_clearly():
    cfg = config(generators={"openai": {"base_url": "http://127.0.0.1:9/v1", "max_retries": 1, "backoff_seconds": 0}})
    with pytest.raises(GeneratorError, match="connection failed"):
        make_generator("openai", cfg).questions(ARTICLES[:1], 1)


def test_openai_honours_retry_after_ms_and_an_http_date_and_ignores_openai_env_headers(monkeypatch):
    """The server's wait in any of its forms: ``retry-after-ms`` first, ``Retry-After`` as an HTTP date."""
    from email.utils import format_datetime

    from tests.unit.test_survivors import ARTICLE, FakeOpenAIWithHeaders, openai_backend

    monkeypatch.setenv("OPENAI_API_KEY", "sk-ambient-should-not-be-sent")  # only api_key_env's key is used
    monkeypatch.setenv("OPENAI_ORG_ID", "org-ambient")
    monkeypatch.delenv("FTLOOP_SURVIVOR_KEY", raising=False)
    in_30s = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    sleeps: list[float] = []
    with FakeOpenAIWithHeaders() as server:
        server.faults = [
            ("status_headers", (429, {"retry-after-ms": "1500", "Retry-After": "9"})),
            ("status_headers", (503, {"Retry-After": in_30s})),
            ("status_headers", (503, {"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"})),  # in the past: no wait
        ]
        assert len(openai_backend(server, sleeps, max_retries=3).questions(ARTICLE, 1)) == 1
    assert sleeps[0] == 1.5 and 25 < sleeps[1] <= 30 and sleeps[2] == 0.0
    assert all("authorization" not in h and "openai-organization" not in h for h in server.headers)


def test_openai_content_that_is_not_text_is_a_malformed_reply():
    from tests.unit.test_survivors import ARTICLE, openai_backend

    with FakeOpenAI() as server:
        server.faults = [("raw", b'{"choices": [{"message": {"content": 5}}]}')] * 2
        with pytest.raises(GeneratorError, match=r"gave up after 2 tries: malformed chat completion: b'\{\"choices"):
            openai_backend(server, [], max_retries=1).questions(ARTICLE, 1)


# ------------------------------------------------------------------------ hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from ftloop.components.modeling.tiny import build_tiny_model

    texts = [a.text for a in ARTICLES] + [PARENT.text, "Write 2 different ways a customer could ask"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), texts, ["returns", "shipping"], seed=0)


def hf_config(path, **extra):
    return config(
        "hf",
        generators={
            "hf": {"name_or_path": str(path), "dtype": "float32", "max_new_tokens": 12, "batch_size": 2, "max_attempts": 2, **extra}
        },
    )


def test_hf_backend_samples_batched_and_reproducibly_with_the_real_model(tiny_dir):
    gen = make_generator("hf", hf_config(tiny_dir))
    requests = [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    first = gen.complete(requests, attempt=0)
    assert len(first) == 3 and all(isinstance(r, str) for r in first)
    assert gen.complete(requests, attempt=0) == first  # same seed and attempt -> same samples
    assert gen.complete(requests, attempt=1) != first  # a retry draws new samples


def test_hf_backend_parses_model_replies_and_rejects_garbage(tiny_dir, monkeypatch, tmp_path):
    # The random-init tiny model writes no JSON: every reply is resampled, then the run fails clearly.
    gen = make_generator("hf", hf_config(tiny_dir), checkpoint_dir=tmp_path)
    with pytest.raises(GeneratorError, match=r"hf backend: 2 of 2 requests gave no parseable list after 2 attempt"):
        gen.questions(ARTICLES, 2)
    assert gen.stats["malformed_replies"] == 4
    # The same path with replies that do parse (the model call swapped for canned text) builds rows.
    monkeypatch.setattr(type(gen), "complete", lambda self, reqs, attempt: ["1. where is my refund?\n2. refund status?"] * len(reqs))
    rows = gen.rephrase([PARENT], 2, hint={"e1": "shipping"})
    assert [r.text for r in rows] == ["where is my refund?", "refund status?"]
    assert rows[0].generator == f"hf:{tiny_dir}" and rows[0].round == 1


def test_hf_backend_load_errors_name_the_generator_field_not_the_base_model(tiny_dir, tmp_path):
    import shutil

    from ftloop.components.errors import FtloopError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    request = [[{"role": "user", "content": "question"}]]
    with pytest.raises(FtloopError, match=r"^generators\.hf\.name_or_path: cannot load model '.*broken'"):
        make_generator("hf", hf_config(broken)).complete(request, attempt=0)
    with pytest.raises(FtloopError, match=r"^generators\.hf\.name_or_path: .*/gone: no such model directory"):
        make_generator("hf", hf_config(tmp_path / "gone")).complete(request, attempt=0)


# ------------------------------------------------------- from the run config


def test_prepare_stage_runs_the_backend_named_in_the_run_config(tmp_path, monkeypatch):
    import yaml

    from ftloop.components.config import load_config
    from ftloop.components.records import read_jsonl
    from ftloop.components.stages.prepare_examples import run as run_prepare
    from tests.fixtures.data import corpus_subset, write_lines

    articles = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    with FakeOpenAI() as server:
        path = tmp_path / "run.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "data": {"articles": str(articles)},
                    "generate": {"backend": "openai", "questions_per_article": 3},
                    "generators": {"openai": {"base_url": f"{server.url}/v1", "model": "m", "backoff_seconds": 0}},
                }
            )
        )
        meta = run_prepare(load_config(path), str(articles), tmp_path / "examples")
    assert meta["generator"] == "openai" and meta["groups"] == 12 and len(server.requests) == 12
    rows = read_jsonl(tmp_path / "examples" / "examples.jsonl")
    assert meta["rows"] == len(rows) == 36 - meta["filtered_total"]
    assert {r["generator"] for r in rows} == {"openai:m"}
    assert (tmp_path / "examples" / "generation" / "openai-requests.jsonl").exists()


def test_an_unknown_backend_in_the_run_config_names_key_and_line(tmp_path):
    from ftloop.components.config import load_config
    from ftloop.components.errors import ConfigError

    path = tmp_path / "run.yaml"
    path.write_text("data:\n  questions: q.jsonl\naugment:\n  backend: gpt4\n")
    with pytest.raises(ConfigError, match=r"run.yaml:4: augment.backend: Input should be 'offline', 'okareo', 'hf' or 'openai'"):
        load_config(path)
