"""The whole pipeline through kfp.local with the tiny model, via the real CLI."""

import json
import re
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, f1_score

from tests.fixtures.cli import run_local_cli
from tests.fixtures.data import corpus_subset, write_config, write_lines

pytestmark = pytest.mark.slow
SPLITS = ("train", "dev", "test")
PHI3_LINEAR = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    articles = write_lines(tmp / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    config = write_config(
        tmp / "run.yaml",
        articles,
        generate={"questions_per_article": 5},
        split={"train": 0.5, "dev": 0.25, "test": 0.25},
        model={"name_or_path": "builtin:tiny-phi3", "dtype": "float32"},
        train={"epochs": 2, "learning_rate": 0.002, "batch_size": 8, "max_length": 96, "logging_steps": 2},
        augment={"rephrasings_per_error": 2, "rounds": 2},
    )
    workdir = tmp / "out"
    result = run_local_cli(config, workdir)
    return workdir, result.stdout + result.stderr


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_summary_has_both_models_and_baselines_on_every_split(run):
    workdir, _ = run
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["models"]) == {"base", "augmented", "tfidf", "zero-shot"}
    for model in summary["models"].values():
        for split in SPLITS:
            entry = model[split]
            assert isinstance(entry["accuracy"], float) and isinstance(entry["macro_f1"], float)
            assert isinstance(entry["weighted_f1"], float) and isinstance(entry["n"], int)
            rows = read_jsonl(workdir / entry["predictions"])
            assert len(rows) == entry["n"] > 0
            assert {"id", "text", "label", "prediction", "group"} <= set(rows[0])
    assert summary["seed"] == 7 and summary["config"]["name"] == "test-run"
    for pair in ("base->augmented", "tfidf->base", "zero-shot->base"):
        test = summary["significance"][pair]["test"]
        assert 0.0 <= test["p_value"] <= 1.0
        assert len(summary["significance"][pair]["test_flips"]) == test["fixed"] + test["broken"]
    base_test = summary["models"]["base"]["test"]
    assert 0.0 <= base_test["ece"] <= 1.0 and base_test["invalid_rate"] == 0.0 and base_test["rows_per_second"] > 0
    lo, hi = summary["models"]["base"]["test"]["ci95"]["macro_f1"]
    assert lo <= summary["models"]["base"]["test"]["macro_f1"] <= hi
    assert (workdir / "report.md").read_text().count("macro\\_f1") == 3  # Markdown-escaped
    assert "<table" in (workdir / "report.html").read_text()
    # which base model ran: the tiny model built for this run, its weights hashed (components/modeling/provenance.py)
    base_model = summary["base_model"]
    assert base_model["source"] == "tiny" and base_model["name_or_path"] == str(workdir / "models" / "tiny-phi3")
    assert re.fullmatch(r"[0-9a-f]{64}", base_model["weights_sha256"])
    for name in ("base", "augmented", "zero-shot"):  # the fine-tuned models and the prompted one share that base
        assert summary["models"][name]["base_model"] == base_model, name
    assert summary["models"]["tfidf"]["base_model"] == {"source": "tfidf"}
    assert f"Base model: tiny random-init test model at {workdir}" in (workdir / "report.md").read_text().replace("\\", "")
    assert 'id="base-model"' in (workdir / "report.html").read_text()


def test_summary_metrics_equal_sklearn_on_the_prediction_files(run):
    workdir, _ = run
    summary = json.loads((workdir / "summary.json").read_text())
    for name, model in summary["models"].items():
        for split in SPLITS:
            rows = read_jsonl(workdir / model[split]["predictions"])
            y_true = [r["label"] for r in rows]
            y_pred = [r["prediction"] for r in rows]
            assert model[split]["accuracy"] == accuracy_score(y_true, y_pred), (name, split)
            assert model[split]["macro_f1"] == f1_score(y_true, y_pred, average="macro", labels=summary["labels"], zero_division=0)
            assert model[split]["weighted_f1"] == f1_score(y_true, y_pred, average="weighted", labels=summary["labels"], zero_division=0)


def test_no_test_group_appears_in_train_or_dev(run):
    workdir, _ = run
    summary = json.loads((workdir / "summary.json").read_text())
    for model in summary["models"].values():
        groups = {s: {r["group"] for r in read_jsonl(workdir / model[s]["predictions"])} for s in SPLITS}
        assert not groups["test"] & (groups["train"] | groups["dev"])
    # The augmented train split that the second model trained on is clean too.
    augmented_report = summary["data"]["augmented"]
    assert augmented_report["group_overlap"]["train-test"] == 0
    assert augmented_report["group_overlap"]["dev-test"] == 0


def test_adapters_cover_all_four_phi3_linear_types(run):
    workdir, _ = run
    configs = list((workdir / "kfp").rglob("adapter_config.json"))
    assert len(configs) >= 2  # base, each trained round, and a kept model passed on when the loop stops
    for path in configs:
        assert set(json.loads(path.read_text())["target_modules"]) == PHI3_LINEAR


def test_progress_shows_stages_and_training(run):
    _, output = run
    for stage in ("prepare-examples", "split-examples", "format-chat", "finetune", "evaluate", "augment-from-errors", "compare-models"):
        assert stage in output
    assert "loss" in output and "step" in output
    assert "delta = augmented - base" in output


def executor_output(run_root: Path, task: str) -> dict:
    return json.loads((run_root / task / "executor_output.json").read_text())


# The scalars every model-evaluating task logs, per split, as <split>_<metric> (README "What the KFP UI shows").
EVALUATION_SCALARS = (
    "accuracy",
    "macro_f1",
    "weighted_f1",
    "macro_precision",
    "macro_recall",
    "ece",
    "invalid_rate",
    "rows_per_second",
    "mean_batch_seconds",
)
# Model-evaluating task -> its model in summary.json (evaluate-N of a later round is "augmented" only if it was kept).
EVALUATING_TASKS = {"evaluate": "base", "tfidf-baseline": "tfidf", "evaluate-zero-shot": "zero-shot"}


def output_metadata(run_root: Path, task: str, output: str) -> dict:
    return executor_output(run_root, task)["artifacts"][output]["artifacts"][0]["metadata"]


def test_every_evaluating_task_logs_the_same_scalars_and_a_test_confusion_matrix(run):
    workdir, _ = run
    (run_root,) = [p for p in (workdir / "kfp").iterdir() if not p.name.startswith(".")]  # .kfp_cache aside
    summary = json.loads((workdir / "summary.json").read_text())
    round_evaluations = sorted(p.name for p in run_root.iterdir() if p.name.startswith("evaluate-") and p.name[9:].isdigit())
    assert round_evaluations, "round 1 trained no model: no evaluate-N task to check"
    expected = {f"{split}_{metric}" for split in SPLITS for metric in EVALUATION_SCALARS}
    for task in [*EVALUATING_TASKS, *round_evaluations]:
        scalars = output_metadata(run_root, task, "metrics")
        assert set(scalars) == expected, task
        assert scalars["test_rows_per_second"] > 0 and scalars["test_mean_batch_seconds"] > 0, task
        matrix = output_metadata(run_root, task, "confusion_matrix")["confusionMatrix"]
        assert [a["displayName"] for a in matrix["annotationSpecs"]] == summary["labels"], task
        # every test row is counted once, except invalid generate-mode outputs (in no column)
        test_rows = summary["models"]["base"]["test"]["n"]
        assert sum(sum(r["row"]) for r in matrix["rows"]) == round(test_rows * (1 - scalars["test_invalid_rate"])), task
    for task, model in EVALUATING_TASKS.items():
        scalars = output_metadata(run_root, task, "metrics")
        for split in SPLITS:
            for metric in EVALUATION_SCALARS:
                assert scalars[f"{split}_{metric}"] == summary["models"][model][split][metric], (task, split, metric)
        matrix = output_metadata(run_root, task, "confusion_matrix")["confusionMatrix"]
        assert [r["row"] for r in matrix["rows"]] == summary["models"][model]["test"]["confusion_matrix"], task
    # the final augmented model is one that an evaluate task scored (a later round's, or base when the loop kept it)
    final = {(f"{split}_{metric}", summary["models"]["augmented"][split][metric]) for split in SPLITS for metric in EVALUATION_SCALARS}
    assert any(final <= set(output_metadata(run_root, task, "metrics").items()) for task in ["evaluate", *round_evaluations])


def test_compare_task_logs_every_model_side_by_side_as_in_summary(run):
    workdir, _ = run
    (run_root,) = [p for p in (workdir / "kfp").iterdir() if not p.name.startswith(".")]  # .kfp_cache aside
    summary = json.loads((workdir / "summary.json").read_text())
    expected = {}
    for model, kfp_name in (("base", "base"), ("augmented", "augmented"), ("tfidf", "tfidf"), ("zero-shot", "zero_shot")):
        for split in ("dev", "test"):
            for metric in ("accuracy", "macro_f1", "weighted_f1"):
                expected[f"{kfp_name}_{split}_{metric}"] = summary["models"][model][split][metric]
        for metric in ("accuracy", "macro_f1"):
            low, high = summary["models"][model]["test"]["ci95"][metric]
            expected[f"{kfp_name}_test_{metric}_ci95_low"], expected[f"{kfp_name}_test_{metric}_ci95_high"] = low, high
    for metric in ("accuracy", "macro_f1", "weighted_f1"):
        expected[f"augmented_minus_base_test_{metric}"] = summary["deltas"]["test"][metric]
    for pair, result in summary["significance"].items():
        before, after = pair.split("->")
        expected[f"{before.replace('-', '_')}_vs_{after.replace('-', '_')}_test_mcnemar_p_value"] = result["test"]["p_value"]
    assert "base_vs_augmented_test_mcnemar_p_value" in expected
    assert output_metadata(run_root, "compare-models", "metrics") == expected
    # the existing outputs are still there
    assert {"results", "report_markdown", "report_html"} <= set(executor_output(run_root, "compare-models")["artifacts"])


def test_two_round_loop_runs_with_dsl_if_and_stops_or_continues_consistently(run):
    workdir, output = run
    (run_root,) = [p for p in (workdir / "kfp").iterdir() if not p.name.startswith(".")]  # .kfp_cache aside
    decisions = [executor_output(run_root, t)["parameterValues"]["decision"] for t in ("augment-from-errors", "augment-from-errors-2")]
    assert all(d in ("continue", "stop-keep-current", "stop-keep-reference") for d in decisions)
    # dsl.If ran the round's fine-tune exactly when the round said "continue"; dsl.Else ran carry-forward otherwise.
    trained = sorted(p.name for p in run_root.iterdir() if p.name.startswith("finetune"))
    carried = sorted(p.name for p in run_root.iterdir() if p.name.startswith("carry-forward"))
    assert len(trained) == 1 + decisions.count("continue")
    assert len(carried) == len(decisions) - decisions.count("continue")
    if decisions[0] != "continue":
        assert decisions[1] == "stop-keep-current"  # once stopped, the loop stays stopped
    summary = json.loads((workdir / "summary.json").read_text())
    augmented_report = summary["data"]["augmented"]
    assert [r["round"] for r in augmented_report["augmentation_rounds"]] == [1, 2][: decisions.count("continue")]
    # after the last round the same dev rule picks the final model: the last round's, or the one before it
    kept = executor_output(run_root, "select-final-model")["parameterValues"]["Output"]
    assert kept in ("current", "reference")
    assert ("loop_stopped" in augmented_report) == (decisions[-1] != "continue" or kept == "reference")
    if kept == "reference" and decisions[-1] == "continue":
        assert augmented_report["loop_stopped"]["round"] == 3
    assert "augment round 1" in output


def test_the_fine_tuned_model_artifact_names_its_base_weights(run):
    workdir, _ = run
    (run_root,) = [p for p in (workdir / "kfp").iterdir() if not p.name.startswith(".")]
    base_model = json.loads((workdir / "summary.json").read_text())["base_model"]
    for task in sorted(p.name for p in run_root.iterdir() if p.name == "finetune" or p.name.startswith("finetune-")):
        meta = output_metadata(run_root, task, "model")
        assert meta["base_model"] == base_model["name_or_path"], task
        assert meta["base_model_source"] == "tiny", task
        assert meta["base_model_weights_sha256"] == base_model["weights_sha256"], task


def test_filter_counts_are_in_the_prepare_and_augmented_split_metadata(run):
    workdir, _ = run
    (run_root,) = [p for p in (workdir / "kfp").iterdir() if not p.name.startswith(".")]  # .kfp_cache aside
    prepared = executor_output(run_root, "prepare-examples")["artifacts"]["examples"]["artifacts"][0]["metadata"]
    assert {"filtered_duplicate_within_new", "filtered_near_duplicate_within_new", "filtered_total"} <= set(prepared)
    augmented = executor_output(run_root, "augment-from-errors")["artifacts"]["augmented"]["artifacts"][0]["metadata"]
    assert {"filtered_near_duplicate_of_test", "filtered_label_inconsistent", "filtered_class_cap", "filtered_total"} <= set(augmented)
    assert augmented["rows_generated"] == augmented["rows_added"] + augmented["filtered_total"]


def test_augment_rounds_0_runs_no_round_and_compares_the_base_model_with_the_baselines(tmp_path):
    """augmentation off: kfp.local runs the graph without the loop (compare_models' augmented inputs left unset)."""
    articles = write_lines(tmp_path / "articles.jsonl", corpus_subset(["returns", "shipping", "payments"], 4))
    config = write_config(
        tmp_path / "run.yaml",
        articles,
        generate={"questions_per_article": 4},
        model={"name_or_path": "builtin:tiny-phi3", "dtype": "float32"},
        train={"epochs": 1, "batch_size": 4, "max_length": 96, "logging_steps": 2},
        augment={"rounds": 0},
    )
    workdir = tmp_path / "out"
    result = run_local_cli(config, workdir)
    ran = re.findall(r"^\[ftloop\] \[\d+/(\d+)\] Executing task '([^']+)'$", result.stdout, re.M)
    assert {name for _, name in ran} == {
        "importer",
        "prepare-examples",
        "split-examples",
        "format-chat",
        "tfidf-baseline",
        "evaluate-zero-shot",
        "finetune",
        "evaluate",
        "compare-models",
    }
    assert {total for total, _ in ran} == {"9"}  # no round, no carry-forward, no select-final-model in the graph
    (run_dir,) = (d for d in (workdir / "kfp").iterdir() if not d.name.startswith("."))  # .kfp_cache aside
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(("augment", "carry", "select"))]
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary["models"]) == {"base", "tfidf", "zero-shot"} and set(summary["data"]) == {"base"}
    assert set(summary["significance"]) == {"tfidf->base", "zero-shot->base", "zero-shot->tfidf"} and summary["deltas"] == {}
    assert summary["config"]["augment"]["rounds"] == 0
    assert "Augmentation was off (augment.rounds: 0)" in (workdir / "report.md").read_text()
    # the final lines: no delta column and the verdict says why
    assert "\nModels evaluated on the same rows:\n" in result.stdout, result.stdout[-2000:]
    tail = result.stdout.split("Models evaluated on the same rows:\n", 1)[1]
    assert tail.startswith("Augmentation was off (augment.rounds: 0): the run fine-tuned the base model")
    assert "delta" not in tail and "augmented" not in tail
