"""Nothing may assume Phi-3: the same checks on the tiny Phi-3 and the tiny Llama (ChatML template).

The production base is Phi-3-mini (fused qkv_proj/gate_up_proj, ``<|user|>``/``<|assistant|>``/``<|end|>``
tags); the local demo runs SmolLM2 (Llama: separate q/k/v and gate/up projections, ChatML
``<|im_start|>role\\n...<|im_end|>``). The tiny Llama's eos (``<|endoftext|>``) is not its turn end
(``<|im_end|>``), so code that stops on eos only, or on Phi-3's ``<|end|>``, runs past the answer here.
Every test below runs once per architecture (the ``architecture`` fixture in tests/fixtures/ml.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from ftloop.components.artifacts import chat_rows
from ftloop.components.errors import FtloopError
from ftloop.components.modeling.generate_mode import (
    end_strings,
    generate_predictions,
    parse_label,
    stop_token_ids,
    turn_end_token,
)
from ftloop.components.modeling.lora import resolve_target_modules
from ftloop.components.modeling.prefix_cache import MIN_SHARED_PREFIX
from ftloop.components.modeling.prompt_tokens import encode_prompts
from ftloop.components.modeling.scoring import _shared_prefix_length, label_token_ids, score_labels
from ftloop.components.modeling.tiny import build_tiny_model, reusable_tiny_model, tiny_model_fingerprint
from ftloop.components.prompts import prompt_messages, system_instruction
from tests.fixtures.ml import LABELS, synthetic_examples

LORA_TARGETS = {
    "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
}
MODEL_CLASS = {"phi3": "Phi3ForCausalLM", "llama": "LlamaForCausalLM"}
TURN_END = {"phi3": "<|end|>", "llama": "<|im_end|>"}
# How each template writes the system turn, the user turn and the generation prompt.
PROMPT_FORMAT = {
    "phi3": "<|system|>\n{system}<|end|>\n<|user|>\n{user}<|end|>\n<|assistant|>\n",
    "llama": "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",
}
# What follows the assistant's answer in a training row.
ANSWER_END = {"phi3": "<|end|>\n<|endoftext|>", "llama": "<|im_end|>\n"}
QUESTIONS = [r["text"] for r in synthetic_examples(2, 5, "architectures")] + [
    "refund?",
    " leading space and a trailing one ",
    "two\nlines",
    "mentions <|end|> and <|im_end|> and <|user|> in the text",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the pipeline runs tiny models (loading.cpu_threads_for): on a shared 2-core
    machine two threads made each forward pass up to 100x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base(tiny_arch_dir):
    """The random-init tiny model of this architecture, in eval mode, with its tokenizer (as the pipeline loads them)."""
    from ftloop.components.modeling.loading import load_base_model, load_tokenizer

    model = load_base_model(str(tiny_arch_dir), None, "float32").eval()
    return model, load_tokenizer(str(tiny_arch_dir))


# ------------------------------------------------------------------ the tiny models


def test_each_tiny_model_loads_as_its_architecture(tiny_arch_dir, base, architecture):
    model, tokenizer = base
    assert type(model).__name__ == MODEL_CLASS[architecture]
    assert model.config.model_type == architecture
    assert model.config.vocab_size >= len(tokenizer) and model.config.vocab_size % 64 == 0
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # tiny: seconds to fine-tune
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)  # pad == eos would mask the stop token
    for token in (TURN_END[architecture], tokenizer.eos_token, tokenizer.pad_token):  # special tokens never split
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    seqs = label_token_ids(tokenizer, prompt_messages("where is my parcel?", LABELS), LABELS)
    assert [tokenizer.convert_ids_to_tokens(s) for s in seqs] == [[label] for label in LABELS]


def test_the_tiny_llama_ends_a_turn_with_another_token_than_eos(tiny_llama_dir):
    """What makes it a useful second architecture: stopping on eos (or on <|end|>) alone would run past the answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert tokenizer.eos_token == "<|endoftext|>" and "<|end|>" not in tokenizer.get_vocab()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == model.config.eos_token_id
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention, as SmolLM2
    # SmolLM2's template: a default system turn when the conversation has none.
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_tiny_llama_builds_are_reproducible_and_fingerprinted_apart(tmp_path):
    texts = ["where is my parcel", "how do I get a refund", "is the battery safe"]
    a = build_tiny_model(tmp_path / "a", texts, LABELS, seed=3, architecture="llama", hidden_size=32, num_attention_heads=2)
    b = build_tiny_model(tmp_path / "b", texts, LABELS, seed=3, architecture="llama", hidden_size=32, num_attention_heads=2)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "config.json").read_text())["model_type"] == "llama"
    size = {"hidden_size": 32, "num_attention_heads": 2}
    assert reusable_tiny_model(a, texts, LABELS, seed=3, architecture="llama", **size)
    assert not reusable_tiny_model(a, texts, LABELS, seed=3, **size)  # a Phi-3 asked for: rebuilt
    dims = {"hidden_size": 64}
    assert tiny_model_fingerprint(texts, LABELS, 0, dims) != tiny_model_fingerprint(texts, LABELS, 0, dims, "llama")
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'"):
        build_tiny_model(tmp_path / "c", texts, LABELS, architecture="gpt2")


# ------------------------------------------------------------------ LoRA targets


def test_all_linear_resolves_to_the_architectures_own_layers(base, architecture):
    model, _ = base
    assert resolve_target_modules(model, "all-linear") == LORA_TARGETS[architecture]
    assert "lm_head" not in resolve_target_modules(model, "ALL-LINEAR")


def test_an_explicit_list_is_checked_against_the_architecture(base, architecture):
    model, _ = base
    assert resolve_target_modules(model, ["o_proj", "down_proj", "o_proj"]) == ["o_proj", "down_proj"]  # both have these
    assert resolve_target_modules(model, LORA_TARGETS[architecture]) == LORA_TARGETS[architecture]
    other = LORA_TARGETS["llama" if architecture == "phi3" else "phi3"]
    foreign = [name for name in other if name not in LORA_TARGETS[architecture]]
    with pytest.raises(FtloopError, match=r"not found among the model's linear layers; available: \[") as err:
        resolve_target_modules(model, foreign)
    assert str(LORA_TARGETS[architecture]) in str(err.value)


def test_peft_adapts_every_resolved_layer(base, architecture):
    from peft import LoraConfig, get_peft_model

    from ftloop.components.modeling.loading import peft_deprecation_silenced

    model, _ = base
    targets = resolve_target_modules(model, "all-linear")
    with peft_deprecation_silenced():
        peft_model = get_peft_model(type(model)(model.config), LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type="CAUSAL_LM"))
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    assert adapted == set(LORA_TARGETS[architecture])


# ------------------------------------------------------------------ chat formatting


def test_format_chat_rows_render_in_the_architectures_tags(base, architecture):
    """format_chat's rows (artifacts.chat_rows) through each template: the tags around the same content,
    and the prompt's rendering a prefix of the training row's (TRL's completion mask relies on it)."""
    _, tokenizer = base
    examples = [{"id": f"r{i}", "text": q, "label": LABELS[i % len(LABELS)], "group": f"g{i}"} for i, q in enumerate(QUESTIONS)]
    for example, row in zip(examples, chat_rows(examples, LABELS)):
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert prompt == PROMPT_FORMAT[architecture].format(system=system_instruction(LABELS), user=example["text"])
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        assert full == prompt + example["label"] + ANSWER_END[architecture]
        full_ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)["input_ids"]
        prompt_ids = tokenizer.apply_chat_template(row["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)["input_ids"]
        assert list(full_ids[: len(prompt_ids)]) == list(prompt_ids)
        answer = tokenizer.convert_ids_to_tokens(full_ids[len(prompt_ids) :])
        assert answer[:2] == [example["label"], TURN_END[architecture]]


def test_spliced_prompt_ids_equal_the_templates_tokenization(base, monkeypatch):
    from ftloop.components.modeling import prompt_tokens

    _, tokenizer = base
    prompts = [prompt_messages(q, LABELS) for q in QUESTIONS]
    plans = []
    real_plan = prompt_tokens._splice_plan
    monkeypatch.setattr(prompt_tokens, "_splice_plan", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    reference = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert encode_prompts(tokenizer, prompts) == [list(ids) for ids in reference]
    assert plans and plans[0] is not None, "the splice was not used"


# ------------------------------------------------------------------ label scoring


@torch.no_grad()
def _reference_scores(model, tokenizer, prompts, labels, turn_end: str):
    """One prompt at a time, no padding, no cache: the label tokens are what the template writes before its turn end."""
    end_id = tokenizer.convert_tokens_to_ids(turn_end)
    out = []
    for prompt in prompts:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        logliks = []
        for label in labels:
            answered = [*prompt, {"role": "assistant", "content": label}]
            full = tokenizer.apply_chat_template(answered, tokenize=True, return_dict=True)["input_ids"]
            label_ids = full[len(prompt_ids) : full.index(end_id, len(prompt_ids))]
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + label_ids]), use_cache=False).logits[0].double(), -1)
            logliks.append(sum(logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(label_ids)))
        out.append(dict(zip(labels, torch.softmax(torch.stack(logliks), dim=0).tolist())))
    return out


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("labels", [LABELS, ["shipping", "shipping delay", "returns", "return window x"]], ids=["one-token", "multi-token"])
def test_shared_prefix_scoring_equals_the_whole_row_path(base, architecture, padding_side, labels):
    model, tokenizer = base
    prompts = [prompt_messages(q, labels) for q in QUESTIONS[-8:]]  # 8: the fewest prompts that are spliced
    ids = encode_prompts(tokenizer, prompts)
    assert _shared_prefix_length(model, ids, [(len(p) - 1, len(p)) for p in ids]) >= MIN_SHARED_PREFIX  # the fast path is taken
    fast = score_labels(model, tokenizer, prompts, labels, batch_size=3, padding_side=padding_side)
    plain = score_labels(model, tokenizer, prompts, labels, batch_size=3, padding_side=padding_side, prefix_cache=False)
    reference = _reference_scores(model, tokenizer, prompts, labels, TURN_END[architecture])
    assert max(abs(s[a] - s[b]) for s in reference for a in labels for b in labels) > 1e-3  # not all alike
    for got_fast, got_plain, want in zip(fast, plain, reference):
        assert list(got_fast) == labels
        for label in labels:
            assert got_fast[label] == pytest.approx(got_plain[label], abs=1e-5)
            assert got_fast[label] == pytest.approx(want[label], abs=1e-5)


# ------------------------------------------------------------------ stopping


def test_stop_tokens_come_from_the_chat_template(base, architecture):
    model, tokenizer = base
    assert turn_end_token(tokenizer) == TURN_END[architecture]
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END[architecture])
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, turn_end]
    assert set(stop_token_ids(tokenizer, model)) == {tokenizer.eos_token_id, turn_end}
    ends = end_strings(tokenizer, stop_token_ids(tokenizer, model))
    assert set(ends) == {tokenizer.eos_token, TURN_END[architecture]}
    assert parse_label(f"returns{TURN_END[architecture]}\n", LABELS, ends) == "returns"
    assert parse_label(f"returns{TURN_END[architecture]}{tokenizer.eos_token}", LABELS, ends) == "returns"
    other = TURN_END["llama" if architecture == "phi3" else "phi3"]
    assert parse_label(f"returns{other}", LABELS, ends) is None  # another family's tag is text here


class _Scripted:
    """Makes a causal LM answer ``label``, then the turn end, then ``after`` forever, whatever the prompt.

    A forward hook overwrites the last position's logits from the last input token, so greedy and
    sampled decoding both follow the script: a caller that stops at the turn end gets the label alone.
    """

    def __init__(self, model, tokenizer, label: str, after: str):
        ids = tokenizer.convert_tokens_to_ids
        self.label, self.end, self.after = ids(label), ids(turn_end_token(tokenizer)), ids(after)
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _next(self, last: int) -> int:
        if last == self.label:
            return self.end
        return self.after if last in (self.end, self.after) else self.label

    def _hook(self, _module, args, kwargs, output):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        logits = output.logits
        for row, last in enumerate(input_ids[:, -1].tolist()):
            logits[row, -1] = -1e9
            logits[row, -1, self._next(last)] = 0.0
        return output

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_generate_mode_stops_at_the_turn_end_and_parses_the_label(base, architecture):
    model, tokenizer = base
    prompts = [prompt_messages(q, LABELS) for q in QUESTIONS[:5]]
    with _Scripted(model, tokenizer, "returns", "shipping"):
        results = generate_predictions(model, tokenizer, prompts, LABELS, batch_size=2, max_new_tokens=6)
    assert [r["raw"] for r in results] == [f"returns{TURN_END[architecture]}"] * len(prompts)
    assert all(r["prediction"] == "returns" and r["valid"] for r in results)


def test_the_hf_generator_stops_at_the_turn_end(tiny_arch_dir, architecture):
    from ftloop.components.config import RunConfig
    from ftloop.components.generators.factory import make_generator

    config = RunConfig.model_validate(
        {
            "seed": 3,
            "data": {"questions": "q.jsonl"},
            "generate": {"backend": "hf"},
            "augment": {"backend": "hf"},
            "generators": {"hf": {"name_or_path": str(tiny_arch_dir), "dtype": "float32", "max_new_tokens": 6, "batch_size": 2}},
        }
    )
    gen = make_generator("hf", config)
    model, tokenizer = gen._load()
    requests = [[{"role": "user", "content": f"question {'x' * i}"}] for i in range(3)]  # left padding in the batch of 2
    with _Scripted(model, tokenizer, "returns", "shipping"):
        replies = gen.complete(requests, attempt=0)
    assert replies == ["returns"] * 3
