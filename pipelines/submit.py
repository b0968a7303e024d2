"""Submit a run, or a recurring run, of a config's pipeline to Kubeflow Pipelines with ``kfp.Client``.

Authentication (``--auth``):

* ``none``: no token; ``--host`` is a port-forward or an open endpoint.
* ``kubeconfig``: through the Kubernetes API server's service proxy to the KFP API service
  (``ml-pipeline:http`` in ``--kfp-namespace``), as the kubeconfig user (token, exec plugin such as
  gke-gcloud-auth-plugin, or client certificate). ftloop builds the proxy URL itself: kfp.Client's own
  kubeconfig fallback loses it on the first request (kubeflow/pipelines#8313).
* ``in-cluster``: the projected service-account token at ``KF_PIPELINES_SA_TOKEN_PATH``
  (default ``/var/run/secrets/kubeflow/pipelines/token``, audience ``pipelines.kubeflow.org``);
  host defaults to the in-cluster API service. This is what the GitOps hook Job uses.
* ``iap``: an OIDC ID token for the IAP OAuth client id, from the application default credentials:
  a service account (key file, Workload Identity, metadata server) or impersonated ADC
  (``gcloud auth application-default login --impersonate-service-account``).

``--namespace`` is the user (profile) namespace that owns experiments and runs; ``--kfp-namespace``
is where KFP itself runs (``kubeflow``), used only to locate the API service.

Every failure a user can cause (bad host, server down, HTTP error, bad cron, bad kubeconfig) is an
``FtloopError``: one line, exit 2, no traceback. Secrets never become run parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ftloop.components.config import RUNTIME_FIELDS, RunConfig, config_key_kind, with_runtime_values
from ftloop.components.errors import FtloopError
from ftloop.pipelines.compile import check_cluster_config, compile_pipeline, remote_source, with_images, with_source

KFP_SYSTEM_NAMESPACE = "kubeflow"
KFP_SERVICE = "ml-pipeline"  # the KFP API service; port "http" is 8888
KFP_API_PORT = 8888
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
AUTH_MODES = ("none", "kubeconfig", "in-cluster", "iap")


@dataclass(frozen=True)
class Target:
    """Where and as whom to submit."""

    host: str | None
    namespace: str  # user/profile namespace of the experiment and its runs
    experiment: str
    auth: str = "none"
    iap_client_id: str | None = None
    token_path: str | None = None
    service_account: str | None = None
    kfp_namespace: str = KFP_SYSTEM_NAMESPACE  # where the KFP API service runs
    kubeconfig: str | None = None
    kube_context: str | None = None


def in_cluster_host(kfp_namespace: str) -> str:
    return f"http://{KFP_SERVICE}.{kfp_namespace}.svc.cluster.local:{KFP_API_PORT}"


def kube_proxy_host(server: str, kfp_namespace: str) -> str:
    """The API-server service-proxy URL of the KFP API service; kfp appends ``/apis/v2beta1/...``."""
    return f"{server.rstrip('/')}/api/v1/namespaces/{kfp_namespace}/services/{KFP_SERVICE}:http/proxy"


def _check_host(host: str) -> None:
    parsed = urlparse(host)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise FtloopError(f"--host '{host}': expected an http(s) URL such as https://kfp.example.com or http://localhost:8080")


@dataclass(frozen=True)
class KubeCredentials:
    """What kfp.Client needs from a kubeconfig context to reach KFP through the API server."""

    host: str
    token: str | None
    ssl_ca_cert: str | None
    client_cert: tuple[str, str] | None
    verify_ssl: bool


@contextmanager
def _captured_errors(records: list[str]):
    """The kubernetes client logs (and swallows) exec-plugin failures; keep them for our one-line error."""

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage().strip().replace("\n", " "))

    root = logging.getLogger()
    handler = _Keep(level=logging.ERROR)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def kube_credentials(kubeconfig: str | None, context: str | None, kfp_namespace: str) -> KubeCredentials:
    """Load a kubeconfig context (exec plugins included) into a kubernetes Configuration, then point at KFP's proxy."""
    import yaml
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    paths = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    where = f"--kubeconfig {paths}" if kubeconfig else f"kubeconfig {paths}"
    if not any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep) if p):
        raise FtloopError(
            f"{where}: file not found (run 'gcloud container clusters get-credentials CLUSTER --region REGION', or pass --kubeconfig)"
        )
    configuration = k8s_client.Configuration()
    configuration.host = ""
    errors: list[str] = []
    try:
        with _captured_errors(errors):
            merged = k8s_config.kube_config.KubeConfigMerger(paths).config  # the files as kubectl merges them
            names = [str(node.value.get("name")) for node in merged.value.get("contexts") or []]
            name = context or merged.value.get("current-context")
            if context is not None and context not in names:
                raise FtloopError(f"{where}: no context '{context}' (contexts: {', '.join(names) or 'none'})")
            k8s_config.load_kube_config(config_file=paths, context=context, client_configuration=configuration, persist_config=False)
    except k8s_config.ConfigException as exc:
        raise FtloopError(f"{where}: {str(exc).strip()}") from None
    except yaml.YAMLError as exc:
        raise FtloopError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except (KeyError, ValueError, TypeError, AttributeError, OSError) as exc:
        # The kubernetes client raises these for a file that is YAML but not a kubeconfig.
        raise FtloopError(f"{where}: not a usable kubeconfig: {exc}") from None
    label = f"{where}, context '{name}'"
    if not configuration.host:
        raise FtloopError(f"{label}: its cluster has no server URL")
    header = configuration.api_key.get("authorization")
    if header and not header.startswith("Bearer "):
        raise FtloopError(
            f"{label}: the user authenticates with a username and password; use a token, an exec plugin or a client certificate"
        )
    token = header[len("Bearer ") :] if header else None
    client_cert = (configuration.cert_file, configuration.key_file) if configuration.cert_file and configuration.key_file else None
    if not token and client_cert is None:
        detail = f" ({errors[0]})" if errors else ""
        raise FtloopError(f"{label}: gave no credentials{detail}; check that 'kubectl get ns' works with it")
    return KubeCredentials(
        host=kube_proxy_host(configuration.host, kfp_namespace),
        token=token,
        ssl_ca_cert=configuration.ssl_ca_cert,
        client_cert=client_cert,
        verify_ssl=bool(configuration.verify_ssl),
    )


def _iap_token(client_id: str) -> str:
    """An ID token with audience ``client_id`` from the application default credentials.

    ``fetch_id_token`` alone reads only a service-account key named by GOOGLE_APPLICATION_CREDENTIALS
    or the metadata server; impersonated ADC (gcloud ... --impersonate-service-account) goes through
    the IAM credentials API here.
    """
    try:
        import google.auth
        import google.auth.exceptions
        import google.auth.impersonated_credentials
        import google.auth.transport.requests
        import google.oauth2.credentials
        import google.oauth2.id_token
    except ImportError:
        raise FtloopError("--auth iap needs google-auth (pip install google-auth)") from None
    request = google.auth.transport.requests.Request()
    try:
        try:
            credentials, _ = google.auth.default()
        except google.auth.exceptions.DefaultCredentialsError:
            credentials = None  # no ADC file: fetch_id_token still tries the metadata server
        if isinstance(credentials, google.auth.impersonated_credentials.Credentials):
            id_credentials = google.auth.impersonated_credentials.IDTokenCredentials(
                credentials, target_audience=client_id, include_email=True
            )
            id_credentials.refresh(request)
            return id_credentials.token
        if isinstance(credentials, google.oauth2.credentials.Credentials):
            raise FtloopError(
                "--auth iap: the application default credentials are user credentials, which cannot get an ID token "
                "for IAP; run 'gcloud auth application-default login --impersonate-service-account SA_EMAIL' or use a service account"
            )
        return google.oauth2.id_token.fetch_id_token(request, client_id)
    except google.auth.exceptions.GoogleAuthError as exc:
        raise FtloopError(f"--auth iap: cannot get an ID token for client id '{client_id}': {exc}") from None


def make_client(target: Target):
    """A ``kfp.Client`` for ``target``; fails fast (one health check, no 25 s retry loop) with a clear error."""
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    client_cert: tuple[str, str] | None = None

    class _Client(kfp.Client):
        # kfp.Client.__init__ may call get_kfp_healthz, which retries 5 times 5 s apart on any
        # HTTP error; one attempt is enough to tell a wrong host from a working one.
        def get_kfp_healthz(self, sleep_duration: int = 5):
            return self._healthz_api.healthz_service_get_healthz()

        # kfp.Client takes no client certificate; set it before the API client opens connections.
        def _load_config(self, *args, **kwargs):
            config = super()._load_config(*args, **kwargs)
            if client_cert is not None:
                config.cert_file, config.key_file = client_cert
            return config

    if target.auth not in AUTH_MODES:
        raise FtloopError(f"--auth '{target.auth}': expected one of {', '.join(AUTH_MODES)}")
    if (target.kubeconfig or target.kube_context) and target.auth != "kubeconfig":
        raise FtloopError(f"--kubeconfig/--context apply to --auth kubeconfig only, not --auth {target.auth}")
    # kfp.Client's namespace is the user namespace here: every host is explicit, so kfp never
    # derives a service address from it.
    kwargs: dict = {"host": target.host, "namespace": target.namespace}
    if target.auth == "none":
        if not target.host:
            raise FtloopError(
                "--auth none needs --host (a port-forward such as http://localhost:8080, $KF_PIPELINES_ENDPOINT "
                "or cluster.kfp_host); to go through your kubeconfig use --auth kubeconfig"
            )
    elif target.auth == "kubeconfig":
        if target.host:
            raise FtloopError("--auth kubeconfig reaches KFP through the Kubernetes API server's service proxy; drop --host")
        kube = kube_credentials(target.kubeconfig, target.kube_context, target.kfp_namespace)
        kwargs.update(host=kube.host, existing_token=kube.token, ssl_ca_cert=kube.ssl_ca_cert, verify_ssl=kube.verify_ssl)
        client_cert = kube.client_cert
    elif target.auth == "in-cluster":
        kwargs["host"] = target.host or in_cluster_host(target.kfp_namespace)
        path = target.token_path or os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", DEFAULT_TOKEN_PATH)
        if not Path(path).is_file():
            raise FtloopError(
                f"--auth in-cluster: no service-account token at {path} (mount a projected token with audience pipelines.kubeflow.org)"
            )
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=path)
    elif target.auth == "iap":
        if not target.iap_client_id:
            raise FtloopError("--auth iap needs --iap-client-id (the OAuth client id of the IAP-protected KFP endpoint)")
        if not target.host:
            raise FtloopError("--auth iap needs --host (the IAP-protected KFP URL)")
        kwargs["existing_token"] = _iap_token(target.iap_client_id)
    _check_host(kwargs["host"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client = _call(lambda: _Client(**kwargs), kwargs["host"])
    _call(client.get_kfp_healthz, client._existing_config.host)
    return client


def _call(fn, where: str):
    """Run a kfp API call, turning server and network failures into one-line user errors."""
    import kfp_server_api
    import urllib3

    try:
        return fn()
    except kfp_server_api.ApiException as exc:
        detail = (exc.body or "").strip().replace("\n", " ")[:300] if isinstance(exc.body, str) else ""
        raise FtloopError(
            f"{where}: KFP API answered HTTP {exc.status} {exc.reason or ''}".rstrip() + (f": {detail}" if detail else "")
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FtloopError(f"{where}: cannot reach the KFP API: {reason}") from None
    except (ValueError, TypeError) as exc:
        # kfp's own argument checks (e.g. a host it cannot parse).
        raise FtloopError(f"{where}: {exc}") from None


def source_uri_for(config: RunConfig, override: str | None) -> str:
    uri = remote_source(config, override)
    if uri is None:
        uri = config.data.source_path
        key = "data.articles" if config.data.articles else "data.questions"
        raise FtloopError(
            f"{key}: '{uri}' is a local path; a cluster run reads its data from object storage "
            "(set a gs:// URI in the config or pass --source-uri gs://BUCKET/articles.jsonl)"
        )
    return uri


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` flags -> ``{KEY: VALUE}``; only the per-run keys (``RUNTIME_FIELDS``) may be set."""
    values: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise FtloopError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
        kind = config_key_kind(key)
        if kind == "compile-time":
            raise FtloopError(
                f"--set {key}: is fixed when the pipeline is compiled (it shapes the graph or is built "
                f"into its tasks); change it in the run config and compile again. Per-run keys: "
                f"{', '.join(RUNTIME_FIELDS)}"
            )
        if kind is None:
            raise FtloopError(f"--set {key}: no such run config key; per-run keys: {', '.join(RUNTIME_FIELDS)}")
        values[key] = value
    return values


def check_arguments(package: Path, config: RunConfig, arguments: dict) -> None:
    """Refuse a run whose arguments disagree with the compiled pipeline: every argument must be one of its
    parameters, and every task's embedded settings (its config slice) must be what ``config`` gives."""
    import yaml

    spec = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    declared = spec["root"]["inputDefinitions"]["parameters"]
    unknown = sorted(set(arguments) - set(declared))
    if unknown:
        raise FtloopError(f"{package}: the compiled pipeline has no parameter {', '.join(unknown)}; compile it again")
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    for dag in dags:
        for name, task in dag["tasks"].items():
            constant = task.get("inputs", {}).get("parameters", {}).get("config_slice", {}).get("runtimeValue", {}).get("constant")
            if constant is None:
                continue
            stage = json.loads(constant)["stage"]
            if constant != config.slice(stage):
                raise FtloopError(
                    f"{package}: task {name} was compiled from other settings than the run's config "
                    f"(its {stage} slice differs); compile the pipeline again from this config"
                )


def _prepare(
    config: RunConfig, images: dict[str, str] | None, source_uri: str | None, workdir: str, sets: dict[str, str] | None = None
) -> tuple[RunConfig, Path, dict]:
    uri = source_uri_for(config, source_uri)
    config = with_source(with_images(config, images), uri)  # the data the run reads (compare_models records it)
    package = compile_pipeline(config, Path(workdir) / "pipeline.yaml")
    run_config = with_runtime_values(config, sets) if sets else config
    check_cluster_config(run_config)  # e.g. --set model.name_or_path=builtin:... is refused as at compile time
    arguments = {"source_uri": uri, **run_config.runtime_values()}  # every run parameter, so the run records them
    check_arguments(package, run_config, arguments)
    return run_config, package, arguments


def content_run_name(config: RunConfig, arguments: dict) -> str:
    """``NAME-<10 hex>``: the same resolved config (images and compile-time settings included) and the same run
    parameters (data URI included) always give the same run name."""
    identity = {"config": json.loads(config.to_json()), "arguments": arguments}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.name}-{digest}"


def _existing_run(client, experiment_id: str, run_name: str, where: str) -> str | None:
    predicate = {"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": run_name}]}
    response = _call(lambda: client.list_runs(experiment_id=experiment_id, page_size=1, filter=json.dumps(predicate)), where)
    runs = response.runs or []
    return runs[0].run_id if runs else None


def submit_run(
    config: RunConfig,
    target: Target,
    run_name: str | None = None,
    images: dict[str, str] | None = None,
    source_uri: str | None = None,
    skip_existing: bool = False,
    sets: dict[str, str] | None = None,
) -> dict:
    """Compile the config's cluster pipeline and start one run; returns ids for the caller to print.

    With ``skip_existing`` the run is named after the resolved config (unless ``run_name`` is
    given) and nothing is submitted when the experiment already has a run of that name: a
    GitOps re-sync of an unchanged config starts no second run. ``sets`` (``--set``) override the
    run parameters of this run only.
    """
    with tempfile.TemporaryDirectory(prefix="ftloop-submit-") as workdir:
        config, package, arguments = _prepare(config, images, source_uri, workdir, sets)
        name = run_name or (content_run_name(config, arguments) if skip_existing else config.name)
        client = make_client(target)
        where = client._existing_config.host
        experiment = _call(lambda: client.create_experiment(name=target.experiment, namespace=target.namespace), where)
        if skip_existing:
            existing = _existing_run(client, experiment.experiment_id, name, where)
            if existing:
                return {"run_id": existing, "experiment_id": experiment.experiment_id, "run_name": name, "skipped": True}
        result = _call(
            lambda: client.create_run_from_pipeline_package(
                str(package),
                arguments=arguments,
                run_name=name,
                experiment_id=experiment.experiment_id,
                namespace=target.namespace,
                pipeline_root=config.cluster.pipeline_root,
                service_account=target.service_account,
            ),
            where,
        )
    return {"run_id": result.run_id, "experiment_id": experiment.experiment_id, "run_name": name, "skipped": False}


# KFP recurring runs use robfig/cron with a leading seconds field: "sec min hour dom month dow".
_CRON_FIELDS = (("seconds", 0, 59), ("minutes", 0, 59), ("hours", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))
_NAMES = {
    "month": "jan feb mar apr may jun jul aug sep oct nov dec".split(),
    "day of week": "sun mon tue wed thu fri sat".split(),
}
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}


def _cron_value(text: str, field: str, low: int, high: int, expr: str) -> None:
    names = _NAMES.get(field, [])
    if text.lower() in names:
        return
    if not text.isdigit() or not low <= int(text) <= high:
        raise FtloopError(f"--cron '{expr}': {field} value '{text}' is not in {low}-{high}")


def check_cron(expr: str) -> str:
    """Validate a 6-field KFP cron expression (seconds first) or a descriptor such as @daily / @every 6h."""
    expr = expr.strip()
    if expr in _DESCRIPTORS:
        return expr
    if expr.startswith("@every "):
        if not re.fullmatch(r"@every (\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+", expr):
            raise FtloopError(f"--cron '{expr}': '@every' needs a Go duration such as 6h or 1h30m")
        return expr
    fields = expr.split()
    if len(fields) == 5:
        raise FtloopError(f"--cron '{expr}': KFP cron has 6 fields with seconds first; did you mean '0 {expr}'?")
    if len(fields) != 6:
        raise FtloopError(f"--cron '{expr}': expected 6 fields 'sec min hour day-of-month month day-of-week', got {len(fields)}")
    for text, (field, low, high) in zip(fields, _CRON_FIELDS):
        if text == "?" and field in ("day of month", "day of week"):
            continue
        for part in text.split(","):
            base, slash, step = part.partition("/")
            if slash and (not step.isdigit() or int(step) == 0):
                raise FtloopError(f"--cron '{expr}': {field} step '{step}' must be a positive number")
            if base == "*":
                continue
            start, dash, end = base.partition("-")
            _cron_value(start, field, low, high, expr)
            if dash:
                _cron_value(end, field, low, high, expr)
    return expr


def schedule_run(
    config: RunConfig,
    target: Target,
    cron: str,
    name: str | None = None,
    images: dict[str, str] | None = None,
    source_uri: str | None = None,
    max_concurrency: int = 1,
    catchup: bool = False,
    sets: dict[str, str] | None = None,
) -> dict:
    """Create a recurring run of the config's pipeline on a cron schedule."""
    cron = check_cron(cron)
    if max_concurrency < 1:
        raise FtloopError(f"--max-concurrency {max_concurrency}: must be at least 1")
    with tempfile.TemporaryDirectory(prefix="ftloop-schedule-") as workdir:
        config, package, arguments = _prepare(config, images, source_uri, workdir, sets)
        client = make_client(target)
        where = client._existing_config.host
        experiment = _call(lambda: client.create_experiment(name=target.experiment, namespace=target.namespace), where)
        recurring = _call(
            lambda: client.create_recurring_run(
                experiment_id=experiment.experiment_id,
                job_name=name or f"{config.name}-schedule",
                cron_expression=cron,
                max_concurrency=max_concurrency,
                no_catchup=not catchup,
                params=arguments,
                pipeline_package_path=str(package),
                enabled=True,
                pipeline_root=config.cluster.pipeline_root,
                service_account=target.service_account,
            ),
            where,
        )
    return {"recurring_run_id": recurring.recurring_run_id, "experiment_id": experiment.experiment_id}
