"""The ``hf`` generator on a real model (SmolLM2-135M-Instruct) on CPU: how many of its rows survive the filters?

Two runs of the hf backend (components/generators/hf.py), each followed by exactly the filters the
pipeline applies to that backend's rows:

- **generation** (stage 1, ``prepare_examples``): ``--articles`` WebBizz articles, chosen per label
  with the seed, ``--questions-per-article`` questions each; then ``filters.filter_rows`` with no
  existing splits, as the stage calls it. The pipeline applies no label filter at this stage; the
  label judge's verdict on the accepted rows is reported beside the funnel, for information.
- **rephrasing** (stage 6, ``augment_from_errors``): ``--errors`` misclassified rows of the demo's
  data. The demo's data is what ``configs/demo-smollm2.yaml`` builds (the offline generator's
  questions for all 40 articles, split by ``split_examples``); the errors are the train/dev rows a
  TF-IDF classifier trained on that train split gets wrong (the augment stage mines the fine-tuned
  model's errors; a TF-IDF model's are the cheap stand-in), each passed with the label it was taken
  for as the hint. Then, as the stage does: ``filter_rows`` against all three splits, the TF-IDF
  label filter (``tfidf_judge`` + ``label_consistent`` at ``augment.label_margin``), and the class cap.

The funnel lists, in pipeline order, how many rows each step removed and the share of the rows
reaching it that passed: first ``parse`` (rows asked for but never produced: requests whose reply
never parsed after ``max_attempts``, and lists shorter than asked), then each quality and duplicate
reason of ``filters.REASONS`` (each row counted once, under the first check it fails, exactly as
``filter_rows`` counts it), then the label filter and the class cap for rephrasing. Also rows/s
(rows parsed per second of generation wall time), accepted and rejected examples with the reason
(and the judge's top two labels where it saw the row), every row in the JSON, and how many rows
borrowed a detail from the prompt's worked example (``hf.EXAMPLE_TOPIC_WORDS``; no filter catches those).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/hf_generator.py --articles 16 --questions-per-article 5 --errors 16 --seed 0 --json /tmp/hf_gen.json

The model is ``builtin:smollm2-135m-instruct`` from its local cache (``ftloop fetch-model`` once);
``--model DIR`` runs any other local model directory. The prompts are the hf backend's own
(components/generators/hf.py). Sampling defaults to the settings tuned for SmolLM2 here
(``SMOLLM2_SAMPLING``: temperature 0.7, top-p 0.9, 160 new tokens; the ``generators.hf`` defaults,
0.9 / 0.95 / 256, are meant for Phi-3-mini); ``--temperature``, ``--top-p``, ``--max-new-tokens``,
``--batch-size`` and ``--dtype`` override them. ``--threads`` defaults to 1: on the 2 shared cores
(load average ~6) torch's 2 threads made the same run 6.5x slower (205 s against 31 s, identical rows);
``loading.cpu_threads_for`` pins only models under 50M parameters to one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo-smollm2.yaml"
ARTICLES = REPO / "data" / "webbizz" / "articles.jsonl"
MODEL_REF = "builtin:smollm2-135m-instruct"
SHOWN = 6  # accepted and rejected examples kept per run
SMOLLM2_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 160}

Judge = Callable[[list[str]], list[dict[str, float]]]


# ----------------------------------------------------------------------------- inputs


def pick_articles(articles: list, k: int, seed: int) -> list:
    """``k`` articles, spread over the labels in turn (sorted labels, a seeded order within each)."""
    by_label: dict[str, list] = defaultdict(list)
    for article in sorted(articles, key=lambda a: a.id):
        by_label[article.label].append(article)
    rng = random.Random(f"{seed}:articles")
    for rows in by_label.values():
        rng.shuffle(rows)
    picked, depth = [], 0
    while len(picked) < min(k, len(articles)):
        for label in sorted(by_label):
            if depth < len(by_label[label]) and len(picked) < k:
                picked.append(by_label[label][depth])
        depth += 1
    return picked


def demo_splits(config) -> tuple[dict[str, list], list[str]]:
    """The demo's data: the offline generator's filtered questions for every article, split as stage 2 splits them."""
    from ftloop.components.generators.factory import make_generator
    from ftloop.components.generators.filters import filter_rows
    from ftloop.components.records import load_articles
    from ftloop.components.stages.split_examples import split_examples

    articles = load_articles(str(config.data.articles), config.data.labels)
    labels = sorted({a.label for a in articles})
    generated = make_generator("offline", config).questions(articles, config.generate.questions_per_article)
    examples, _ = filter_rows(generated, {}, labels, config.filters)
    return split_examples(examples, config.split.dev, config.split.test, config.seed), labels


def pick_errors(splits: dict[str, list], judge: Judge, k: int, seed: int) -> tuple[list, dict[str, str]]:
    """``k`` train/dev rows the judge gets wrong (a seeded sample, spread over labels) and, per row, the label it predicted."""
    rows = [e for split in ("train", "dev") for e in splits[split]]
    scores = judge([e.text for e in rows])
    wrong = [(e, max(s, key=s.get)) for e, s in zip(rows, scores) if max(s, key=s.get) != e.label]
    by_label: dict[str, list] = defaultdict(list)
    for e, predicted in wrong:
        by_label[e.label].append((e, predicted))
    rng = random.Random(f"{seed}:errors")
    for group in by_label.values():
        rng.shuffle(group)
    picked, depth = [], 0
    while len(picked) < min(k, len(wrong)):
        for label in sorted(by_label):
            if depth < len(by_label[label]) and len(picked) < k:
                picked.append(by_label[label][depth])
        depth += 1
    return [e for e, _ in picked], {e.id: predicted for e, predicted in picked}


# ----------------------------------------------------------------------------- generation


def generate(call: Callable[[list], list], items: list, generator) -> tuple[list, list, float, dict[str, int]]:
    """``call(items)`` timed; if some request never parses (``GeneratorError``), the rows of the others.

    The generator keeps every completed request in its checkpoint (in memory without a file), so the
    rows of the items that did complete are rebuilt one item at a time with ``max_attempts`` 0: a
    completed item comes back from the checkpoint at no cost, a failed one raises at once.
    Returns (rows, failed items, seconds of generation, the generator's stats after the timed call).
    """
    from ftloop.components.generators.base import GeneratorError

    start = time.perf_counter()
    try:
        rows = call(items)
        return rows, [], time.perf_counter() - start, _stats(generator)
    except GeneratorError:
        seconds = time.perf_counter() - start
    stats = _stats(generator)  # before the rebuild below counts its checkpoint reuses
    attempts, generator.max_attempts = generator.max_attempts, 0
    rows, failed = [], []
    try:
        for item in items:
            try:
                rows.extend(call([item]))
            except GeneratorError:
                failed.append(item)
    finally:
        generator.max_attempts = attempts
    return rows, failed, seconds, stats


def _stats(generator) -> dict[str, int]:
    return dict(getattr(generator, "stats", {}) or {})


# ----------------------------------------------------------------------------- accounting


def filter_reasons(new_rows: list, existing: dict[str, list], labels: list[str], filters_cfg) -> tuple[list, dict[str, int], list]:
    """``filters.filter_rows`` as the pipeline calls it, plus the reason it removed each row (None: kept).

    A row's fate depends only on the rows before it, so its reason is the count that grows when
    ``filter_rows`` is run on the rows up to it instead of the rows before it. Returns
    (kept rows, counts, reason per row); the counts are those of one ``filter_rows`` call over all rows.
    """
    from ftloop.components.generators.filters import filter_rows

    kept, counts = filter_rows(new_rows, existing, labels, filters_cfg)
    reasons: list[str | None] = []
    before = {k: 0 for k in counts}
    for i in range(len(new_rows)):
        _, now = filter_rows(new_rows[: i + 1], existing, labels, filters_cfg)
        grew = [k for k in now if now[k] != before[k]]
        reasons.append(grew[0] if grew else None)
        before = now
    if Counter(r for r in reasons if r) != Counter({k: v for k, v in counts.items() if v}) or reasons.count(None) != len(kept):
        raise AssertionError(f"per-row reasons {Counter(reasons)} disagree with filter_rows' counts {counts}")
    return kept, counts, reasons


def funnel(requested: int, produced: int, filter_counts: dict[str, int], later: Sequence[tuple[str, int]] = ()) -> list[dict[str, Any]]:
    """Each step in pipeline order: rows in, removed, out and the share passed.

    ``parse`` removes the rows asked for but never produced; then each filter reason in
    ``filters.REASONS`` order; then ``later`` (name, removed) steps, e.g. the label filter and cap.
    """
    from ftloop.components.generators.filters import REASONS

    if produced > requested:
        raise ValueError(f"{produced} rows produced but only {requested} asked for")
    steps = [("parse", requested - produced)] + [(reason, filter_counts.get(reason, 0)) for reason in REASONS] + list(later)
    unknown = set(filter_counts) - set(REASONS)
    if unknown:
        raise ValueError(f"filter reasons not in filters.REASONS: {sorted(unknown)}")
    out, rows = [], requested
    for name, removed in steps:
        if removed > rows:
            raise ValueError(f"step {name!r} removed {removed} of only {rows} rows")
        out.append(
            {"step": name, "in": rows, "removed": removed, "out": rows - removed, "passed": (rows - removed) / rows if rows else None}
        )
        rows -= removed
    return out


def examples(
    rows: list, reasons: Sequence[str | None], seed: int, verdict: dict[int, str] | None = None, shown: int = SHOWN
) -> dict[str, list[dict[str, Any]]]:
    """A seeded sample of accepted rows and of rejected rows (each reason in turn), with the reason
    and, where the label filter saw the row, the judge's top two labels (``verdict``, by row position)."""
    verdict = verdict or {}

    def show(i: int) -> dict[str, Any]:
        return {**({"reason": reasons[i]} if reasons[i] else {}), **_show(rows[i]), **({"judge": verdict[i]} if i in verdict else {})}

    rng = random.Random(f"{seed}:examples")
    accepted = [i for i, why in enumerate(reasons) if why is None]
    by_reason: dict[str, list[int]] = defaultdict(list)
    for i, why in enumerate(reasons):
        if why is not None:
            by_reason[why].append(i)
    for group in by_reason.values():
        rng.shuffle(group)
    rejected, depth = [], 0
    while len(rejected) < shown and any(depth < len(g) for g in by_reason.values()):
        for group in by_reason.values():
            if depth < len(group) and len(rejected) < shown:
                rejected.append(show(group[depth]))
        depth += 1
    return {"accepted": [show(i) for i in sorted(rng.sample(accepted, min(shown, len(accepted))))], "rejected": rejected}


def _show(row) -> dict[str, Any]:
    from ftloop.components.generators.filters import normalize_text

    out = {"id": row.id, "label": row.label, "text": normalize_text(row.text)}
    if row.meta.get("confused_with"):
        out["confused_with"] = row.meta["confused_with"]
    return out


def borrowed(rows: list, reasons: Sequence[str | None], source: dict[str, str], words: Sequence[str]) -> dict[str, Any]:
    """Rows holding a word of the prompt's worked example (``words``, matched as lowercase substrings) that
    their own source text (``source``: parent id -> article or parent text) lacks: details copied from the example."""
    hits = []
    for row, why in zip(rows, reasons):
        text, own = row.text.lower(), source.get(row.parent_id, "").lower()
        found = [w for w in words if w in text and w not in own]
        if found:
            hits.append({"id": row.id, "text": row.text, "words": found, "accepted": why is None})
    return {"rows": len(hits), "accepted": sum(h["accepted"] for h in hits), "examples": hits[:SHOWN]}


# ----------------------------------------------------------------------------- the two runs


def run_generation(
    generator,
    articles: list,
    n: int,
    labels: list[str],
    filters_cfg,
    judge: Judge | None,
    margin: float,
    seed: int,
    example_words: Sequence[str] = (),
) -> dict:
    """Stage 1's generation and filters on ``articles``; ``judge`` (optional) reports how many accepted rows it would keep."""
    from ftloop.components.stages.augment_from_errors import label_consistent

    rows, failed, seconds, stats = generate(lambda items: generator.questions(items, n), articles, generator)
    kept, counts, reasons = filter_reasons(rows, {}, labels, filters_cfg)
    verdict: dict[int, str] = {}  # row position -> the judge's top two labels, for the examples
    agrees = None
    if judge is not None and kept:
        scores = judge([e.text for e in kept])
        ok = label_consistent(kept, scores, margin)
        verdict = {i: _verdict(s) for i, s in zip([i for i, why in enumerate(reasons) if why is None], scores)}
        agrees = {"kept": ok.count(True), "of": len(kept), "note": "informational: stage 1 applies no label filter"}
    out = _result(rows, reasons, verdict, len(articles), len(failed), n, seconds, stats, funnel(len(articles) * n, len(rows), counts), seed)
    if agrees:
        out["label_judge_agrees"] = agrees
    out["borrowed_from_example"] = borrowed(rows, reasons, {x.id: f"{x.title or ''} {x.text}" for x in articles}, example_words)
    return out


def run_rephrasing(
    generator,
    parents: list,
    hint: dict[str, str],
    n: int,
    splits: dict[str, list],
    labels: list[str],
    filters_cfg,
    judge: Judge | None,
    margin: float,
    max_per_class: int,
    seed: int,
    example_words: Sequence[str] = (),
) -> dict:
    """Stage 6's rephrasing, filters, label filter (``judge``; None: ``label_filter: none``) and class cap."""
    from ftloop.components.stages.augment_from_errors import cap_per_class, label_consistent

    rows, failed, seconds, stats = generate(lambda items: generator.rephrase(items, n, hint, round=1), parents, generator)
    kept, counts, reasons = filter_reasons(rows, splits, labels, filters_cfg)
    position = [i for i, why in enumerate(reasons) if why is None]  # kept[j] is the normalised rows[position[j]]
    verdict: dict[int, str] = {}  # row position -> the judge's top two labels, for the examples
    inconsistent = 0
    if judge is not None and kept:
        scores = judge([e.text for e in kept])
        ok = label_consistent(kept, scores, margin)
        inconsistent = ok.count(False)
        for j, good in enumerate(ok):
            verdict[position[j]] = _verdict(scores[j])
            if not good:
                reasons[position[j]] = "label_inconsistent"
        position = [p for p, good in zip(position, ok) if good]
        kept = [e for e, good in zip(kept, ok) if good]
    capped_rows, capped = cap_per_class(kept, max_per_class)
    survivors = {id(e) for e in capped_rows}
    for p, row in zip(position, kept):
        if id(row) not in survivors:
            reasons[p] = "class_cap"
    steps = funnel(len(parents) * n, len(rows), counts, [("label_inconsistent", inconsistent), ("class_cap", capped)])
    out = _result(rows, reasons, verdict, len(parents), len(failed), n, seconds, stats, steps, seed)
    out["borrowed_from_example"] = borrowed(rows, reasons, {x.id: x.text for x in parents}, example_words)
    return out


def _result(rows, reasons, verdict, requests, failed, n, seconds, stats, steps, seed) -> dict[str, Any]:
    return {
        "requests": requests,
        "requests_failed": failed,
        "requested_rows": requests * n,
        "produced_rows": len(rows),
        "accepted": steps[-1]["out"],
        "seconds": seconds,
        "rows_per_second": len(rows) / seconds if seconds else None,
        "funnel": steps,
        "examples": examples(rows, reasons, seed, verdict),
        "rows": [
            {**_show(r), "reason": why, **({"judge": verdict[i]} if i in verdict else {})} for i, (r, why) in enumerate(zip(rows, reasons))
        ],
        "generator_stats": stats,
    }


def _verdict(scores: dict[str, float]) -> str:
    top = sorted(scores.items(), key=lambda kv: -kv[1])[:2]
    return ", ".join(f"{label} {p:.2f}" for label, p in top)


# ----------------------------------------------------------------------------- report


def print_run(title: str, result: dict) -> None:
    print(
        f"\n{title}: {result['requests']} requests ({result['requests_failed']} never parsed), "
        f"{result['produced_rows']} of {result['requested_rows']} rows produced, {result['accepted']} accepted "
        f"({result['accepted'] / max(result['requested_rows'], 1):.0%} of asked, "
        f"{result['accepted'] / result['produced_rows'] if result['produced_rows'] else 0:.0%} of produced); "
        f"{result['seconds']:.1f} s, {result['rows_per_second'] or 0:.2f} rows/s; generator {result['generator_stats']}"
    )
    print(f"  {'step':<34}{'in':>6}{'removed':>9}{'passed':>9}")
    for step in result["funnel"]:
        if step["removed"] or step["step"] in ("parse", "label_inconsistent", "class_cap"):
            passed = f"{step['passed']:.0%}" if step["passed"] is not None else "-"
            print(f"  {step['step']:<34}{step['in']:>6}{step['removed']:>9}{passed:>9}")
    print(f"  {'accepted':<34}{result['funnel'][-1]['out']:>6}")
    if "label_judge_agrees" in result:
        j = result["label_judge_agrees"]
        print(f"  (label judge would keep {j['kept']} of {j['of']} accepted; {j['note']})")
    b = result.get("borrowed_from_example")
    if b and b["rows"]:
        print(f"  ({b['rows']} rows borrow a detail from the prompt's worked example, {b['accepted']} of them accepted)")
    for row in result["examples"]["accepted"]:
        print(f"  + [{row['label']}] {row['text']}" + (f"  (judge: {row['judge']})" if "judge" in row else ""))
    for row in result["examples"]["rejected"]:
        print(f"  - {row['reason']}: [{row['label']}] {row['text']}" + (f"  (judge: {row['judge']})" if "judge" in row else ""))


def resolve_model(model: str) -> str:
    if model.startswith("builtin:"):
        from ftloop.components.modeling.builtin import ensure_builtin_model

        return str(ensure_builtin_model(model))
    return str(Path(model).resolve())


def bench_config(seed: int, model_dir: str, hf: dict[str, Any]):
    from ftloop.components.config import load_config

    config = load_config(DEMO_CONFIG)
    generators = config.generators.model_copy(
        update={
            "hf": config.generators.hf.model_validate(
                {**config.generators.hf.model_dump(), "name_or_path": model_dir, "revision": None, **hf}
            )
        }
    )
    return config.model_copy(update={"seed": seed, "generators": generators})


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=16, help="articles to generate from, spread over the labels (0: skip generation)")
    parser.add_argument("--questions-per-article", type=int, default=5)
    parser.add_argument("--errors", type=int, default=16, help="misclassified rows to rephrase (0: skip rephrasing)")
    parser.add_argument("--rephrasings", type=int, default=None, help="per error (default: augment.rephrasings_per_error)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=MODEL_REF, help="builtin: ref or local model directory")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None)
    parser.add_argument("--temperature", type=float, default=SMOLLM2_SAMPLING["temperature"])
    parser.add_argument("--top-p", type=float, default=SMOLLM2_SAMPLING["top_p"])
    parser.add_argument("--max-new-tokens", type=int, default=SMOLLM2_SAMPLING["max_new_tokens"])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = parser.parse_args(argv)

    from ftloop.components.generators.factory import make_generator
    from ftloop.components.generators.hf import EXAMPLE_TOPIC_WORDS
    from ftloop.components.records import load_articles
    from ftloop.components.stages.augment_from_errors import tfidf_judge

    overrides = {
        k: v
        for k, v in {
            "dtype": args.dtype,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
        }.items()
        if v is not None
    }
    model_dir = resolve_model(args.model)
    config = bench_config(args.seed, model_dir, overrides)
    splits, labels = demo_splits(config)
    judge = tfidf_judge(splits, labels, config.seed)
    a = config.augment
    result: dict[str, Any] = {
        "model": args.model,
        "model_dir": model_dir,
        "seed": args.seed,
        "settings": config.generators.hf.model_dump(exclude={"name_or_path", "revision"}),
        "filters": config.filters.model_dump(),
        "label_filter": {"judge": "tfidf (train split of the demo data)", "margin": a.label_margin, "max_per_class": a.max_per_class},
        "demo_splits": {k: len(v) for k, v in splits.items()},
    }
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result["torch_threads"] = torch.get_num_threads()
    generator = make_generator("hf", config)
    words = EXAMPLE_TOPIC_WORDS
    if args.articles:
        articles = pick_articles(load_articles(str(ARTICLES)), args.articles, args.seed)
        result["generation"] = run_generation(
            generator, articles, args.questions_per_article, labels, config.filters, judge, a.label_margin, args.seed, words
        )
        result["generation"]["articles"] = [x.id for x in articles]
        print_run("generation", result["generation"])
    if args.errors:
        parents, hint = pick_errors(splits, judge, args.errors, args.seed)
        n = args.rephrasings or a.rephrasings_per_error
        generator.stats.clear()  # the same loaded model; its counts start again
        result["rephrasing"] = run_rephrasing(
            generator, parents, hint, n, splits, labels, config.filters, judge, a.label_margin, a.max_per_class, args.seed, words
        )
        result["rephrasing"]["errors"] = [{"id": e.id, "text": e.text, "label": e.label, "confused_with": hint[e.id]} for e in parents]
        print_run("rephrasing", result["rephrasing"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
