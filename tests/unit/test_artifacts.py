"""The artifact contracts (components/artifacts.py): paths in one place, models used by writer and reader alike."""

import ast
import json
from pathlib import Path

import pytest

from ftloop.components import artifacts as A
from ftloop.components.errors import FtloopError, InputFileError
from ftloop.components.records import Example, write_json, write_jsonl
from ftloop.components.stages.split_examples import read_splits, write_splits

LABELS = ["payments", "returns", "shipping"]
REPO = Path(__file__).resolve().parents[2]


def splits_of(n=3):
    return {
        split: [Example(f"{split}{i}", f"{split} question {i}", LABELS[i % 3], f"{split}-g{i}", "generated") for i in range(n)]
        for split in ("train", "dev", "test")
    }


def write_eval(path, wrong=(), generate=False):
    """An eval dir written by the evaluating stages' writer; rows whose id is in ``wrong`` are mispredicted."""
    splits = {s: [{**e.to_dict(), "text": e.text} for e in rows] for s, rows in splits_of().items()}
    predicted = {
        s: [LABELS[(LABELS.index(r["label"]) + 1) % 3] if r["id"] in wrong else r["label"] for r in rows] for s, rows in splits.items()
    }
    probs = {s: [{label: 0.8 if label == p else 0.1 for label in LABELS} for p in predicted[s]] for s in splits}
    generated = {s: [{"raw": f"it is {p}", "prediction": p} for p in predicted[s]] for s in splits}
    return A.write_predictions(
        splits,
        probs,
        LABELS,
        path,
        progress=lambda m: None,
        timings={s: {"rows_per_second": 10.0, "mean_batch_seconds": 0.1} for s in splits},
        generated=generated if generate else None,
    )


def error_of(call) -> str:
    with pytest.raises(FtloopError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and "validation error" not in message.lower() and "pydantic" not in message
    return message


# ------------------------------------------------------------------ paths


def test_path_helpers_name_every_artifact(tmp_path):
    assert A.labels_path(tmp_path) == tmp_path / "labels.json"
    assert A.split_path(tmp_path, "dev") == tmp_path / "dev.jsonl"
    assert A.predictions_path(tmp_path, "test") == tmp_path / "predictions" / "test.jsonl"
    assert A.metrics_path(tmp_path) == tmp_path / "metrics.json"
    assert A.model_meta_path(tmp_path) == tmp_path / "ftloop_model.json"
    assert A.merged_dir(tmp_path) == tmp_path / "merged"
    assert A.report_path(tmp_path) == tmp_path / "report.json"
    assert A.summary_path(tmp_path) == tmp_path / "summary.json"
    assert A.examples_path(tmp_path) == tmp_path / "examples.jsonl"
    assert A.bundle_predictions_file("zero-shot", "dev") == "predictions/zero-shot/dev.jsonl"


ARTIFACT_FILES = {
    A.LABELS_FILE,
    A.METRICS_FILE,
    A.REPORT_FILE,
    A.SUMMARY_FILE,
    A.MODEL_META,
    A.EXAMPLES_FILE,
    A.REPORT_MD,
    A.REPORT_HTML,
    A.BASE_MODEL_FILE,
}


def test_artifact_paths_are_built_only_in_artifacts_py():
    """A file name spelled out anywhere else is a second place that must change with it. (The bare directory
    names ``predictions`` and ``merged`` are also dict keys, so only paths through them are looked for.)"""
    sources = [p for p in (REPO / "components").rglob("*.py") if p.name != "artifacts.py"]
    sources += [REPO / "pipelines" / "local.py", REPO / "pipelines" / "cli.py"]
    found = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in ARTIFACT_FILES or node.value.startswith((f"{A.PREDICTIONS_DIR}/", f"{A.MERGED_DIR}/")):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):  # path / "predictions"
                if isinstance(node.right, ast.Constant) and node.right.value in (A.PREDICTIONS_DIR, A.MERGED_DIR):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: / {node.right.value!r}")
    assert found == []


# ------------------------------------------------------------------ labels.json


def test_labels_round_trip_and_malformed(tmp_path):
    A.write_labels(tmp_path, LABELS)
    assert json.loads(A.labels_path(tmp_path).read_text()) == LABELS
    assert A.read_labels(tmp_path) == LABELS
    path = A.labels_path(tmp_path)
    for bad, problem in (
        (["a", 7], "field '[1]': expected a string, got a number"),
        (["a", "b", "a"], "field '[2]': duplicate label 'a'"),
        (["a"], "expected at least 2 distinct label strings, got 1"),
        ({"labels": ["a", "b"]}, "the top level is not a JSON list"),
    ):
        write_json(path, bad)
        assert error_of(lambda: A.read_labels(tmp_path)) == f"{path}: {problem}; not an ftloop labels file"
    with pytest.raises(InputFileError, match="at least 2 distinct"):
        A.write_labels(tmp_path / "w", ["a"])
    assert not (tmp_path / "w" / "labels.json").exists()


def test_a_splits_artifact_may_carry_one_label_but_training_inputs_may_not(tmp_path):
    write_splits(splits_of(), ["returns"], tmp_path)
    assert read_splits(tmp_path)[1] == ["returns"]
    with pytest.raises(InputFileError, match="expected at least 2"):
        A.read_labels(tmp_path)


# ------------------------------------------------------------------ ftloop_model.json


FINETUNE_META = {  # the shape the finetune stage writes (a few of its keys)
    "format": "ftloop-lora-adapter/1",
    "base_model": {"name_or_path": "/models/phi", "revision": None, "dtype": "bfloat16", "quantization": "nf4"},
    "labels": LABELS,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
    "steps": 12,
    "train_loss": 0.5,
    "dev": {"metric": "dev_macro_f1", "best_metric": None, "best_step": None, "history": []},
    "merged": {"path": "merged", "dtype": "bfloat16", "bytes": 123, "from_quantized_base": True},
}


def test_model_meta_round_trip_keeps_the_rich_metadata(tmp_path):
    A.write_model_meta(tmp_path, FINETUNE_META)
    assert json.loads(A.model_meta_path(tmp_path).read_text()) == FINETUNE_META
    meta = A.read_model_meta(tmp_path)
    assert meta.base_model.name_or_path == "/models/phi" and meta.base_model.quantization == "nf4"
    assert meta.labels == LABELS and meta.merged.dtype == "bfloat16"
    assert meta.to_json() == FINETUNE_META  # extra keys kept, nothing filled in
    minimal = A.ModelMeta.model_validate({"base_model": {"name_or_path": "/m"}})
    assert (minimal.base_model.dtype, minimal.base_model.quantization, minimal.base_model.revision) == ("auto", "none", None)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda m: m["base_model"].pop("name_or_path"), "field 'base_model.name_or_path': missing"),
        (lambda m: m.pop("base_model"), "field 'base_model': missing"),
        (lambda m: m.update(labels="returns"), "field 'labels': expected a list, got a string"),
        (lambda m: m["merged"].update(dtype=16), "field 'merged.dtype': expected a string, got a number"),
    ],
)
def test_malformed_model_meta_is_one_located_line(tmp_path, change, problem):
    meta = json.loads(json.dumps(FINETUNE_META))
    change(meta)
    write_json(A.model_meta_path(tmp_path), meta)
    assert error_of(lambda: A.read_model_meta(tmp_path)) == (f"{A.model_meta_path(tmp_path)}: {problem}; not an ftloop model file")


def test_a_directory_without_model_meta_is_a_clear_error(tmp_path):
    assert "not found; is" in error_of(lambda: A.read_model_meta(tmp_path))


# ------------------------------------------------------------------ predictions and metrics.json


@pytest.mark.parametrize("generate", [False, True])
def test_predictions_and_metrics_round_trip(tmp_path, generate):
    returned = write_eval(tmp_path, wrong={"test1"}, generate=generate)
    assert json.loads(A.metrics_path(tmp_path).read_text()) == returned
    metrics = A.read_metrics(tmp_path)
    assert metrics.to_json() == returned
    assert metrics.test.accuracy == pytest.approx(2 / 3) and metrics.split("dev").labels == LABELS
    assert A.read_dev_macro_f1(tmp_path) == 1.0
    rows = A.read_predictions(tmp_path, "test")
    on_disk = [json.loads(line) for line in A.predictions_path(tmp_path, "test").read_text().splitlines()]
    assert [r.to_json() for r in rows] == on_disk
    assert [r.line for r in rows] == [1, 2, 3]
    assert rows[1].id == "test1" and rows[1].correct is False and rows[1].prediction == "shipping"
    assert ("raw" in on_disk[0]) == generate and ("raw" in rows[0].to_json()) == generate


@pytest.mark.parametrize(
    "change, line, problem",
    [
        (lambda rows: rows[1].pop("prediction"), 2, "field 'prediction': missing"),
        (lambda rows: rows[2].update(label=None), 3, "field 'label': expected a string, got null"),
        (lambda rows: rows[0]["scores"].update(returns="0.5"), 1, "field 'scores.returns': expected a number, got a string"),
    ],
)
def test_malformed_predictions_name_the_line_and_field(tmp_path, change, line, problem):
    write_eval(tmp_path)
    path = A.predictions_path(tmp_path, "dev")
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    change(rows)
    write_jsonl(path, rows)
    assert error_of(lambda: A.read_predictions(tmp_path, "dev")) == (f"{path}:{line}: {problem}; not an ftloop predictions file")


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda m: m["dev"].update(macro_f1="0.5"), "field 'dev.macro_f1': expected a number, got a string"),
        (lambda m: m.pop("test"), "field 'test': missing"),
        (lambda m: m["train"]["per_class"]["returns"].pop("f1"), "field 'train.per_class.returns.f1': missing"),
        (
            lambda m: m["test"]["confusion_matrix"][0].__setitem__(1, True),
            "field 'test.confusion_matrix[0][1]': expected an integer, got a boolean",
        ),
    ],
)
def test_malformed_metrics_are_one_located_line(tmp_path, change, problem):
    metrics = write_eval(tmp_path)
    change(metrics)
    write_json(A.metrics_path(tmp_path), metrics)
    assert error_of(lambda: A.read_metrics(tmp_path)) == f"{A.metrics_path(tmp_path)}: {problem}; not an ftloop metrics file"


def test_the_loop_reads_only_dev_macro_f1(tmp_path):
    write_json(A.metrics_path(tmp_path), {"dev": {"macro_f1": 0.25}})
    assert A.read_dev_macro_f1(tmp_path) == 0.25
    write_json(A.metrics_path(tmp_path), {"dev": {"accuracy": 0.25}})
    assert error_of(lambda: A.read_dev_macro_f1(tmp_path)) == (
        f"{A.metrics_path(tmp_path)}: field 'dev.macro_f1': missing; not an ftloop metrics file"
    )


# ------------------------------------------------------------------ report.json of a splits artifact


def test_split_report_round_trip(tmp_path):
    stop = {"round": 2, "decision": "stop-keep-current", "reason": "no rows left"}
    write_splits(splits_of(), LABELS, tmp_path, extra={"seed": 3, "augmentation_rounds": [], "loop_stopped": stop})
    on_disk = json.loads(A.report_path(tmp_path).read_text())
    report = A.read_split_report(tmp_path)
    assert report.to_json() == on_disk
    assert report.rows == {"train": 3, "dev": 3, "test": 3} and report.seed == 3
    assert report.loop_stopped.reason == "no rows left" and report.augmentation_rounds == []
    assert set(on_disk) == {
        "rows",
        "groups",
        "group_overlap",
        "shared_groups",
        "text_overlap",
        "shared_texts",
        "labels",
        "seed",
        "augmentation_rounds",
        "loop_stopped",
    }  # no key made up by a default
    write_splits(splits_of(), LABELS, tmp_path / "plain")
    assert A.read_split_report(tmp_path / "plain").loop_stopped is None


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda r: r.pop("group_overlap"), "field 'group_overlap': missing"),
        (lambda r: r["rows"].update(train="3"), "field 'rows.train': expected an integer, got a string"),
        (lambda r: r.update(loop_stopped={"round": 1}), "field 'loop_stopped.reason': missing"),
        (lambda r: r.update(augmentation_rounds={}), "field 'augmentation_rounds': expected a list, got an object"),
    ],
)
def test_malformed_split_report_is_one_located_line(tmp_path, change, problem):
    write_splits(splits_of(), LABELS, tmp_path)
    report = json.loads(A.report_path(tmp_path).read_text())
    change(report)
    write_json(A.report_path(tmp_path), report)
    assert error_of(lambda: A.read_split_report(tmp_path)) == (f"{A.report_path(tmp_path)}: {problem}; not an ftloop splits report")


# ------------------------------------------------------------------ summary.json: the stages' writers, the readers' models


@pytest.fixture
def bundle(tmp_path):
    """A run bundle written by the real writers: evaluating stages -> split_examples -> compare_models."""
    from ftloop.components.config import RunConfig
    from ftloop.components.stages.compare_models import run as run_compare

    evals = {"base": tmp_path / "base", "augmented": tmp_path / "augmented"}
    write_eval(evals["base"], wrong={"test0", "test1", "dev2"})
    write_eval(evals["augmented"], wrong={"test2"}, generate=True)
    split_dirs = {"base": tmp_path / "base-splits", "augmented": tmp_path / "augmented-splits"}
    write_splits(splits_of(), LABELS, split_dirs["base"], extra={"seed": 0})
    write_splits(
        splits_of(),
        LABELS,
        split_dirs["augmented"],
        extra={
            "seed": 0,
            "augmentation": {
                "round": 1,
                "errors_mined": {"train": 1, "dev": 1},
                "generated": 4,
                "added": 2,
                "removed": {"garbage": 2},
                "confusions": {"returns->shipping": 2},
            },
        },
    )
    config = RunConfig.model_validate({"name": "t", "seed": 0, "data": {"questions": "q.jsonl"}})
    summary = run_compare(config, evals, split_dirs, tmp_path / "bundle", tmp_path / "r.md", tmp_path / "r.html")
    return tmp_path / "bundle", summary, split_dirs


def test_what_the_writers_write_the_readers_accept(bundle):
    out, summary, split_dirs = bundle
    on_disk = json.loads(A.summary_path(out).read_text())
    read = A.read_summary(out)
    assert read.to_json() == on_disk == json.loads(json.dumps(summary))
    assert read.summary_version == A.SUMMARY_VERSION and read.labels == LABELS
    assert read.models["augmented"].test.invalid_rate == 0.0 and read.significance["base->augmented"].test.fixed == 2
    for name, split_dir in split_dirs.items():  # each splits report travels into the summary unchanged
        assert on_disk["data"][name] == json.loads(A.report_path(split_dir).read_text())
    for name, model in read.models.items():  # and so do the prediction files
        for split in ("train", "dev", "test"):
            copied = [json.loads(x) for x in (out / getattr(model, split).predictions).read_text().splitlines()]
            assert copied == [r.to_json() for r in A.read_predictions(out.parent / name, split)]


def test_read_summary_errors_are_one_located_line(bundle):
    out, summary, _ = bundle
    broken = json.loads(json.dumps(summary))
    broken["models"]["base"]["dev"]["accuracy"] = True
    write_json(A.summary_path(out), broken)
    assert error_of(lambda: A.read_summary(out)) == (
        f"{A.summary_path(out)}: field 'models.base.dev.accuracy': expected a number, got a boolean; not an ftloop summary"
    )


def test_local_run_summary_keeps_its_extra_keys(bundle):
    out, _, _ = bundle
    summary = A.read_summary(out).model_copy(update={"timings": {"total_seconds": 1.5}, "artifacts": str(out)})
    A.write_summary(out.parent / "workdir", summary)
    again = A.read_summary(out.parent / "workdir").to_json()
    assert again["timings"] == {"total_seconds": 1.5} and again["artifacts"] == str(out)


def test_a_stage_reading_a_foreign_artifact_fails_with_the_file_and_field(tmp_path):
    """The loop reads the splits report through the same model: a hand-edited one names the file and field."""
    from ftloop.components.config import RunConfig
    from ftloop.components.stages.augment_from_errors import run as run_augment

    write_splits(splits_of(), LABELS, tmp_path / "splits")
    write_eval(tmp_path / "eval")
    report = json.loads(A.report_path(tmp_path / "splits").read_text())
    report["loop_stopped"] = "yes"
    write_json(A.report_path(tmp_path / "splits"), report)
    config = RunConfig.model_validate({"seed": 0, "data": {"questions": "q.jsonl"}})
    assert error_of(lambda: run_augment(config, tmp_path / "splits", tmp_path / "eval", tmp_path / "out", progress=lambda _: None)) == (
        f"{A.report_path(tmp_path / 'splits')}: field 'loop_stopped': expected an object, got a string; not an ftloop splits report"
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ formatted splits (ChatRow)


def write_formatted(path, **change):
    """A formatted dir as format_chat writes it (through ChatRow); ``change`` edits the second dev row."""
    rows = {s: list(A.chat_rows((e.to_dict() for e in examples), LABELS)) for s, examples in splits_of().items()}
    rows["dev"][1].update(change)
    for split, split_rows in rows.items():
        write_jsonl(A.split_path(path, split), split_rows)
    return rows


def test_chat_rows_are_what_read_split_reads(tmp_path):
    written = write_formatted(tmp_path)
    read = A.read_split(tmp_path, "dev", LABELS)
    assert [{k: v for k, v in r.items() if k != "__line__"} for r in read] == written["dev"]
    assert set(written["dev"][0]) == {"id", "text", "label", "group", "origin", "prompt", "completion"}
    assert written["dev"][0]["completion"] == [{"role": "assistant", "content": written["dev"][0]["label"]}]


@pytest.mark.parametrize(
    "change,problem",
    [
        ({"prompt": []}, "'prompt' must be a non-empty list of chat messages"),
        ({"prompt": [{"role": "user"}]}, "'prompt' must be a non-empty list of chat messages"),
        ({"completion": [{"role": "user", "content": "returns"}]}, "'completion' must be a list with one assistant message"),
        ({"completion": []}, "'completion' must be a list with one assistant message"),
        ({"label": "shipping"}, "label 'shipping' is not in labels.json or differs from the completion"),
        ({"id": 7}, "field 'id': expected a string, got a number; not an ftloop formatted split"),
        ({"origin": "typed"}, "field 'origin': input should be 'generated', 'rephrased' or 'imported'; not an ftloop formatted split"),
    ],
)
def test_read_split_names_the_line_of_a_bad_row(tmp_path, change, problem):
    write_formatted(tmp_path, **change)
    assert error_of(lambda: A.read_split(tmp_path, "dev", LABELS)) == f"{A.split_path(tmp_path, 'dev')}:2: {problem}"


def test_read_split_rejects_a_label_outside_labels_json(tmp_path):
    write_formatted(tmp_path)
    message = error_of(lambda: A.read_split(tmp_path, "dev", LABELS[:2]))
    assert message == f"{A.split_path(tmp_path, 'dev')}:3: label 'shipping' is not in labels.json or differs from the completion"
