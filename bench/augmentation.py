"""Does error-driven augmentation help? The local loop over several seeds, augmentation on vs off.

Each seed runs the whole pipeline once through kfp.local (``pipelines.local.run_local``).
One run trains both arms on the same splits with the same settings: ``base``
(augmentation off) and ``augmented`` (the loop's final model after up to
``--rounds`` rounds, early stopping included: a loop that stops and keeps the
earlier model reports that model). Seeds change the generated questions, the
split, the tiny model's initialisation and the training order.

Reported per seed and pooled: dev and test macro-F1 with 95% bootstrap
intervals (components/evaluation/stats.py), the paired test delta with a bootstrap
interval (rows resampled within each seed), McNemar's p per seed, and what the
loop did (rounds run, rows added, stop reason). Dev is optimistic for the
augmented model (its errors were mined there) unless ``--mine-splits train``;
test is the honest number.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/augmentation.py --seeds 0 1 2 --rounds 2 --json /tmp/aug.json

Runs are sequential (one pipeline at a time); expect a few minutes per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def macro_f1(t: np.ndarray, p: np.ndarray, k: int) -> float:
    tp = np.bincount(t[t == p], minlength=k).astype(float)
    denom = np.bincount(p, minlength=k) + np.bincount(t, minlength=k)
    return float(np.mean(np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)))


def paired_delta_ci(
    runs: list[dict],
    split: str,
    labels: list[str],
    seed: int = 0,
    resamples: int = 2000,
    before: str = "base",
    after: str = "augmented",
) -> dict:
    """Mean over seeds of macro-F1(after) - macro-F1(before), rows resampled within each seed."""
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    arrays = []
    for run in runs:
        base = run["rows"][before][split]
        aug = {r["id"]: r["prediction"] for r in run["rows"][after][split]}
        t = np.array([index[r["label"]] for r in base])
        pb = np.array([index[r["prediction"]] for r in base])
        pa = np.array([index[aug[r["id"]]] for r in base])
        arrays.append((t, pb, pa))
    point = float(np.mean([macro_f1(t, pa, k) - macro_f1(t, pb, k) for t, pb, pa in arrays]))
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        deltas = []
        for t, pb, pa in arrays:
            rows = rng.integers(0, len(t), size=len(t))
            deltas.append(macro_f1(t[rows], pa[rows], k) - macro_f1(t[rows], pb[rows], k))
        draws[i] = np.mean(deltas)
    return {"mean_delta": point, "ci95": [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]}


def parse_mine_splits(text: str) -> list[str]:
    """``--mine-splits train`` / ``train,dev``: checked by the config's own rules (never test, no duplicates)."""
    from pydantic import ValidationError

    from ftloop.components.config import AugmentConfig

    try:
        return list(AugmentConfig(mine_splits=[s.strip() for s in text.split(",")]).mine_splits)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def run_seed(
    config_path: Path,
    seed: int,
    rounds: int,
    label_filter: str | None,
    workdir: Path,
    verbose: bool,
    early_stopping: str | None = None,
    mine_splits: list[str] | None = None,
) -> dict:
    from ftloop.components.config import load_config
    from ftloop.pipelines.local import run_local

    config = load_config(config_path)
    augment = {
        "rounds": rounds,
        **({"label_filter": label_filter} if label_filter else {}),
        **({"mine_splits": mine_splits} if mine_splits else {}),
    }
    update = {"seed": seed, "augment": config.augment.model_copy(update=augment)}
    if early_stopping:
        update["train"] = config.train.model_copy(update={"early_stopping_metric": early_stopping})
    config = config.model_copy(update=update)
    out = workdir / f"seed-{seed}"
    started = time.monotonic()
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        run_local(config, out, progress=lambda _: None)
    return collect_seed(out, seed, round(time.monotonic() - started, 1))


def round_candidates(seed_dir: Path, base_rows: dict[str, list[dict]], labels: list[str]) -> list[dict]:
    """Every round's fine-tuned model, kept by the loop or not: its dev/test macro-F1 and McNemar against the base on test.

    The loop reports only the model it kept, so a round that dev rejected leaves no trace in summary.json; its
    evaluation is still in kfp.local's outputs of the newest run (``evaluate-2`` for round 1, ``evaluate-3`` for
    round 2, ...; ``evaluate`` is the base model's).
    """
    from ftloop.components.evaluation.stats import mcnemar_exact

    runs = sorted((seed_dir / "kfp").glob("*/"), key=lambda d: d.stat().st_mtime)
    if not runs:
        return []
    out = []
    for r in range(1, 10):
        results = runs[-1] / f"evaluate-{r + 1}" / "results"
        if not (results / "predictions" / "test.jsonl").exists():
            break
        rows = {split: read_jsonl(results / "predictions" / f"{split}.jsonl") for split in ("dev", "test")}
        index = {label: i for i, label in enumerate(labels)}
        by_id = {row["id"]: row for row in rows["test"]}
        base_test = base_rows["test"]
        test = mcnemar_exact(
            [row["prediction"] == row["label"] for row in base_test], [by_id[row["id"]]["prediction"] == row["label"] for row in base_test]
        )
        scores = {
            split: macro_f1(
                np.array([index[row["label"]] for row in rows[split]]),
                np.array([index[row["prediction"]] for row in rows[split]]),
                len(labels),
            )
            for split in ("dev", "test")
        }
        out.append({"round": r, "dev_macro_f1": scores["dev"], "test_macro_f1": scores["test"], "mcnemar_test_vs_base": test})
    return out


def collect_seed(out: Path, seed: int, seconds: float | None) -> dict:
    """One finished seed's results, from its work directory (also after the fact: ``--report-only``)."""
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows = {
        model: {split: read_jsonl(out / summary["models"][model][split]["predictions"]) for split in ("dev", "test")}
        for model in ("base", "augmented", "tfidf")
    }
    data = summary["data"]["augmented"]
    return {
        "seed": seed,
        "seconds": seconds,
        "labels": summary["labels"],
        # what the run mined (a summary from before the setting: train and dev, then the only behaviour)
        "mine_splits": summary["config"]["augment"].get("mine_splits", ["train", "dev"]),
        "metrics": {
            model: {
                split: {
                    "macro_f1": summary["models"][model][split]["macro_f1"],
                    "ci95": summary["models"][model][split]["ci95"]["macro_f1"],
                    "n": summary["models"][model][split]["n"],
                }
                for split in ("dev", "test")
            }
            for model in ("base", "augmented", "tfidf")
        },
        "mcnemar_test_p": summary["significance"]["base->augmented"]["test"]["p_value"],
        "rounds": [
            {k: r[k] for k in ("round", "errors_mined", "generated", "added", "removed")} for r in data.get("augmentation_rounds", [])
        ],
        "candidates": round_candidates(out, rows["base"], summary["labels"]),
        "loop_stopped": data.get("loop_stopped"),
        "train_rows": {"base": summary["data"]["base"]["rows"]["train"], "augmented": data["rows"]["train"]},
        "rows": rows,
    }


def pooled_ci(runs: list[dict], model: str, split: str, labels: list[str]) -> dict:
    from ftloop.components.evaluation.stats import bootstrap_ci

    rows = [r for run in runs for r in run["rows"][model][split]]
    y_true, y_pred = [r["label"] for r in rows], [r["prediction"] for r in rows]
    lo, hi = bootstrap_ci(y_true, y_pred, labels, seed=0)["macro_f1"]
    index = {label: i for i, label in enumerate(labels)}
    point = macro_f1(np.array([index[y] for y in y_true]), np.array([index[y] for y in y_pred]), len(labels))
    return {"macro_f1": point, "ci95": [lo, hi], "n": len(rows)}


def report(runs: list[dict], args: argparse.Namespace) -> str:
    labels = runs[0]["labels"]
    recorded = sorted({",".join(run["mine_splits"]) for run in runs if run.get("mine_splits")})
    mined = ",".join(args.mine_splits) if args.mine_splits else " / ".join(recorded) or "as configured"
    fmt = lambda m: f"{m['macro_f1']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"  # noqa: E731
    lines = [
        f"config {args.config}, rounds {args.rounds}, label filter {args.label_filter or 'as configured'}, "
        f"mined splits {mined}, fine-tune early stopping {args.early_stopping or 'as configured'}, seeds {args.seeds}",
        "",
        "| seed | split | base | augmented | TF-IDF | delta | McNemar p (test) | train rows base -> aug | loop |",
        "|---|---|---|---|---|---:|---:|---|---|",
    ]
    for run in runs:
        m = run["metrics"]
        stopped = run["loop_stopped"]
        loop = f"{len(run['rounds'])} round(s) trained" + (
            f"; stopped in round {stopped['round']}: {stopped['decision']}" if stopped else ""
        )
        for split in ("dev", "test"):
            delta = m["augmented"][split]["macro_f1"] - m["base"][split]["macro_f1"]
            p = f"{run['mcnemar_test_p']:.3f}" if split == "test" else ""
            rows = f"{run['train_rows']['base']} -> {run['train_rows']['augmented']}" if split == "dev" else ""
            lines.append(
                f"| {run['seed']} | {split} | {fmt(m['base'][split])} | {fmt(m['augmented'][split])} | "
                f"{fmt(m['tfidf'][split])} | {delta:+.3f} | {p} | {rows} | {loop if split == 'dev' else ''} |"
            )
    candidates = [(run["seed"], c, run["metrics"]["base"]) for run in runs for c in run.get("candidates", [])]
    if candidates:
        lines += [
            "",
            "Each round's fine-tuned model, kept or not (the loop keeps a round only if it raises dev):",
            "",
            "| seed | round | dev (base -> round) | test (base -> round) | test delta | McNemar test: fixed / broken, p |",
            "|---|---|---|---|---:|---|",
        ]
        for seed, c, base in candidates:
            m = c["mcnemar_test_vs_base"]
            lines.append(
                f"| {seed} | {c['round']} | {base['dev']['macro_f1']:.3f} -> {c['dev_macro_f1']:.3f} | "
                f"{base['test']['macro_f1']:.3f} -> {c['test_macro_f1']:.3f} | {c['test_macro_f1'] - base['test']['macro_f1']:+.3f} | "
                f"{m['fixed']} / {m['broken']}, {m['p_value']:.3f} |"
            )
    lines += [
        "",
        "Pooled over seeds (rows of all seeds together; bootstrap 95% CI):",
        "",
        "| split | base | augmented | TF-IDF | mean paired delta [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for split in ("dev", "test"):
        d = paired_delta_ci(runs, split, labels)
        lines.append(
            f"| {split} | {fmt(pooled_ci(runs, 'base', split, labels))} | {fmt(pooled_ci(runs, 'augmented', split, labels))} | "
            f"{fmt(pooled_ci(runs, 'tfidf', split, labels))} | {d['mean_delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--rounds", type=int, default=2, help="augment.rounds, 1-5 (0, augmentation off, has no augmented model to compare)"
    )
    parser.add_argument("--label-filter", choices=["tfidf", "model", "none"], default=None)
    parser.add_argument(
        "--mine-splits",
        type=parse_mine_splits,
        default=None,
        metavar="train|train,dev",
        help="override augment.mine_splits: 'train' keeps dev an honest judge of the rounds (its errors are not rephrased into train)",
    )
    parser.add_argument(
        "--early-stopping",
        choices=["dev_macro_f1", "dev_loss", "none"],
        default=None,
        help="override train.early_stopping_metric (e.g. 'none' to train every epoch)",
    )
    parser.add_argument("--workdir", default="/tmp/ftloop-bench-augmentation")
    parser.add_argument("--json", help="write per-seed results (without prediction rows) here")
    parser.add_argument("--verbose", action="store_true", help="show the pipeline's own output")
    parser.add_argument("--report-only", action="store_true", help="run nothing: report the seeds already finished in --workdir")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 5:
        parser.error(f"--rounds {args.rounds}: this bench compares the base model with the augmented one; use 1-5")

    runs = []
    for seed in args.seeds:
        if args.report_only:
            runs.append(collect_seed(Path(args.workdir) / f"seed-{seed}", seed, None))
            continue
        print(f"seed {seed}: running the local pipeline ...", file=sys.stderr, flush=True)
        run = run_seed(
            Path(args.config),
            seed,
            args.rounds,
            args.label_filter,
            Path(args.workdir),
            args.verbose,
            args.early_stopping,
            args.mine_splits,
        )
        print(f"seed {seed}: done in {run['seconds']} s", file=sys.stderr, flush=True)
        runs.append(run)
    text = report(runs, args)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs], "report": text}, indent=2),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
