"""Submit a run, or a recurring run, of a config's pipeline to Kubeflow Pipelines with ``kfp.Client``.

Authentication (``--auth``):

* ``in-cluster``: the projected service-account token at ``KF_PIPELINES_SA_TOKEN_PATH``
  (default ``/var/run/secrets/kubeflow/pipelines/token``, audience ``pipelines.kubeflow.org``);
  host defaults to the in-cluster API service. This is what the GitOps hook Job uses.
* ``iap``: an OIDC ID token for the IAP OAuth client id, fetched with google-auth from the
  application default credentials (a service account or Workload Identity).
* ``none``: no token; with ``--host`` a port-forward or an open endpoint, without it the
  current kubeconfig context (kfp.Client's own API-server proxy).

Every failure a user can cause (bad host, server down, HTTP error, bad cron) is an
``FtloopError``: one line, exit 2, no traceback. Secrets never become run parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from ftloop.pipelines.compile import REMOTE_SCHEMES, compile_pipeline, with_images

IN_CLUSTER_HOST = "http://ml-pipeline.kubeflow.svc.cluster.local:8888"
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
AUTH_MODES = ("none", "in-cluster", "iap")


@dataclass(frozen=True)
class Target:
    """Where and as whom to submit."""

    host: str | None
    namespace: str
    experiment: str
    auth: str = "none"
    iap_client_id: str | None = None
    token_path: str | None = None
    service_account: str | None = None


def _check_host(host: str) -> None:
    parsed = urlparse(host)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise FtloopError(f"--host '{host}': expected an http(s) URL such as https://kfp.example.com or http://localhost:8080")


def _iap_token(client_id: str) -> str:
    try:
        import google.auth.exceptions
        import google.auth.transport.requests
        import google.oauth2.id_token
    except ImportError:
        raise FtloopError("--auth iap needs google-auth (pip install google-auth)") from None
    try:
        return google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), client_id)
    except google.auth.exceptions.GoogleAuthError as exc:
        raise FtloopError(f"--auth iap: cannot get an ID token for client id '{client_id}': {exc}") from None


def make_client(target: Target):
    """A ``kfp.Client`` for ``target``; fails fast (one health check, no 25 s retry loop) with a clear error."""
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    class _Client(kfp.Client):
        # kfp.Client.__init__ may call get_kfp_healthz, which retries 5 times 5 s apart on any
        # HTTP error; one attempt is enough to tell a wrong host from a working one.
        def get_kfp_healthz(self, sleep_duration: int = 5):
            return self._healthz_api.healthz_service_get_healthz()

    if target.auth not in AUTH_MODES:
        raise FtloopError(f"--auth '{target.auth}': expected one of {', '.join(AUTH_MODES)}")
    kwargs: dict = {"host": target.host, "namespace": target.namespace}
    if target.auth == "in-cluster":
        kwargs["host"] = target.host or IN_CLUSTER_HOST
        path = target.token_path or os.environ.get("KF_PIPELINES_SA_TOKEN_PATH", DEFAULT_TOKEN_PATH)
        if not Path(path).is_file():
            raise FtloopError(f"--auth in-cluster: no service-account token at {path} (mount a projected token with audience pipelines.kubeflow.org)")
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(path=path)
    elif target.auth == "iap":
        if not target.iap_client_id:
            raise FtloopError("--auth iap needs --iap-client-id (the OAuth client id of the IAP-protected KFP endpoint)")
        if not target.host:
            raise FtloopError("--auth iap needs --host (the IAP-protected KFP URL)")
        kwargs["existing_token"] = _iap_token(target.iap_client_id)
    if kwargs["host"]:
        _check_host(kwargs["host"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        client = _call(lambda: _Client(**kwargs), kwargs["host"] or "the kubeconfig cluster")
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
        raise FtloopError(f"{where}: KFP API answered HTTP {exc.status} {exc.reason or ''}".rstrip() + (f": {detail}" if detail else "")) from None
    except urllib3.exceptions.HTTPError as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FtloopError(f"{where}: cannot reach the KFP API: {reason}") from None
    except (ValueError, TypeError) as exc:
        # kfp's own argument checks (e.g. a host it cannot parse).
        raise FtloopError(f"{where}: {exc}") from None


def source_uri_for(config: RunConfig, override: str | None) -> str:
    uri = override or config.data.source_path
    if not uri.startswith(REMOTE_SCHEMES):
        key = "data.articles" if config.data.articles else "data.questions"
        raise FtloopError(
            f"{key}: '{uri}' is a local path; a cluster run reads its data from object storage "
            "(set a gs:// URI in the config or pass --source-uri gs://BUCKET/articles.jsonl)"
        )
    return uri


def _prepare(config: RunConfig, images: dict[str, str] | None, source_uri: str | None, workdir: str) -> tuple[RunConfig, Path, dict]:
    config = with_images(config, images)
    package = compile_pipeline(config, Path(workdir) / "pipeline.yaml")
    arguments = {"run_config": config.to_json(), "source_uri": source_uri_for(config, source_uri)}
    return config, package, arguments


def content_run_name(config: RunConfig, arguments: dict) -> str:
    """``NAME-<10 hex>``: the same resolved config and data URI always give the same run name."""
    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:10]
    return f"{config.name}-{digest}"


def _existing_run(client, experiment_id: str, run_name: str, where: str) -> str | None:
    predicate = {"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": run_name}]}
    response = _call(lambda: client.list_runs(experiment_id=experiment_id, page_size=1, filter=json.dumps(predicate)), where)
    runs = response.runs or []
    return runs[0].run_id if runs else None


def submit_run(config: RunConfig, target: Target, run_name: str | None = None,
               images: dict[str, str] | None = None, source_uri: str | None = None,
               skip_existing: bool = False) -> dict:
    """Compile the config's cluster pipeline and start one run; returns ids for the caller to print.

    With ``skip_existing`` the run is named after the resolved config (unless ``run_name`` is
    given) and nothing is submitted when the experiment already has a run of that name: a
    GitOps re-sync of an unchanged config starts no second run.
    """
    with tempfile.TemporaryDirectory(prefix="ftloop-submit-") as workdir:
        config, package, arguments = _prepare(config, images, source_uri, workdir)
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
                str(package), arguments=arguments, run_name=name,
                experiment_id=experiment.experiment_id, namespace=target.namespace,
                pipeline_root=config.cluster.pipeline_root, service_account=target.service_account,
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


def schedule_run(config: RunConfig, target: Target, cron: str, name: str | None = None,
                 images: dict[str, str] | None = None, source_uri: str | None = None,
                 max_concurrency: int = 1, catchup: bool = False) -> dict:
    """Create a recurring run of the config's pipeline on a cron schedule."""
    cron = check_cron(cron)
    if max_concurrency < 1:
        raise FtloopError(f"--max-concurrency {max_concurrency}: must be at least 1")
    with tempfile.TemporaryDirectory(prefix="ftloop-schedule-") as workdir:
        config, package, arguments = _prepare(config, images, source_uri, workdir)
        client = make_client(target)
        where = client._existing_config.host
        experiment = _call(lambda: client.create_experiment(name=target.experiment, namespace=target.namespace), where)
        recurring = _call(
            lambda: client.create_recurring_run(
                experiment_id=experiment.experiment_id, job_name=name or f"{config.name}-schedule",
                cron_expression=cron, max_concurrency=max_concurrency, no_catchup=not catchup,
                params=arguments, pipeline_package_path=str(package), enabled=True,
                pipeline_root=config.cluster.pipeline_root, service_account=target.service_account,
            ),
            where,
        )
    return {"recurring_run_id": recurring.recurring_run_id, "experiment_id": experiment.experiment_id}
