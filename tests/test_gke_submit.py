"""`ftloop submit` / `ftloop schedule` through the real CLI and kfp.Client against a local KFP v2beta1 stub."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from conftest import REPO

GKE_CONFIG = REPO / "configs" / "webbizz-gke.yaml"
SOURCE = "gs://ftloop-data/webbizz/articles.jsonl"


class KfpStub:
    """Answers the v2beta1 endpoints kfp.Client calls; records every request."""

    def __init__(self, fail: dict | None = None, experiments: list | None = None, runs: list | None = None):
        self.requests: list[dict] = []
        self.fail = fail or {}  # (method, path) -> HTTP status
        self.experiments = experiments or []
        self.runs = runs or []  # existing runs, filtered by display_name like the API server
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                stub.requests.append({"method": method, "path": url.path, "query": parse_qs(url.query), "body": body,
                                      "auth": self.headers.get("Authorization")})
                status = stub.fail.get((method, url.path))
                if status:
                    return self._send(status, {"error": "stub says no", "code": status})
                listed = stub.runs
                if method == "GET" and url.path == "/apis/v2beta1/runs" and "filter" in parse_qs(url.query):
                    wanted = json.loads(parse_qs(url.query)["filter"][0])["predicates"][0]["string_value"]
                    listed = [r for r in stub.runs if r["display_name"] == wanted]
                routes = {
                    ("GET", "/apis/v2beta1/runs"): {"runs": listed, "total_size": len(listed)},
                    ("GET", "/apis/v2beta1/healthz"): {"multi_user": False},
                    ("GET", "/apis/v2beta1/experiments"): {"experiments": stub.experiments, "total_size": len(stub.experiments)},
                    ("POST", "/apis/v2beta1/experiments"): {"experiment_id": "exp-123", **(body or {})},
                    ("POST", "/apis/v2beta1/runs"): {"run_id": "run-456", **(body or {})},
                    ("POST", "/apis/v2beta1/recurringruns"): {"recurring_run_id": "rr-789", **(body or {})},
                }
                if (method, url.path) not in routes:
                    return self._send(404, {"error": f"no route {method} {url.path}"})
                self._send(200, routes[(method, url.path)])

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def posted(self, path: str) -> list[dict]:
        return [r["body"] for r in self.requests if r["method"] == "POST" and r["path"] == path]


def ftloop(*args: str, home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    # HOME isolates kfp's ~/.config/kfp/context.json; no real cluster credentials are reachable.
    full_env = {**os.environ, "HOME": str(home), "KUBECONFIG": str(home / "no-kubeconfig"), **(env or {})}
    full_env.pop("KF_PIPELINES_ENDPOINT", None)
    return subprocess.run([sys.executable, "-m", "ftloop.pipelines.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=home, timeout=120)


def test_submit_creates_experiment_and_run_with_the_run_config(tmp_path):
    with KfpStub() as kfp:
        result = ftloop("submit", "--config", str(GKE_CONFIG), "--host", kfp.url, "--namespace", "team-ml",
                        "--experiment", "webbizz", "--run-name", "retrain-abc123", "--source-uri", SOURCE,
                        "--image", "cpu=reg/ftloop-cpu:abc123", "--image", "gpu=reg/ftloop-gpu:abc123", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "submitted run run-456 'retrain-abc123' (experiment exp-123)" in result.stdout
    paths = [(r["method"], r["path"]) for r in kfp.requests]
    assert ("GET", "/apis/v2beta1/healthz") in paths
    lookup = next(r for r in kfp.requests if r["method"] == "GET" and r["path"] == "/apis/v2beta1/experiments")
    assert lookup["query"]["namespace"] == ["team-ml"] and "webbizz" in lookup["query"]["filter"][0]
    [experiment] = kfp.posted("/apis/v2beta1/experiments")
    assert experiment == {"display_name": "webbizz", "namespace": "team-ml"}
    [run] = kfp.posted("/apis/v2beta1/runs")
    assert run["display_name"] == "retrain-abc123"
    assert run["experiment_id"] == "exp-123"
    params = run["runtime_config"]["parameters"]
    assert params["source_uri"] == SOURCE
    run_config = json.loads(params["run_config"])
    assert run_config["name"] == "webbizz-phi3"
    assert run_config["cluster"]["gpu_image"] == "reg/ftloop-gpu:abc123"
    assert run["runtime_config"]["pipeline_root"] == "gs://ftloop-artifacts/pipeline-root"
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"run_config", "source_uri"}
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values() if "container" in e}
    assert images == {"reg/ftloop-cpu:abc123", "reg/ftloop-gpu:abc123"}
    # The GPU placement travels with the run (its platform spec).
    k8s = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-finetune"]["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}


def test_an_existing_experiment_is_reused(tmp_path):
    existing = [{"experiment_id": "exp-old", "display_name": "ftloop", "namespace": "kubeflow"}]
    with KfpStub(experiments=existing) as kfp:
        result = ftloop("submit", "--config", str(GKE_CONFIG), "--host", kfp.url, "--source-uri", SOURCE, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert kfp.posted("/apis/v2beta1/experiments") == []
    [run] = kfp.posted("/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-old"


def test_skip_existing_submits_once_per_config(tmp_path):
    """The GitOps hook: a re-sync with an unchanged config finds its run by name and submits nothing."""
    args = ["submit", "--config", str(REPO / "manifests" / "gitops" / "retrain" / "run.yaml"), "--skip-existing",
            "--images-from", str(REPO / "manifests" / "gitops" / "retrain" / "build.json")]
    with KfpStub() as kfp:
        first = ftloop(*args, "--host", kfp.url, home=tmp_path)
        assert first.returncode == 0, first.stderr
        [run] = kfp.posted("/apis/v2beta1/runs")
        assert run["display_name"].startswith("webbizz-phi3-") and len(run["display_name"]) == len("webbizz-phi3-") + 10
        kfp.runs.append({"run_id": "run-456", "display_name": run["display_name"]})
        again = ftloop(*args, "--host", kfp.url, home=tmp_path)
        changed = ftloop(*args, "--host", kfp.url, "--source-uri", "gs://my-project-ftloop/data/v2.jsonl", home=tmp_path)
    assert again.returncode == 0 and "already exists (run-456); nothing submitted" in again.stdout
    assert changed.returncode == 0 and "submitted run" in changed.stdout
    names = [r["display_name"] for r in kfp.posted("/apis/v2beta1/runs")]
    assert len(names) == 2 and names[0] != names[1]


def test_schedule_creates_a_recurring_run(tmp_path):
    with KfpStub() as kfp:
        result = ftloop("schedule", "--config", str(GKE_CONFIG), "--host", kfp.url, "--namespace", "team-ml",
                        "--cron", "0 0 3 * * 1", "--name", "weekly-retrain", "--source-uri", SOURCE, home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "created recurring run rr-789" in result.stdout
    [recurring] = kfp.posted("/apis/v2beta1/recurringruns")
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert recurring["display_name"] == "weekly-retrain"
    assert recurring["experiment_id"] == "exp-123"
    assert recurring["mode"] == "ENABLE" and int(recurring["max_concurrency"]) == 1 and recurring["no_catchup"] is True
    assert json.loads(recurring["runtime_config"]["parameters"]["run_config"])["name"] == "webbizz-phi3"
    assert "run_config" in recurring["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]


def test_in_cluster_auth_sends_the_projected_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("projected-sa-token")
    with KfpStub() as kfp:
        result = ftloop("submit", "--config", str(GKE_CONFIG), "--host", kfp.url, "--auth", "in-cluster",
                        "--token-path", str(token), "--source-uri", SOURCE, home=tmp_path)
    assert result.returncode == 0, result.stderr
    run_request = next(r for r in kfp.requests if r["path"] == "/apis/v2beta1/runs")
    assert run_request["auth"] == "Bearer projected-sa-token"


def test_no_secret_value_reaches_the_server(tmp_path):
    fake_key = "okareo-FAKE-KEY-do-not-leak-3f9a"
    with KfpStub() as kfp:
        result = ftloop("submit", "--config", str(GKE_CONFIG), "--host", kfp.url, "--source-uri", SOURCE,
                        home=tmp_path, env={"OKAREO_API_KEY": fake_key})
    assert result.returncode == 0, result.stderr
    assert fake_key not in json.dumps(kfp.requests) + result.stdout + result.stderr


@pytest.mark.parametrize(
    "args, expected",
    [
        (["submit", "--host", "not a url"], "--host 'not a url': expected an http(s) URL"),
        (["submit", "--host", "http://127.0.0.1:9"], "http://127.0.0.1:9: cannot reach the KFP API"),
        (["schedule", "--cron", "0 3 * * 1"], "KFP cron has 6 fields with seconds first; did you mean '0 0 3 * * 1'?"),
        (["schedule", "--cron", "0 0 25 * * *"], "hours value '25' is not in 0-23"),
        (["schedule", "--cron", "0 0 3 * * mon-fri/0"], "step '0' must be a positive number"),
        (["submit", "--auth", "in-cluster", "--token-path", "/nonexistent/token"], "no service-account token at /nonexistent/token"),
        (["submit", "--auth", "iap"], "--auth iap needs --iap-client-id"),
        (["submit", "--image", "gpu=reg/ftloop-gpu:latest"], "cluster.gpu_image: image 'reg/ftloop-gpu:latest' uses the mutable 'latest' tag"),
    ],
)
def test_user_errors_are_one_line_exit_2(tmp_path, args, expected):
    command, *rest = args
    if "--host" not in rest and "--auth" not in rest:
        rest += ["--host", "http://127.0.0.1:9"]
    result = ftloop(command, "--config", str(GKE_CONFIG), "--source-uri", SOURCE, *rest, home=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("status", [401, 403, 500])
def test_http_errors_from_the_server_are_reported(tmp_path, status):
    with KfpStub(fail={("POST", "/apis/v2beta1/runs"): status}) as kfp:
        result = ftloop("submit", "--config", str(GKE_CONFIG), "--host", kfp.url, "--source-uri", SOURCE, home=tmp_path)
    assert result.returncode == 2
    assert f"{kfp.url}: KFP API answered HTTP {status}" in result.stderr
    assert "stub says no" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_host_fails_fast_on_health_check(tmp_path):
    with KfpStub(fail={("GET", "/apis/v2beta1/healthz"): 404}) as kfp:
        result = ftloop("submit", "--config", str(GKE_CONFIG), "--host", kfp.url, "--source-uri", SOURCE, home=tmp_path)
    assert result.returncode == 2 and "HTTP 404" in result.stderr
    assert [r["path"] for r in kfp.requests] == ["/apis/v2beta1/healthz"]


def test_a_local_data_path_is_refused_for_a_cluster_run(tmp_path):
    result = ftloop("submit", "--config", str(GKE_CONFIG), "--host", "http://127.0.0.1:9", home=tmp_path)
    assert result.returncode == 2
    assert "data.articles:" in result.stderr and "is a local path" in result.stderr
