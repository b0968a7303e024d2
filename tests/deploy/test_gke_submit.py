"""`ftloop submit` / `ftloop schedule` through the real CLI and kfp.Client against a local KFP v2beta1 stub."""

import base64
import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from tests.fixtures.data import REPO

GKE_CONFIG = REPO / "configs" / "webbizz-gke.yaml"
RUNTIME_PARAMETERS = {
    "model_name_or_path",
    "model_revision",
    "train_learning_rate",
    "train_epochs",
    "train_batch_size",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "eval_batch_size",
    "augment_rephrasings_per_error",
    "augment_label_margin",
    "augment_min_dev_improvement",
    "seed",
}
SOURCE = "gs://ftloop-data/webbizz/articles.jsonl"


class _ServedInThread:
    """Runs ``self.server`` (set up by the subclass, with ``self.thread``) for the length of a with-block."""

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class KfpStub(_ServedInThread):
    """Answers the v2beta1 endpoints kfp.Client calls; records every request.

    With ``prefix`` it stands in for the Kubernetes API server's service proxy: only paths under
    the prefix reach the KFP routes (``path`` is recorded without it, ``raw_path`` with it), like
    ``/api/v1/namespaces/kubeflow/services/ml-pipeline:http/proxy/apis/v2beta1/...``. With ``tls``
    (certificate, key[, client CA]) it serves HTTPS and, given a client CA, requires a client certificate.
    """

    def __init__(
        self,
        fail: dict | None = None,
        experiments: list | None = None,
        runs: list | None = None,
        prefix: str = "",
        tls: tuple | None = None,
    ):
        self.requests: list[dict] = []
        self.fail = fail or {}  # (method, path) -> HTTP status
        self.experiments = experiments or []
        self.runs = runs or []  # existing runs, filtered by display_name like the API server
        self.prefix = prefix
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                peer = self.connection.getpeercert() if hasattr(self.connection, "getpeercert") else None
                path = url.path.removeprefix(stub.prefix) if url.path.startswith(stub.prefix) else None
                stub.requests.append(
                    {
                        "method": method,
                        "path": path,
                        "raw_path": url.path,
                        "query": parse_qs(url.query),
                        "body": body,
                        "auth": self.headers.get("Authorization"),
                        "client_cert": dict(x[0] for x in peer["subject"]) if peer else None,
                    }
                )
                if path is None:  # the API server itself: /apis/v2beta1/... is not one of its paths
                    return self._send(404, {"kind": "Status", "message": "the server could not find the requested resource"})
                url = url._replace(path=path)
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
        self.server.daemon_threads = True
        scheme = "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls[0], tls[1])
            if len(tls) > 2:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(tls[2])
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def posted(self, path: str) -> list[dict]:
        return [r["body"] for r in self.requests if r["method"] == "POST" and r["path"] == path]


def ftloop(*args: str, home: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    # HOME isolates kfp's ~/.config/kfp/context.json; no real cluster credentials are reachable.
    full_env = {**os.environ, "HOME": str(home), "KUBECONFIG": str(home / "no-kubeconfig"), **(env or {})}
    full_env.pop("KF_PIPELINES_ENDPOINT", None)
    return subprocess.run(
        [sys.executable, "-m", "ftloop.pipelines.cli", *args], capture_output=True, text=True, env=full_env, cwd=home, timeout=120
    )


def test_submit_creates_experiment_and_run_with_the_run_parameters(tmp_path):
    with KfpStub() as kfp:
        result = ftloop(
            "submit",
            "--config",
            str(GKE_CONFIG),
            "--host",
            kfp.url,
            "--namespace",
            "team-ml",
            "--experiment",
            "webbizz",
            "--run-name",
            "retrain-abc123",
            "--source-uri",
            SOURCE,
            "--image",
            "cpu=reg/ftloop-cpu:abc123",
            "--image",
            "gpu=reg/ftloop-gpu:abc123",
            home=tmp_path,
        )
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
    # every typed run parameter, with the config's values (so the run records them and the Compare page shows them)
    assert params["train_learning_rate"] == 0.0002 and params["lora_r"] == 16 and params["seed"] == 42
    assert params["model_revision"] == "0a67737cc96d2554230f90338b163bc6380a2a85"
    assert set(params) == {"source_uri", *RUNTIME_PARAMETERS}
    assert run["runtime_config"]["pipeline_root"] == yaml.safe_load(GKE_CONFIG.read_text())["cluster"]["pipeline_root"]
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"source_uri", *RUNTIME_PARAMETERS}
    compare = spec["root"]["dag"]["tasks"]["compare-models"]["inputs"]["parameters"]["config_slice"]["runtimeValue"]["constant"]
    assert json.loads(compare)["config"]["cluster"]["gpu_image"] == "reg/ftloop-gpu:abc123"
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
    args = [
        "submit",
        "--config",
        str(REPO / "manifests" / "gitops" / "retrain" / "run.yaml"),
        "--skip-existing",
        "--images-from",
        str(REPO / "manifests" / "gitops" / "retrain" / "build.json"),
    ]
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
        result = ftloop(
            "schedule",
            "--config",
            str(GKE_CONFIG),
            "--host",
            kfp.url,
            "--namespace",
            "team-ml",
            "--cron",
            "0 0 3 * * 1",
            "--name",
            "weekly-retrain",
            "--source-uri",
            SOURCE,
            home=tmp_path,
        )
    assert result.returncode == 0, result.stderr
    assert "created recurring run rr-789" in result.stdout
    [recurring] = kfp.posted("/apis/v2beta1/recurringruns")
    assert recurring["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 1"}}
    assert recurring["display_name"] == "weekly-retrain"
    assert recurring["experiment_id"] == "exp-123"
    assert recurring["mode"] == "ENABLE" and int(recurring["max_concurrency"]) == 1 and recurring["no_catchup"] is True
    assert recurring["runtime_config"]["parameters"]["train_epochs"] == 3
    assert "train_epochs" in recurring["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]


def test_set_overrides_run_parameters_for_one_run(tmp_path):
    with KfpStub() as kfp:
        result = ftloop(
            "submit",
            "--config",
            str(GKE_CONFIG),
            "--host",
            kfp.url,
            "--source-uri",
            SOURCE,
            "--set",
            "train.learning_rate=1e-4",
            "--set",
            "lora.r=8",
            "--set",
            "augment.label_margin=0.2",
            home=tmp_path,
        )
    assert result.returncode == 0, result.stderr
    [run] = kfp.posted("/apis/v2beta1/runs")
    params = run["runtime_config"]["parameters"]
    assert params["train_learning_rate"] == 1e-4 and params["lora_r"] == 8 and params["augment_label_margin"] == 0.2
    assert params["lora_alpha"] == 32  # the rest keep the config's values
    # the compiled pipeline is the same one `ftloop compile` gives: its defaults stay the config's
    defaults = run["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert defaults["train_learning_rate"]["defaultValue"] == 0.0002


def test_schedule_takes_set_too(tmp_path):
    with KfpStub() as kfp:
        result = ftloop(
            "schedule",
            "--config",
            str(GKE_CONFIG),
            "--host",
            kfp.url,
            "--cron",
            "0 0 3 * * 1",
            "--source-uri",
            SOURCE,
            "--set",
            "seed=7",
            home=tmp_path,
        )
    assert result.returncode == 0, result.stderr
    [recurring] = kfp.posted("/apis/v2beta1/recurringruns")
    assert recurring["runtime_config"]["parameters"]["seed"] == 7


def test_skip_existing_names_the_run_after_its_parameters(tmp_path):
    args = ["submit", "--config", str(GKE_CONFIG), "--skip-existing", "--source-uri", SOURCE]
    with KfpStub() as kfp:
        for extra in ([], ["--set", "train.epochs=5"], ["--set", "train.epochs=5"]):
            assert ftloop(*args, "--host", kfp.url, *extra, home=tmp_path).returncode == 0
    names = [r["display_name"] for r in kfp.posted("/apis/v2beta1/runs")]
    assert names[0] != names[1] and names[1] == names[2]


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("augment.rounds=3", "--set augment.rounds: is fixed when the pipeline is compiled"),
        ("generate.backend=okareo", "--set generate.backend: is fixed when the pipeline is compiled"),
        ("generators.okareo.upload_eval=true", "--set generators.okareo.upload_eval: is fixed when the pipeline is compiled"),
        ("data.articles=gs://b/a.jsonl", "--set data.articles: is fixed when the pipeline is compiled"),
        ("train.learning_rat=1e-4", "--set train.learning_rat: no such run config key; per-run keys: model.name_or_path"),
        ("train.learning_rate", "--set 'train.learning_rate': expected KEY=VALUE"),
        ("train.learning_rate=5", "--set train.learning_rate=5: train.learning_rate: must be less than 1, got 5"),
        ("train.epochs=three", "--set train.epochs=three: train.epochs: Input should be a valid number"),
        ("lora.r=0", "--set lora.r=0: lora.r: Input should be greater than 0"),
        ("model.name_or_path=org/other", None),  # keeps the pinned revision: valid, and submitted
        ("model.revision=", "--set model.revision=: model: name_or_path: 'microsoft/Phi-3-mini-4k-instruct' is not a local directory"),
        ("model.name_or_path=builtin:tiny-phi3", "model.name_or_path: 'builtin:tiny-phi3' is built on the fly for local runs only"),
    ],
)
def test_set_refuses_compile_time_keys_unknown_keys_and_bad_values(tmp_path, flag, expected):
    with KfpStub() as kfp:
        result = ftloop("submit", "--config", str(GKE_CONFIG), "--host", kfp.url, "--source-uri", SOURCE, "--set", flag, home=tmp_path)
    if expected is None:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert kfp.posted("/apis/v2beta1/runs") == []


def test_arguments_that_disagree_with_the_compiled_graph_are_refused(tmp_path):
    """The submit-time check compares every task's embedded settings with the config being submitted."""
    from ftloop.components.config import load_config
    from ftloop.components.errors import FtloopError
    from ftloop.pipelines.compile import compile_pipeline, with_source
    from ftloop.pipelines.submit import check_arguments

    config = with_source(load_config(GKE_CONFIG), SOURCE)
    package = compile_pipeline(config, tmp_path / "p.yaml")
    arguments = {"source_uri": SOURCE, **config.runtime_values()}
    check_arguments(package, config, arguments)  # the config it was compiled from: fine
    other = config.model_copy(update={"augment": config.augment.model_copy(update={"max_per_class": 7})})
    with pytest.raises(FtloopError, match="task augment-from-errors was compiled from other settings"):
        check_arguments(package, other, arguments)
    with pytest.raises(FtloopError, match="has no parameter run_config"):
        check_arguments(package, config, {**arguments, "run_config": "{}"})


def test_in_cluster_auth_sends_the_projected_token(tmp_path):
    token = tmp_path / "token"
    token.write_text("projected-sa-token")
    with KfpStub() as kfp:
        result = ftloop(
            "submit",
            "--config",
            str(GKE_CONFIG),
            "--host",
            kfp.url,
            "--auth",
            "in-cluster",
            "--token-path",
            str(token),
            "--source-uri",
            SOURCE,
            home=tmp_path,
        )
    assert result.returncode == 0, result.stderr
    run_request = next(r for r in kfp.requests if r["path"] == "/apis/v2beta1/runs")
    assert run_request["auth"] == "Bearer projected-sa-token"


def okareo_config(tmp_path: Path) -> Path:
    """webbizz-gke.yaml with Okareo generating the questions and the rephrasings: those two tasks need the key."""
    raw = yaml.safe_load(GKE_CONFIG.read_text())
    raw["data"]["articles"] = str((GKE_CONFIG.parent / raw["data"]["articles"]).resolve())
    raw["generate"]["backend"] = raw["augment"]["backend"] = "okareo"
    path = tmp_path / "okareo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_no_secret_value_reaches_the_server(tmp_path):
    fake_key = "okareo-FAKE-KEY-do-not-leak-3f9a"
    with KfpStub() as kfp:
        result = ftloop(
            "submit",
            "--config",
            str(okareo_config(tmp_path)),
            "--host",
            kfp.url,
            "--source-uri",
            SOURCE,
            home=tmp_path,
            env={"OKAREO_API_KEY": fake_key},
        )
    assert result.returncode == 0, result.stderr
    assert fake_key not in json.dumps(kfp.requests) + result.stdout + result.stderr
    # The key reaches exactly the Okareo tasks, by reference to the cluster Secret.
    [run] = kfp.posted("/apis/v2beta1/runs")
    k8s = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    with_secret = {name: e["secretAsEnv"] for name, e in k8s.items() if "secretAsEnv" in e}
    assert set(with_secret) == {"exec-prepare-examples", "exec-augment-from-errors"}
    for refs in with_secret.values():
        assert [(r["secretName"], r["keyToEnv"]) for r in refs] == [
            ("okareo-api-key", [{"secretKey": "api-key", "envVar": "OKAREO_API_KEY"}])
        ]


# --auth kubeconfig ------------------------------------------------------------------------------


def proxy_prefix(kfp_namespace: str = "kubeflow") -> str:
    return f"/api/v1/namespaces/{kfp_namespace}/services/ml-pipeline:http/proxy"


def write_kubeconfig(path: Path, server: str, users: dict | None = None, current: str = "static", cluster: dict | None = None) -> Path:
    """A kubeconfig with one cluster and a context per user (``name -> user entry``)."""
    users = users or {"static": {"token": "static-token-4b2e"}}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": current,
                "clusters": [{"name": "test", "cluster": {"server": server, **(cluster or {})}}],
                "contexts": [{"name": name, "context": {"cluster": "test", "user": name}} for name in users],
                "users": [{"name": name, "user": user} for name, user in users.items()],
            }
        )
    )
    return path


def exec_plugin(token: str, exit_code: int = 0) -> dict:
    """A kubeconfig exec plugin (the gke-gcloud-auth-plugin mechanism) that prints an ExecCredential."""
    credential = {"apiVersion": "client.authentication.k8s.io/v1beta1", "kind": "ExecCredential", "status": {"token": token}}
    code = f"import sys; print({json.dumps(json.dumps(credential))}); sys.exit({exit_code})"
    if exit_code:
        code = f"import sys; sys.stderr.write('plugin: not logged in'); sys.exit({exit_code})"
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": sys.executable, "args": ["-c", code]}}


@pytest.mark.parametrize("extra, kfp_namespace", [([], "kubeflow"), (["--kfp-namespace", "kfp-system"], "kfp-system")])
def test_kubeconfig_auth_goes_through_the_api_server_proxy_with_the_bearer_token(tmp_path, extra, kfp_namespace):
    """kfp.Client's own kubeconfig fallback loses the proxy path on the first request (kubeflow/pipelines#8313)."""
    with KfpStub(prefix=proxy_prefix(kfp_namespace)) as kfp:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kfp.url)
        result = ftloop(
            "submit",
            "--config",
            str(GKE_CONFIG),
            "--auth",
            "kubeconfig",
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            "team-ml",
            "--source-uri",
            SOURCE,
            *extra,
            home=tmp_path,
        )
    assert result.returncode == 0, result.stderr
    assert "submitted run run-456" in result.stdout
    assert {r["raw_path"] for r in kfp.requests} >= {
        f"{proxy_prefix(kfp_namespace)}/apis/v2beta1/{p}" for p in ("healthz", "experiments", "runs")
    }
    assert all(r["path"] is not None for r in kfp.requests), [r["raw_path"] for r in kfp.requests]
    assert {r["auth"] for r in kfp.requests} == {"Bearer static-token-4b2e"}
    # The KFP system namespace only locates the service; experiments belong to the user namespace.
    [experiment] = kfp.posted("/apis/v2beta1/experiments")
    assert experiment["namespace"] == "team-ml"


def test_kubeconfig_context_with_an_exec_plugin(tmp_path):
    with KfpStub(prefix=proxy_prefix()) as kfp:
        kubeconfig = write_kubeconfig(
            tmp_path / "kubeconfig", kfp.url, users={"static": {"token": "static-token-4b2e"}, "gke": exec_plugin("exec-token-91d0")}
        )
        result = ftloop(
            "schedule",
            "--config",
            str(GKE_CONFIG),
            "--auth",
            "kubeconfig",
            "--context",
            "gke",
            "--cron",
            "@daily",
            "--source-uri",
            SOURCE,
            home=tmp_path,
            env={"KUBECONFIG": str(kubeconfig)},
        )
    assert result.returncode == 0, result.stderr
    assert kfp.posted("/apis/v2beta1/recurringruns")
    assert {r["auth"] for r in kfp.requests} == {"Bearer exec-token-91d0"}


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    files: dict[str, Path] = {}

    def issue(name: str, subject: str, issuer=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer.subject if issuer else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        files[f"{name}.crt"] = directory / f"{name}.crt"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"] = directory / f"{name}.key"
        files[f"{name}.key"].write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return cert, key

    ca, ca_key = issue("ca", "ftloop-test-ca", ca=True)
    issue("server", "kube-apiserver", ca, ca_key, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    issue("client", "ftloop-tester", ca, ca_key)
    return files


def test_kubeconfig_tls_uses_its_ca_and_client_certificate(tmp_path):
    pki = make_pki(tmp_path)
    with KfpStub(prefix=proxy_prefix(), tls=(pki["server.crt"], pki["server.key"], pki["ca.crt"])) as kfp:
        kubeconfig = write_kubeconfig(
            tmp_path / "kubeconfig",
            kfp.url,
            cluster={"certificate-authority-data": base64.b64encode(pki["ca.crt"].read_bytes()).decode()},
            users={"static": {"client-certificate": str(pki["client.crt"]), "client-key": str(pki["client.key"])}},
        )
        result = ftloop(
            "submit",
            "--config",
            str(GKE_CONFIG),
            "--auth",
            "kubeconfig",
            "--kubeconfig",
            str(kubeconfig),
            "--source-uri",
            SOURCE,
            home=tmp_path,
        )
        untrusted = write_kubeconfig(
            tmp_path / "untrusted",
            kfp.url,
            users={"static": {"client-certificate": str(pki["client.crt"]), "client-key": str(pki["client.key"])}},
        )
        refused = ftloop(
            "submit",
            "--config",
            str(GKE_CONFIG),
            "--auth",
            "kubeconfig",
            "--kubeconfig",
            str(untrusted),
            "--source-uri",
            SOURCE,
            home=tmp_path,
        )
    assert result.returncode == 0, result.stderr
    assert kfp.posted("/apis/v2beta1/runs")
    assert {r["client_cert"]["commonName"] for r in kfp.requests} == {"ftloop-tester"}
    assert {r["auth"] for r in kfp.requests} == {None}
    # Without the kubeconfig's CA the server certificate is not trusted: one line, exit 2.
    assert refused.returncode == 2 and "cannot reach the KFP API" in refused.stderr and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


@pytest.mark.parametrize(
    "setup, args, expected",
    [
        (None, ["--kubeconfig", "{tmp}/missing"], "--kubeconfig {tmp}/missing: file not found"),
        ("clusters: [", ["--kubeconfig", "{kc}"], "--kubeconfig {kc}: not valid YAML"),
        ("hello: world\n", ["--kubeconfig", "{kc}"], "--kubeconfig {kc}: "),
        ("valid", ["--kubeconfig", "{kc}", "--context", "nope"], "no context 'nope' (contexts: static)"),
        ({"static": {}}, ["--kubeconfig", "{kc}"], "context 'static': gave no credentials"),
        (
            {"static": exec_plugin("x", exit_code=1)},
            ["--kubeconfig", "{kc}"],
            "context 'static': gave no credentials (exec: process returned 1",
        ),
        (
            "valid",
            ["--kubeconfig", "{kc}", "--host", "http://127.0.0.1:9"],
            "--auth kubeconfig reaches KFP through the Kubernetes API server",
        ),
    ],
)
def test_kubeconfig_errors_are_one_line(tmp_path, setup, args, expected):
    kc = tmp_path / "kubeconfig"
    if isinstance(setup, dict):
        write_kubeconfig(kc, "https://127.0.0.1:9", users=setup)
    elif setup == "valid":
        write_kubeconfig(kc, "http://127.0.0.1:9")
    elif setup is not None:
        kc.write_text(setup)
    args = [a.format(tmp=tmp_path, kc=kc) for a in args]
    result = ftloop("submit", "--config", str(GKE_CONFIG), "--auth", "kubeconfig", "--source-uri", SOURCE, *args, home=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected.format(tmp=tmp_path, kc=kc) in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_default_kubeconfig_is_kubeconfig_env(tmp_path):
    result = ftloop("submit", "--config", str(GKE_CONFIG), "--auth", "kubeconfig", "--source-uri", SOURCE, home=tmp_path)
    assert result.returncode == 2
    assert f"kubeconfig {tmp_path / 'no-kubeconfig'}: file not found" in result.stderr


# --auth iap -------------------------------------------------------------------------------------


def unsigned_jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.{base64.urlsafe_b64encode(b'sig').rstrip(b'=').decode()}"


class FakeIamCredentials(_ServedInThread):
    """The IAM credentials API's generateIdToken, as impersonated ADC calls it."""

    def __init__(self):
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                token = unsigned_jwt(
                    {
                        "aud": body["audience"],
                        "email": "kfp-submitter@p.iam.gserviceaccount.com",
                        "exp": int(datetime.datetime.now().timestamp()) + 3600,
                    }
                )
                data = json.dumps({"token": token}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


def write_adc(tmp_path: Path, monkeypatch, info: dict) -> None:
    """Application default credentials where `gcloud auth application-default login` writes them (no env var)."""
    import google.auth._cloud_sdk

    gcloud = tmp_path / "gcloud"
    gcloud.mkdir()
    (gcloud / "application_default_credentials.json").write_text(json.dumps(info))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(gcloud))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setattr(google.auth._cloud_sdk, "get_project_id", lambda: None)  # not `gcloud config get project`


USER = {
    "type": "authorized_user",
    "client_id": "cid.apps.googleusercontent.com",
    "client_secret": "s",
    "refresh_token": "r",
    "token": "user-access-token",
    "expiry": "2999-01-01T00:00:00Z",
}


def test_iap_with_impersonated_adc_sends_an_id_token_for_the_client_id(tmp_path, monkeypatch):
    """`gcloud auth application-default login --impersonate-service-account SA` (docs/deploy.md step 11)."""
    import google.auth.iam
    import kfp

    from ftloop.components.config import load_config
    from ftloop.pipelines.submit import Target, submit_run

    sa = "kfp-submitter@p.iam.gserviceaccount.com"
    write_adc(
        tmp_path,
        monkeypatch,
        {
            "type": "impersonated_service_account",
            "delegates": [],
            "source_credentials": USER,
            "service_account_impersonation_url": f"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{sa}:generateAccessToken",
        },
    )
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    client_id = "1234-iap.apps.googleusercontent.com"
    with FakeIamCredentials() as iam, KfpStub() as kfp_stub:
        monkeypatch.setattr(google.auth.iam, "_IAM_IDTOKEN_ENDPOINT", iam.url + "/v1/projects/-/serviceAccounts/{}:generateIdToken")
        target = Target(host=kfp_stub.url, namespace="team-ml", experiment="webbizz", auth="iap", iap_client_id=client_id)
        result = submit_run(load_config(GKE_CONFIG), target, source_uri=SOURCE)
    assert result["run_id"] == "run-456"
    [call] = iam.requests
    assert call["path"] == f"/v1/projects/-/serviceAccounts/{sa}:generateIdToken"
    assert call["body"]["audience"] == client_id and call["body"]["includeEmail"] is True
    assert call["auth"] == "Bearer user-access-token"
    tokens = {r["auth"] for r in kfp_stub.requests}
    assert len(tokens) == 1
    [token] = tokens
    claims = json.loads(base64.urlsafe_b64decode(token.removeprefix("Bearer ").split(".")[1] + "=="))
    assert claims["aud"] == client_id


def test_iap_with_plain_user_adc_says_to_impersonate(tmp_path, monkeypatch):
    from ftloop.components.errors import FtloopError
    from ftloop.pipelines.submit import _iap_token

    write_adc(tmp_path, monkeypatch, USER)
    with pytest.raises(
        FtloopError,
        match="user credentials, which cannot get an ID token for IAP; run 'gcloud auth "
        "application-default login --impersonate-service-account SA_EMAIL'",
    ):
        _iap_token("1234-iap.apps.googleusercontent.com")


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
        (
            ["submit", "--image", "gpu=reg/ftloop-gpu:latest"],
            "cluster.gpu_image: image 'reg/ftloop-gpu:latest' uses the mutable 'latest' tag",
        ),
        (["submit", "--auth", "none"], "--auth none needs --host"),
        (
            ["submit", "--auth", "none", "--host", "http://127.0.0.1:9", "--context", "gke"],
            "--kubeconfig/--context apply to --auth kubeconfig only",
        ),
        (
            ["submit", "--host", "http://127.0.0.1:9", "--source-uri", "data/articles.jsonl"],
            "--source-uri 'data/articles.jsonl': expected an object-store URI such as gs://BUCKET/articles.jsonl",
        ),
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
