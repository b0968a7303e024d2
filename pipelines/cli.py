"""The ``ftloop`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ftloop import __version__
from ftloop.components.errors import FtloopError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


def _progress(message: str) -> None:
    print(f"[ftloop] {message}", flush=True)


def _print_results(summary: dict, workdir: Path) -> None:
    from ftloop.components.compare import render_text_table

    print()
    print("Models evaluated on the same rows (delta = augmented - base):")
    print(render_text_table(summary))
    print()
    print(f"summary: {workdir / 'summary.json'}")
    print(f"report:  {workdir / 'report.html'} (and report.md)")
    print(f"took {summary['timings']['total_seconds']} s")


def _run(config_path: Path, workdir: Path) -> int:
    from ftloop.components.config import load_config
    from ftloop.pipelines.local import run_local

    config = load_config(config_path)
    summary = run_local(config, workdir, progress=_progress)
    _print_results(summary, workdir.resolve())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not DEMO_CONFIG.exists():
        raise FtloopError(f"{DEMO_CONFIG}: demo config not found; run the demo from a checkout of the ftloop repository")
    return _run(DEMO_CONFIG, Path(args.workdir))


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        raise FtloopError("only local runs are supported by 'ftloop run'; pass --local (cluster runs: compile, then submit)")
    return _run(Path(args.config), Path(args.workdir))


def cmd_compile(args: argparse.Namespace) -> int:
    from ftloop.components.config import load_config
    from ftloop.pipelines.compile import compile_pipeline

    out = compile_pipeline(load_config(args.config), args.output)
    print(f"wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ftloop.components.compare import rerender_reports

    md, page = rerender_reports(args.run_dir)
    print(f"wrote {md} and {page}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from ftloop.components.config import load_config
    from ftloop.components.sources import load_source
    from ftloop.components.tiny_model import build_tiny_model

    config = load_config(args.config)
    examples, labels = load_source(config)
    path = build_tiny_model(args.output, [e.text for e in examples], labels, seed=config.seed)
    print(f"wrote a tiny Phi-3-architecture model to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftloop", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ftloop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="build the tiny model if needed and run the whole loop locally")
    demo.add_argument("--workdir", default="ftloop-demo", help="where results go (default: ./ftloop-demo)")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="run the pipeline for a config")
    run.add_argument("--local", action="store_true", help="run on this machine with KFP's local runner")
    run.add_argument("--config", required=True, help="run config YAML")
    run.add_argument("--workdir", default="ftloop-run", help="where results go (default: ./ftloop-run)")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compile", help="compile the pipeline for a config into KFP YAML")
    comp.add_argument("--config", required=True, help="run config YAML")
    comp.add_argument("--output", required=True, help="pipeline YAML to write")
    comp.set_defaults(func=cmd_compile)

    report = sub.add_parser("report", help="re-render report.md and report.html of a finished run")
    report.add_argument("run_dir", help="work directory of a finished run (holds summary.json)")
    report.set_defaults(func=cmd_report)

    tiny = sub.add_parser("tiny-model", help="build the tiny offline Phi-3-architecture model for a config's data")
    tiny.add_argument("--config", required=True, help="run config YAML (its data trains the tokenizer)")
    tiny.add_argument("--output", required=True, help="directory to write the model to")
    tiny.set_defaults(func=cmd_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FtloopError as exc:
        print(f"ftloop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ftloop: interrupted", file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
