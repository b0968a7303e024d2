"""The tiny offline Phi-3 must look like the real one to every consumer."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from ftloop.components.modeling.scoring import label_token_ids
from ftloop.components.modeling.tiny import PHI3_CHAT_TEMPLATE, build_tiny_model
from ftloop.components.prompts import prompt_messages
from tests.fixtures.ml import LABELS


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_directory_loads_like_a_hub_model(tiny_model_dir, loaded):
    model, tokenizer = loaded
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert model.config.model_type == "phi3"
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert not list(tiny_model_dir.glob("*.bin"))
    assert model.config.vocab_size >= len(tokenizer)
    assert model.config.vocab_size % 64 == 0


def test_phi3_special_tokens(loaded):
    model, tokenizer = loaded
    ids = {
        t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>"]
    }
    assert len(set(ids.values())) == len(ids)
    assert tokenizer.unk_token_id not in ids.values()
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # pad == eos would mask the stop token
    assert model.config.eos_token_id == ids["<|endoftext|>"]
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert sorted(model.generation_config.eos_token_id) == sorted([ids["<|endoftext|>"], ids["<|end|>"]])
    for token, token_id in ids.items():  # special tokens never split
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]


def test_byte_level_tokenizer_round_trips_any_text(loaded):
    _, tokenizer = loaded
    text = "Größe 42 passt nicht? 🙂 naïve café — returns"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_renders_phi3_format(loaded):
    _, tokenizer = loaded
    trl_template = (resources.files("trl") / "chat_templates" / "phi3.jinja").read_text(encoding="utf-8")
    assert tokenizer.chat_template == PHI3_CHAT_TEMPLATE == trl_template
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|system|>\nS<|end|>\n<|user|>\nQ?<|end|>\n<|assistant|>\n"
    )
    full = messages + [{"role": "assistant", "content": "returns"}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == (
        "<|system|>\nS<|end|>\n<|user|>\nQ?<|end|>\n<|assistant|>\nreturns<|end|>\n<|endoftext|>"
    )


def test_labels_are_single_distinct_tokens(loaded):
    _, tokenizer = loaded
    prompt = prompt_messages("where is my parcel?", LABELS)
    seqs = label_token_ids(tokenizer, prompt, LABELS)
    assert all(len(seq) == 1 for seq in seqs)
    assert len({seq[0] for seq in seqs}) == len(LABELS)
    for label, seq in zip(LABELS, seqs):
        assert tokenizer.convert_ids_to_tokens(seq) == [label]


def test_same_inputs_same_model(tmp_path, formatted_dir):
    texts = ["where is my parcel", "how do I get a refund", "is the battery safe"]
    a = build_tiny_model(tmp_path / "a", texts, LABELS, seed=3, hidden_size=32, num_attention_heads=2)
    b = build_tiny_model(tmp_path / "b", texts, LABELS, seed=3, hidden_size=32, num_attention_heads=2)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert json.loads((a / "config.json").read_text())["hidden_size"] == 32


def test_unknown_size_key_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="hidden_layers"):
        build_tiny_model(tmp_path, ["a b c"], LABELS, hidden_layers=3)
