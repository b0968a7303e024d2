"""The model-based label-consistency filter: rephrasings scored by the current fine-tuned model."""

import json

from ftloop.components.modeling.loading import load_for_inference
from ftloop.components.modeling.scoring import score_labels
from ftloop.components.prompts import prompt_messages
from ftloop.components.records import Example, write_json, write_jsonl
from ftloop.components.stages.augment_from_errors import run as run_augment
from ftloop.components.stages.split_examples import read_splits, write_splits
from tests.fixtures.ml import LABELS, synthetic_examples


def test_model_judge_keeps_only_rephrasings_the_model_puts_on_the_intended_label(tmp_path, trained):
    splits = {s: [Example.from_dict(r) for r in synthetic_examples(n, 5, s)] for s, n in (("train", 3), ("dev", 1), ("test", 1))}
    write_splits(splits, LABELS, tmp_path / "splits")
    # every train row "misclassified" as the next label, so there is plenty to rephrase
    wrong = {e.id: LABELS[(LABELS.index(e.label) + 1) % len(LABELS)] for e in splits["train"]}
    write_jsonl(
        tmp_path / "eval" / "predictions" / "train.jsonl",
        [{"id": e.id, "label": e.label, "prediction": wrong[e.id]} for e in splits["train"]],
    )
    write_jsonl(
        tmp_path / "eval" / "predictions" / "dev.jsonl", [{"id": e.id, "label": e.label, "prediction": e.label} for e in splits["dev"]]
    )
    write_json(tmp_path / "eval" / "metrics.json", {"dev": {"macro_f1": 1.0}})
    config = trained["config"].model_copy(
        update={
            "augment": trained["config"].augment.model_copy(
                update={"label_filter": "model", "label_margin": 0.0, "rephrasings_per_error": 2}
            )
        }
    )

    meta = run_augment(config, tmp_path / "splits", tmp_path / "eval", tmp_path / "out", model_dir=trained["dir"], progress=lambda _: None)
    aug = json.loads((tmp_path / "out" / "report.json").read_text())["augmentation"]
    assert aug["label_filter"] == "model" and aug["generated"] == 48
    survived_filters = aug["generated"] - sum(v for k, v in aug["removed"].items() if k not in ("label_inconsistent", "class_cap"))
    assert aug["removed"]["label_inconsistent"] + aug["added"] == survived_filters
    assert meta["filtered_label_inconsistent"] == aug["removed"]["label_inconsistent"]

    # What was kept is exactly what the fine-tuned model (scored independently here) puts on the intended label.
    added = read_splits(tmp_path / "out")[0]["train"][len(splits["train"]) :]
    model, tokenizer = load_for_inference(trained["dir"])
    scores = score_labels(model, tokenizer, [prompt_messages(e.text, LABELS) for e in added], LABELS, 64)
    assert all(max(s, key=s.get) == e.label for e, s in zip(added, scores))
    assert 0 < aug["added"] and aug["removed"]["label_inconsistent"] > 0
