"""The augmentation loop and generator backends as compiled for a cluster: rounds, conditions, secrets."""

import re

import pytest
import yaml
from kfp import compiler

from ftloop.components.config import load_config
from ftloop.pipelines.pipeline import build_pipeline
from tests.fixtures.data import REPO

SECRET_VALUE = "sk-must-never-reach-the-yaml"


def compile_for_cluster(tmp_path, monkeypatch, **updates):
    monkeypatch.setenv("OKAREO_API_KEY", SECRET_VALUE)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_VALUE)
    base = load_config(REPO / "configs" / "webbizz-gke.yaml")
    config = base.model_validate({**base.model_dump(), **updates})
    out = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(config, for_cluster=True), str(out))
    text = out.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def all_tasks(spec):
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def assert_rounds_are_conditional(spec, rounds):
    """Round k: If(round k's decision == "continue") retrains and evaluates, Else carries forward; round k+1
    (or, after the last, the final selection) reads that If/Else group's dsl.OneOf outputs."""
    root, components = spec["root"]["dag"]["tasks"], spec["components"]
    augments = ["augment-from-errors"] + [f"augment-from-errors-{k}" for k in range(2, rounds + 1)]
    for augment, consumer in zip(augments, augments[1:] + ["select-final-model"]):
        channel = f"pipelinechannel--{augment}-decision"
        groups = [
            name
            for name, t in root.items()
            if name.startswith("condition-branches")
            and t["inputs"]["parameters"].get(channel, {}).get("taskOutputParameter", {}).get("producerTask") == augment
        ]
        assert len(groups) == 1, f"{augment}: {groups}"
        runs = {}  # condition -> the tasks it runs, without the -N suffixes of later rounds
        for branch in components[root[groups[0]]["componentRef"]["name"]]["dag"]["tasks"].values():
            inside = components[branch["componentRef"]["name"]]["dag"]["tasks"]
            runs[branch["triggerPolicy"]["condition"]] = {re.sub(r"-\d+$", "", name) for name in inside}
        continues = f"inputs.parameter_values['{channel}'] == 'continue'"
        assert runs == {continues: {"format-chat", "finetune", "evaluate"}, f"!({continues})": {"carry-forward"}}, augment
        artifacts = root[consumer]["inputs"]["artifacts"]
        reads = {artifacts[key]["taskOutputArtifact"]["producerTask"] for key in ("model", "evaluation")}
        assert reads == {groups[0]}, f"{consumer} reads {reads}, not round {augment}'s outcome"


def test_rounds_are_unrolled_inside_conditions_and_backends_get_their_secrets(tmp_path, monkeypatch):
    text, spec, k8s = compile_for_cluster(
        tmp_path,
        monkeypatch,
        generate={"backend": "okareo", "questions_per_article": 5},
        augment={"backend": "openai", "rounds": 3, "label_filter": "model"},
        generators={"openai": {"base_url": "http://vllm.ftloop.svc:8000/v1", "secret_name": "vllm-key"}, "okareo": {"upload_eval": True}},
    )
    assert SECRET_VALUE not in text
    tasks = all_tasks(spec)
    assert {
        "augment-from-errors",
        "augment-from-errors-2",
        "augment-from-errors-3",
        "finetune-4",
        "evaluate-4",
        "carry-forward-3",
        "upload-to-okareo",
    } <= set(tasks)
    # later rounds hang off the previous round's dsl.OneOf outputs, inside If/Else condition groups
    assert len([t for t in tasks.values() if "triggerPolicy" in t]) == 6  # an If and an Else per round, no others
    assert_rounds_are_conditional(spec, rounds=3)
    assert k8s["exec-prepare-examples"]["secretAsEnv"][0]["secretName"] == "okareo-api-key"  # cluster.okareo_secret_name
    assert k8s["exec-prepare-examples"]["secretAsEnv"][0]["keyToEnv"] == [{"envVar": "OKAREO_API_KEY", "secretKey": "api-key"}]
    assert k8s["exec-augment-from-errors"]["secretAsEnv"][0]["secretName"] == "vllm-key"
    assert k8s["exec-upload-to-okareo"]["secretAsEnv"][0]["secretName"] == "okareo-api-key"
    # the model-based label filter scores with the fine-tuned model: the augment task gets the L4
    assert k8s["exec-augment-from-errors"]["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    assert tasks["prepare-examples"]["cachingOptions"] == {}  # remote generation is not cached


def test_offline_backends_need_no_secret(tmp_path, monkeypatch):
    _, spec, k8s = compile_for_cluster(tmp_path, monkeypatch)
    assert all("secretAsEnv" not in executor for executor in k8s.values())
    assert "upload-to-okareo" not in all_tasks(spec)


def test_every_rounds_evaluation_logs_metrics_and_a_confusion_matrix(tmp_path, monkeypatch):
    _, spec, _ = compile_for_cluster(tmp_path, monkeypatch, augment={"rounds": 3})
    tasks = all_tasks(spec)
    evaluations = [name for name in tasks if re.fullmatch(r"evaluate(-\d+)?", name)]
    assert sorted(evaluations) == ["evaluate", "evaluate-2", "evaluate-3", "evaluate-4"]  # base + one per round
    for name in evaluations:
        outputs = spec["components"][tasks[name]["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
        assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics", name
        assert outputs["confusion_matrix"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics", name
    # whichever round the final model came from, its scalars are on the one compare task
    compare = spec["components"][tasks["compare-models"]["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
    assert compare["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"


LOOP_TASKS = re.compile(r"(augment-from-errors|carry-forward|select-final-model|condition-.*)(-\d+)?")


@pytest.mark.parametrize("rounds", [0, 1])
def test_augment_rounds_0_compiles_no_loop_and_compares_base_with_the_baselines_only(tmp_path, monkeypatch, rounds):
    _, spec, _ = compile_for_cluster(tmp_path, monkeypatch, augment={"rounds": rounds}, generators={"okareo": {"upload_eval": True}})
    tasks = all_tasks(spec)
    root = spec["root"]["dag"]["tasks"]
    compare = root["compare-models"]["inputs"]["artifacts"]
    upload = root["upload-to-okareo"]["inputs"]["artifacts"]
    # the comparison declares the loop's model optional: the same component serves both shapes of the graph
    declared = spec["components"][root["compare-models"]["componentRef"]["name"]]["inputDefinitions"]["artifacts"]
    assert {k for k, v in declared.items() if v.get("isOptional")} == {"augmented_evaluation", "augmented_splits"}
    if rounds == 0:
        # augmentation off: no round (no augment, no If/Else, no second fine-tune or evaluation), no final selection
        assert not [name for name in tasks if LOOP_TASKS.fullmatch(name)]
        assert sorted(n for n in tasks if re.fullmatch(r"(finetune|evaluate|format-chat)(-\d+)?", n)) == [
            "evaluate",
            "finetune",
            "format-chat",
        ]
        assert set(compare) == {"base_evaluation", "base_splits", "tfidf_evaluation", "zero_shot_evaluation"}
        assert set(upload) == {"base_evaluation"}  # the Okareo upload gets the base evaluation alone
    else:
        assert {"augment-from-errors", "carry-forward", "select-final-model", "finetune-2"} <= set(tasks)
        for key in ("augmented_evaluation", "augmented_splits"):
            assert compare[key]["taskOutputArtifact"]["producerTask"] == "select-final-model", key
        assert upload["augmented_evaluation"]["taskOutputArtifact"]["producerTask"] == "select-final-model"
