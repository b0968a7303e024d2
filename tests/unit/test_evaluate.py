"""Label scoring must equal an unpadded one-at-a-time computation; metrics must equal sklearn."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ftloop.components.errors import FtloopError
from ftloop.components.evaluation.metrics import compute_metrics
from ftloop.components.modeling.loading import load_for_inference
from ftloop.components.modeling.prefix_cache import MIN_SHARED_PREFIX
from ftloop.components.modeling.scoring import _encode_prompt, _encode_prompts, _shared_prefix_length, score_labels
from ftloop.components.prompts import prompt_messages
from ftloop.components.stages.evaluate import run as evaluate_model
from tests.fixtures.ml import LABELS

QUESTIONS = [
    "refund?",
    "where is my parcel, it was dispatched by express courier last week and has not arrived yet",
    "is the battery certified safe",
    "how do I unsubscribe from the newsletter emails that fill my inbox every single day, thanks",
    "points",
    "my credit card was charged twice for one invoice",
    "can I speak to someone at the help desk about a complaint ticket",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(trained):
    return load_for_inference(trained["dir"])


@torch.no_grad()
def reference_scores(model, tokenizer, prompts, labels):
    """One prompt at a time, no padding: sum of the label tokens' log-probs, softmaxed over labels."""
    out = []
    for prompt in prompts:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        logliks = []
        for label in labels:
            full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": label}], tokenize=True, return_dict=True)[
                "input_ids"
            ]
            label_ids = full[len(prompt_ids) : full.index(tokenizer.convert_tokens_to_ids("<|end|>"), len(prompt_ids))]
            ids = torch.tensor([prompt_ids + label_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            logliks.append(sum(logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(label_ids)))
        probs = torch.softmax(torch.stack(logliks), dim=0)
        out.append(dict(zip(labels, probs.tolist())))
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_scores_equal_unbatched_reference(model_and_tokenizer, padding_side):
    model, tokenizer = model_and_tokenizer
    prompts = [prompt_messages(q, LABELS) for q in QUESTIONS]
    batched = score_labels(model, tokenizer, prompts, LABELS, batch_size=3, padding_side=padding_side)
    reference = reference_scores(model, tokenizer, prompts, LABELS)
    for got, want in zip(batched, reference):
        assert list(got) == LABELS
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
        for label in LABELS:
            assert got[label] == pytest.approx(want[label], abs=1e-5)
    # scores are not all alike: the model actually discriminates
    assert len({max(s, key=s.get) for s in batched}) > 1


def test_multi_token_labels_are_scored_over_all_their_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    labels = ["shipping", "shipping delay", "returns", "return window x"]  # shared first tokens
    prompts = [prompt_messages(q, labels) for q in QUESTIONS[:5]]
    batched = score_labels(model, tokenizer, prompts, labels, batch_size=4)
    reference = reference_scores(model, tokenizer, prompts, labels)
    for got, want in zip(batched, reference):
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-9)
        for label in labels:
            assert got[label] == pytest.approx(want[label], abs=1e-5)


def _assert_close(got, want, labels, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(labels)
        for label in labels:
            assert g[label] == pytest.approx(w[label], abs=tol)


def test_encode_prompts_equals_one_prompt_at_a_time(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    for questions in (QUESTIONS, [q + suffix for q in QUESTIONS for suffix in ("", " ", " returns?")]):
        # 7 prompts take the batched apply_chat_template call; 21 are spliced (components/modeling/prompt_tokens.py)
        prompts = [prompt_messages(q, LABELS) for q in questions]
        assert _encode_prompts(tokenizer, prompts) == [_encode_prompt(tokenizer, p) for p in prompts]
    assert _encode_prompts(tokenizer, []) == []


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("multi_token", [False, True])
def test_shared_prefix_path_equals_plain_path(model_and_tokenizer, padding_side, multi_token):
    """The KV-cached shared prefix (the default) gives the plain full-sequence scores."""
    model, tokenizer = model_and_tokenizer
    labels = ["shipping", "shipping delay", "returns", "return window x"] if multi_token else LABELS
    prompts = [prompt_messages(q, labels) for q in QUESTIONS]
    # The fast path is really taken: everything up to the user's question is shared.
    ids = _encode_prompts(tokenizer, prompts)
    # The system turn alone, less the eos the template appends when no generation prompt follows.
    system_part = len(tokenizer.apply_chat_template(prompts[0][:1], tokenize=True, return_dict=True)["input_ids"]) - 1
    shared = _shared_prefix_length(model, ids, [(len(p) - 1, len(p)) for p in ids])
    assert shared >= max(MIN_SHARED_PREFIX, system_part)
    fast = score_labels(model, tokenizer, prompts, labels, batch_size=3, padding_side=padding_side)
    plain = score_labels(model, tokenizer, prompts, labels, batch_size=3, padding_side=padding_side, prefix_cache=False)
    _assert_close(fast, plain, labels)
    _assert_close(fast, reference_scores(model, tokenizer, prompts, labels), labels)


def test_no_common_prefix_falls_back_to_plain_path(model_and_tokenizer):
    """Prompts that share no prefix (different system prompts) or a single prompt take the plain path, same scores."""
    model, tokenizer = model_and_tokenizer
    templates = ["Intents: {labels}. Pick one.", "Which of {labels} fits?"]
    prompts = [prompt_messages(q, LABELS, templates[i % 2]) for i, q in enumerate(QUESTIONS)]
    ids = _encode_prompts(tokenizer, prompts)
    assert _shared_prefix_length(model, ids, [(len(p) - 1, len(p)) for p in ids]) == 0
    assert _shared_prefix_length(model, ids[:1], [(len(ids[0]) - 1, len(ids[0]))]) == 0
    _assert_close(
        score_labels(model, tokenizer, prompts, LABELS, batch_size=4), reference_scores(model, tokenizer, prompts, LABELS), LABELS
    )
    _assert_close(
        score_labels(model, tokenizer, prompts[:1], LABELS, batch_size=4), reference_scores(model, tokenizer, prompts[:1], LABELS), LABELS
    )


def test_shared_prefix_stops_before_the_first_scored_position(model_and_tokenizer):
    """Cached positions yield no logits, so the shared part never reaches a position whose logits are needed."""
    model, _ = model_and_tokenizer
    seqs = [list(range(1, 21)), list(range(1, 21)) + [30, 31]]
    assert _shared_prefix_length(model, seqs, [(19, 20), (19, 22)]) == 19
    assert _shared_prefix_length(model, seqs, [(10, 11), (19, 22)]) == 10
    assert _shared_prefix_length(model, seqs, [(MIN_SHARED_PREFIX - 1, 20), (19, 22)]) == 0


def test_score_labels_empty_input(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert score_labels(model, tokenizer, [], LABELS, batch_size=4) == []


def test_compute_metrics_equals_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    rng = random.Random(7)
    labels = ["a", "b", "c", "d"]
    y_true = [rng.choice(labels[:3]) for _ in range(60)]  # "d" never occurs: zero_division paths
    y_pred = [t if rng.random() < 0.6 else rng.choice(labels) for t in y_true]
    m = compute_metrics(y_true, y_pred, labels)
    json.dumps(m)  # plain JSON types only
    assert m["n"] == 60
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        assert (m[f"{avg}_precision"], m[f"{avg}_recall"], m[f"{avg}_f1"]) == pytest.approx((p, r, f))
    f_each = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    assert [m["per_class"][x]["f1"] for x in labels] == pytest.approx(list(f_each))
    assert [m["per_class"][x]["support"] for x in labels] == [y_true.count(x) for x in labels]
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    assert m["confusion_matrix"][0][1] == sum(1 for t, p in zip(y_true, y_pred) if t == "a" and p == "b")
    assert all(type(v) is float for k, v in m.items() if k.endswith(("_f1", "_precision", "_recall", "accuracy")))


def test_compute_metrics_edge_cases():
    assert compute_metrics([], [], ["a", "b"])["n"] == 0
    with pytest.raises(FtloopError, match="zzz"):
        compute_metrics(["a"], ["zzz"], ["a", "b"])


def test_evaluate_model_end_to_end(trained, formatted_dir, tmp_path):
    lines = []
    metrics = evaluate_model(trained["config"], trained["dir"], formatted_dir, tmp_path, progress=lines.append)
    assert set(metrics) == {"train", "dev", "test"}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert len(lines) == 3 and lines[-1].startswith("eval test: n=96")
    rows = [json.loads(x) for x in (tmp_path / "predictions" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["test"]["n"] == 96
    for row in rows:
        assert set(row) == {"id", "text", "label", "group", "origin", "prediction", "scores", "correct"}
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-6)
        assert row["prediction"] == max(row["scores"], key=row["scores"].get)
        assert row["correct"] == (row["prediction"] == row["label"])
    assert metrics["test"]["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    # learnable synthetic data: far above the 1/8 chance level on held-out questions
    assert metrics["train"]["macro_f1"] > 0.8
    assert metrics["test"]["macro_f1"] > 0.6, metrics["test"]


def test_generate_mode_reports_invalid_outputs_and_scores_them_wrong(trained, formatted_dir, tmp_path):
    """Parity mode (eval.mode: generate): parsed labels become predictions; unparseable outputs count as wrong."""
    from ftloop.components.evaluation.metrics import INVALID

    base = trained["config"]
    config = base.model_copy(update={"eval": base.eval.model_copy(update={"mode": "generate", "max_new_tokens": 4})})
    metrics = evaluate_model(config, trained["dir"], formatted_dir, tmp_path / "gen", progress=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "gen" / "predictions" / "test.jsonl").read_text().splitlines()]
    invalid = [r for r in rows if r["prediction"] is None]
    assert metrics["test"]["invalid_rate"] == len(invalid) / len(rows)
    assert all("raw" in r for r in rows)
    assert all(not r["correct"] for r in invalid)
    expected = compute_metrics([r["label"] for r in rows], [r["prediction"] or INVALID for r in rows], metrics["test"]["labels"])
    assert metrics["test"]["accuracy"] == expected["accuracy"]
    assert metrics["test"]["macro_f1"] == expected["macro_f1"]


def test_zero_shot_baseline_is_evaluated_the_way_the_models_are(trained, formatted_dir, tmp_path):
    """With eval.mode: generate the 'just prompt it' baseline generates and parses too, so it is compared like for like."""
    from ftloop.components.stages.evaluate_zero_shot import run as evaluate_zero_shot

    base = trained["config"]
    config = base.model_copy(update={"eval": base.eval.model_copy(update={"mode": "generate", "max_new_tokens": 4})})
    metrics = evaluate_zero_shot(config, formatted_dir, tmp_path / "gen", progress=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "gen" / "predictions" / "test.jsonl").read_text().splitlines()]
    assert all("raw" in r for r in rows)  # generated text, parsed
    assert metrics["test"]["invalid_rate"] == sum(r["prediction"] is None for r in rows) / len(rows)
    scored = evaluate_zero_shot(base, formatted_dir, tmp_path / "scored", progress=lambda m: None)
    rows = [json.loads(l) for l in (tmp_path / "scored" / "predictions" / "test.jsonl").read_text().splitlines()]
    assert not any("raw" in r for r in rows) and scored["test"]["invalid_rate"] == 0.0  # label scoring never is invalid


def test_invalid_predictions_count_against_recall_only():
    m = compute_metrics(["a", "a", "b"], ["a", None, "b"], ["a", "b"])
    assert m["accuracy"] == 2 / 3
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    assert m["confusion_matrix"] == [[1, 0], [0, 1]]


def test_untested_attention_kernels_take_the_plain_path(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    ids = _encode_prompts(tokenizer, [prompt_messages(q, LABELS) for q in QUESTIONS])
    spans = [(len(p) - 1, len(p)) for p in ids]
    assert _shared_prefix_length(model, ids, spans) > 0
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    assert _shared_prefix_length(model, ids, spans) == 0


def test_merging_the_adapter_in_memory_scores_like_applying_it(trained, model_and_tokenizer):
    """evaluate's default folds W + BA once; the scores are those of base + LoRA layers."""
    from peft import PeftModel

    merged, tokenizer = model_and_tokenizer
    applied, _ = load_for_inference(trained["dir"], merge_adapter=False)
    assert isinstance(applied, PeftModel) and not isinstance(merged, PeftModel)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    prompts = [prompt_messages(q, LABELS) for q in QUESTIONS]
    _assert_close(
        score_labels(merged, tokenizer, prompts, LABELS, batch_size=4),
        score_labels(applied, tokenizer, prompts, LABELS, batch_size=4),
        LABELS,
    )


def test_bf16_scoring_agrees_with_float32_merged_or_applied(trained, model_and_tokenizer, formatted_dir):
    """Phi-3 is scored in bf16 on the GPU: the same code paths (merged or applied adapter, shared-prefix
    cache or not) run in bf16 here and may differ from float32 only by bf16 rounding."""
    import copy

    from ftloop.components.artifacts import read_split

    reference, tokenizer = model_and_tokenizer
    applied, _ = load_for_inference(trained["dir"], merge_adapter=False)
    rows = read_split(formatted_dir, "test", LABELS)
    prompts = [r["prompt"] for r in rows]
    want = score_labels(reference, tokenizer, prompts, LABELS, batch_size=8)
    merged_bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    applied_bf16 = applied.to(torch.bfloat16)
    assert next(merged_bf16.parameters()).dtype == torch.bfloat16
    runs = {
        "merged": score_labels(merged_bf16, tokenizer, prompts, LABELS, batch_size=8),
        "applied": score_labels(applied_bf16, tokenizer, prompts, LABELS, batch_size=8),
        "merged, plain path": score_labels(merged_bf16, tokenizer, prompts, LABELS, batch_size=8, prefix_cache=False),
    }
    for name, got in runs.items():
        for w, g in zip(want, got):
            assert abs(sum(g.values()) - 1) < 1e-6, name
            assert max(abs(w[label] - g[label]) for label in LABELS) < 0.08, name
            top_w, top_g = max(w, key=w.get), max(g, key=g.get)
            # a different argmax only where float32 itself nearly ties the two labels
            assert top_w == top_g or w[top_w] - w[top_g] < 0.05, (name, w, g)
    assert max(max(w.values()) for w in want) > 1.5 / len(LABELS)  # a trained adapter: the comparison means something
