"""The okareo backend and evaluation upload through the official SDK, against a local fake Okareo API."""

import re
import subprocess
import sys

import pytest

from ftloop.components.config import RunConfig
from ftloop.components.errors import ConfigError
from ftloop.components.generators.base import Checkpoint, GeneratorError
from ftloop.components.generators.factory import make_generator
from ftloop.components.generators.okareo import upload_evaluation
from ftloop.components.records import Article, Example, write_jsonl
from tests.fixtures.fake_servers import FakeOkareo

ARTICLES = [
    Article("a1", "Refunds reach your card within five days.", "returns", "Refunds"),
    Article("a2", "Express delivery arrives the next day.", "shipping", "Delivery"),
]


def okareo_config(server, **extra) -> RunConfig:
    settings = {"base_url": server.url, "backoff_seconds": 0.0, "max_retries": 2, **extra}
    return RunConfig.model_validate(
        {"seed": 1, "data": {"questions": "q.jsonl"}, "generate": {"backend": "okareo"}, "generators": {"okareo": settings}}
    )


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OKAREO_API_KEY", "ok-secret-key")
    with FakeOkareo() as fake:
        yield fake


def paths(server):
    return [(r["method"], r["path"].split("/v0/")[1].split("/")[0]) for r in server.requests]


def test_questions_upload_a_seed_scenario_and_map_rows_back_to_articles(server, tmp_path):
    gen = make_generator("okareo", okareo_config(server), checkpoint_dir=tmp_path)
    rows = gen.questions(ARTICLES, 3)
    assert paths(server) == [
        ("GET", "projects"),
        ("POST", "scenario_sets"),
        ("POST", "scenario_sets_generate"),
        ("GET", "scenario_data_points"),
    ]
    seed = server.requests[1]["body"]
    assert [(s["input"], s["result"]) for s in seed["seed_data"]] == [(a.text, a.id) for a in ARTICLES]
    generate = server.requests[2]["body"]
    assert (generate["generation_type"], generate["generation_tone"], generate["number_examples"]) == (
        "TEXT_REVERSE_QUESTION",
        "Informal",
        3,
    )
    assert [r.id for r in rows] == ["a1-q01", "a1-q02", "a1-q03", "a2-q01", "a2-q02", "a2-q03"]
    assert {(r.parent_id, r.label, r.group) for r in rows} == {("a1", "returns", "a1"), ("a2", "shipping", "a2")}
    assert "refunds" in rows[0].text and rows[0].generator == "okareo:TEXT_REVERSE_QUESTION"
    assert {r["api_key"] for r in server.requests} == {"ok-secret-key"}
    # A second attempt (e.g. a KFP retry) reuses the checkpointed rows instead of generating again.
    again = make_generator("okareo", okareo_config(server), checkpoint_dir=tmp_path).questions(ARTICLES, 3)
    assert again == rows and paths(server)[4:] == []


def test_rephrase_keeps_parent_label_group_and_confusion(server):
    parents = [Example("e1", "how long do refunds take", "returns", "a1", "generated")]
    rows = make_generator("okareo", okareo_config(server)).rephrase(parents, 2, hint={"e1": "shipping"}, round=1)
    assert server.requests[2]["body"]["generation_type"] == "REPHRASE_INVARIANT"
    assert [(r.id, r.label, r.group, r.origin, r.meta) for r in rows] == [
        ("e1-r1.1", "returns", "a1", "rephrased", {"confused_with": "shipping"}),
        ("e1-r1.2", "returns", "a1", "rephrased", {"confused_with": "shipping"}),
    ]


def test_zero_row_generation_gives_zero_rows(server):
    server.empty_generations = True
    gen = make_generator("okareo", okareo_config(server))
    assert gen.questions(ARTICLES, 2) == []
    assert gen.stats["empty_generations"] == 1
    assert ("GET", "scenario_data_points") not in paths(server)


def test_429_and_5xx_are_retried_with_backoff(server):
    server.faults = [("status", 429), ("status", 503), None, ("status", 500)]
    sleeps = []
    gen = make_generator("okareo", okareo_config(server, backoff_seconds=0.5))
    gen.session._sleep = sleeps.append
    assert len(gen.questions(ARTICLES, 1)) == 2
    assert sleeps == [0.5, 1.0, 0.5]  # per call: exponential from backoff_seconds


def test_persistent_server_errors_end_in_a_clear_error(server):
    server.faults = [None] + [("status", 502)] * 3
    with pytest.raises(GeneratorError, match=r"okareo create scenario .*gave up after 3 tries: HTTP 502"):
        make_generator("okareo", okareo_config(server)).questions(ARTICLES, 1)


PROXY_PAGE = b"<html><body>Gateway sign-in</body></html>"


@pytest.mark.parametrize(
    "request_index, fault",
    [
        (1, ("raw", PROXY_PAGE)),  # POST scenario_sets: HTML under 200, a status the SDK does not expect
        (2, ("reply", (201, PROXY_PAGE))),  # POST scenario_sets_generate: HTML under the route's own 201
        (3, ("raw", PROXY_PAGE)),  # GET scenario_data_points: HTML under the route's own 200
        (1, ("reply", (201, b'"created"'))),  # JSON, but not a scenario set
        (3, ("raw", b'{"rows": 2}')),  # JSON, but not a list of rows
    ],
    ids=["html-unexpected-2xx", "html-generate", "html-fetch", "wrong-shape-create", "wrong-shape-fetch"],
)
def test_a_malformed_success_reply_is_retried_like_a_5xx(server, request_index, fault):
    server.faults = [None] * request_index + [fault]
    gen = make_generator("okareo", okareo_config(server))
    rows = gen.questions(ARTICLES, 1)
    assert [r.parent_id for r in rows] == ["a1", "a2"]
    assert gen.stats["retries"] == 1
    assert len(server.requests) == 5  # the garbled request was sent again, nothing else


def test_a_reply_that_stays_malformed_ends_in_a_clear_error_and_keeps_completed_work(server, tmp_path):
    """The okareo backend checkpoints each whole request (seed upload, generate, fetch): a request that fails
    saves nothing, so the next attempt repeats only that one and reuses those that completed."""
    done = make_generator("okareo", okareo_config(server), checkpoint_dir=tmp_path).questions(ARTICLES[:1], 1)
    server.requests.clear()
    # connect, upload, generate fine; every fetch of the rows gets a proxy page that echoes the request headers
    server.faults = [None] * 3 + [("raw", b"<html>\n<p>api-key: ok-secret-key</p>\n</html>")] * 3
    with pytest.raises(GeneratorError) as failure:
        make_generator("okareo", okareo_config(server), checkpoint_dir=tmp_path).questions(ARTICLES[1:], 1)
    message = str(failure.value)
    assert re.fullmatch(
        r"okareo fetch rows of '[\w-]+': gave up after 3 tries: malformed reply from "
        r"GET /v0/scenario_data_points/[\w-]+: HTTP 200 with a body that is not JSON: .*",
        message,
    )
    assert "ok-secret-key" not in message and "\n" not in message
    assert paths(server).count(("GET", "scenario_data_points")) == 3
    assert len(Checkpoint(tmp_path / "okareo-requests.jsonl")) == 1  # the failed request saved nothing
    server.requests.clear()
    again = make_generator("okareo", okareo_config(server), checkpoint_dir=tmp_path)
    assert again.questions(ARTICLES[:1], 1) == done and server.requests == []  # completed work is reused
    assert [r.parent_id for r in again.questions(ARTICLES[1:], 1)] == ["a2"]  # the failed request runs again


def test_a_refusal_with_an_unreadable_body_fails_at_once_with_its_status(server):
    server.faults = [None, ("reply", (401, PROXY_PAGE))]
    with pytest.raises(GeneratorError, match=r"okareo create scenario '[\w-]+': HTTP 401: b'<html><body>Gateway"):
        make_generator("okareo", okareo_config(server)).questions(ARTICLES, 1)
    assert len(server.requests) == 2


def test_client_errors_are_not_retried(server):
    server.faults = [None, ("status", 401)]
    with pytest.raises(GeneratorError, match=r"okareo create scenario"):
        make_generator("okareo", okareo_config(server)).questions(ARTICLES, 1)
    assert len(server.requests) == 2


def test_missing_key_is_a_clear_config_error(monkeypatch):
    monkeypatch.delenv("OKAREO_API_KEY", raising=False)
    cfg = RunConfig.model_validate({"data": {"questions": "q.jsonl"}})
    with pytest.raises(ConfigError, match="OKAREO_API_KEY is not set"):
        make_generator("okareo", cfg)


def test_the_key_is_not_a_config_field():
    with pytest.raises(Exception, match="api_key"):
        RunConfig.model_validate({"data": {"questions": "q.jsonl"}, "generators": {"okareo": {"api_key": "x"}}})


def test_evaluation_upload_reports_each_models_predictions_as_a_test_run(server, tmp_path):
    evals = {}
    for model, wrong in (("base", {"t2"}), ("augmented", set())):
        for split, ids in (("dev", ["d1"]), ("test", ["t1", "t2"])):
            rows = [
                {"id": i, "text": f"question {i}", "label": "returns", "prediction": "shipping" if i in wrong else "returns"} for i in ids
            ]
            write_jsonl(tmp_path / model / "predictions" / f"{split}.jsonl", rows)
        evals[model] = tmp_path / model
    links = upload_evaluation(okareo_config(server).generators.okareo, "run1", evals, splits=("dev", "test"))
    assert set(links) == {"base", "augmented"} and links["base"]["test"] == "http://fake/eval"
    scenario_inputs = {s["name"].split("-")[2]: [(r["input"], r["result"]) for r in s["rows"]] for s in server.scenarios.values()}
    assert scenario_inputs["test"] == [("question t1", "returns"), ("question t2", "returns")]
    assert [m["name"] for m in server.models] == ["ftloop-run1-base", "ftloop-run1-augmented"]
    assert len(server.test_runs) == 4
    base_test = next(r for r in server.test_runs if r["name"] == "run1 base test")
    assert base_test["type"] == "MULTI_CLASS_CLASSIFICATION"
    actual = {v["model_input"]: v["actual"] for v in base_test["model_results"]["model_data"].values()}
    assert actual == {"question t1": "returns", "question t2": "shipping"}


def test_cli_stage_without_key_exits_cleanly(tmp_path, monkeypatch):
    """The error reaches a user as one line and a non-zero exit, without a traceback."""
    code = (
        "from ftloop.components.errors import exit_on_user_error\n"
        "from ftloop.components.config import RunConfig\n"
        "from ftloop.components.generators.factory import make_generator\n"
        "with exit_on_user_error():\n"
        "    make_generator('okareo', RunConfig.model_validate({'data': {'questions': 'q.jsonl'}}))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OKAREO_API_KEY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "OKAREO_API_KEY is not set" in result.stderr


def test_a_hanging_server_times_out_and_is_retried(server):
    server.faults = [None, ("sleep", 1.5)]  # the scenario upload hangs once
    gen = make_generator("okareo", okareo_config(server, timeout_seconds=0.3))
    assert len(gen.questions(ARTICLES, 1)) == 2
    assert gen.stats["retries"] == 1
    assert [p for p in paths(server)].count(("POST", "scenario_sets")) == 2


def test_a_server_that_keeps_hanging_ends_in_a_clear_error(server):
    server.faults = [("sleep", 1.0)] * 3
    with pytest.raises(GeneratorError, match=r"okareo connect \(GET /v0/projects\): gave up after 3 tries: ReadTimeout"):
        make_generator("okareo", okareo_config(server, timeout_seconds=0.2)).questions(ARTICLES, 1)
