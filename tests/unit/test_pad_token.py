"""load_tokenizer's pad rule: never eos or a stop token, never a token the chat template writes, never a new token.

Tokenizers are built on the fly (a byte-level BPE on a few sentences, as components/modeling/tiny.py
does) in the shapes of real families: Llama-3 (no unk, no pad, hundreds of reserved special tokens,
<|eot_id|> and <|end_of_text|>), Qwen2 (pad <|endoftext|>, <|vision_pad|>/<|fim_pad|>) and Phi-3 (unk).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftloop.components.errors import FtloopError

CORPUS = ["where is my order", "how do I reset my password", "cancel my subscription please", "the invoice is wrong"]

# Llama-3.1's first special tokens, in its order (128000 + i there).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|reserved_special_token_3|>",
]
# Llama-3.0's: no token named as a pad, so the lowest spare id is chosen.
LLAMA3_0_SPECIALS = [t for t in LLAMA3_SPECIALS if t != "<|finetune_right_pad_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def make_model_dir(
    path: Path,
    specials: list[str],
    template: str,
    config: dict | None = None,
    generation_config: dict | None = None,
    plain_tokens: tuple[str, ...] = (),
    **tokens: str,
) -> Path:
    """A directory check_model_ref accepts: the tokenizer, a config.json and a placeholder safetensors file."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="right", clean_up_tokenization_spaces=False, **tokens)
    tokenizer.add_tokens(list(plain_tokens))  # ordinary (not special) added tokens, as for labels
    tokenizer.chat_template = template
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": len(tokenizer), **(config or {})}))
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    save_file({"placeholder": torch.zeros(1)}, str(path / "model.safetensors"))
    return path


def llama3_dir(path: Path, template: str = LLAMA3_TEMPLATE, specials: list[str] = LLAMA3_SPECIALS, **kw) -> Path:
    return make_model_dir(path, specials, template, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", **kw)


def load(path: Path):
    from ftloop.components.modeling.loading import load_tokenizer

    return load_tokenizer(str(path))


def stop_ids(tokenizer) -> list[int]:
    from ftloop.components.modeling.generate_mode import stop_token_ids

    return stop_token_ids(tokenizer)


def test_llama3_1_pads_with_its_finetune_pad_token(tmp_path):
    d = llama3_dir(tmp_path / "llama3", generation_config={"eos_token_id": [1, 8, 9]})
    tok = load(d)
    assert tok.unk_token is None
    # named as a pad, so chosen over the lower-id reserved tokens
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.pad_token_id == LLAMA3_SPECIALS.index("<|finetune_right_pad_id|>")
    end_ids = {tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")}
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id not in end_ids | set(stop_ids(tok))
    assert tok.pad_token_id != tok.bos_token_id
    assert len(tok) == load_plain_len(d)  # nothing was added
    # The pad is a special token: decoding with skip_special_tokens (the hf generator) drops it.
    assert tok.decode([*tok.encode("where is my order"), tok.pad_token_id], skip_special_tokens=True) == "where is my order"
    # The choice is deterministic across loads.
    assert load(d).pad_token_id == tok.pad_token_id


def test_llama3_0_without_a_pad_named_token_pads_with_its_lowest_reserved_token(tmp_path):
    tok = load(llama3_dir(tmp_path / "llama3-0", specials=LLAMA3_0_SPECIALS))
    assert tok.pad_token == "<|reserved_special_token_0|>"
    assert tok.pad_token_id == LLAMA3_0_SPECIALS.index("<|reserved_special_token_0|>")


def load_plain_len(path: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(path)))


def test_pad_is_masked_in_training_and_scoring_batches(tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from ftloop.components.modeling.loading import chat_token_ids
    from ftloop.components.modeling.scoring import _pad_batch

    tok = load(llama3_dir(tmp_path / "llama3"))
    pad = tok.pad_token_id
    examples = []
    for question, answer in (("where is my order", "shipping"), ("how do I reset my password please", "account")):
        prompt = chat_token_ids(tok, [{"role": "user", "content": question}], add_generation_prompt=True)
        full = chat_token_ids(tok, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
        assert full[: len(prompt)] == prompt and pad not in full  # the template never writes the pad
        examples.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt) :]})
    batch = DataCollatorForLanguageModeling(pad_token_id=pad)(examples)
    padded = batch["input_ids"] == pad
    assert padded.any()
    assert (batch["attention_mask"][padded] == 0).all() and (batch["labels"][padded] == -100).all()
    # the stop token stays a trained label
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert (batch["labels"] == eot).sum() == 2

    scored = _pad_batch([e["input_ids"] for e in examples], pad, "right", "cpu")
    assert (scored["attention_mask"][scored["input_ids"] == pad] == 0).all()


def test_a_reserved_token_the_template_writes_is_not_chosen(tmp_path):
    # The template marks every header with <|reserved_special_token_0|>: it is chat text, not spare.
    template = LLAMA3_TEMPLATE.replace("'<|start_header_id|>'", "'<|reserved_special_token_0|><|start_header_id|>'")
    tok = load(llama3_dir(tmp_path / "marked", template=template, specials=LLAMA3_0_SPECIALS))
    assert "<|reserved_special_token_0|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert tok.pad_token == "<|reserved_special_token_1|>"


def test_a_reserved_token_written_only_in_the_generation_prompt_is_not_chosen(tmp_path):
    template = LLAMA3_TEMPLATE.replace(
        "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        "'<|start_header_id|>assistant<|end_header_id|>\n\n<|reserved_special_token_0|>' }}{% endif %}",
    )
    tok = load(llama3_dir(tmp_path / "genprompt", template=template, specials=LLAMA3_0_SPECIALS))
    assert tok.pad_token == "<|reserved_special_token_1|>"


def test_a_reserved_token_that_ends_the_turn_is_not_chosen(tmp_path):
    # A template whose turn end is a reserved-named token: it is a stop token, never a pad.
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|unused_1|>"]
    template = LLAMA3_TEMPLATE.replace("'<|eot_id|>'", "'<|reserved_end|>'")
    d = make_model_dir(tmp_path / "ends", specials, template, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tok = load(d)
    assert tok.convert_tokens_to_ids("<|reserved_end|>") in stop_ids(tok)
    assert tok.pad_token == "<|unused_1|>"


def test_a_generation_config_eos_is_not_chosen(tmp_path):
    reserved_0 = LLAMA3_0_SPECIALS.index("<|reserved_special_token_0|>")
    tok = load(llama3_dir(tmp_path / "geneos", specials=LLAMA3_0_SPECIALS, generation_config={"eos_token_id": [1, reserved_0, 8]}))
    assert tok.pad_token == "<|reserved_special_token_1|>"


def test_no_unk_and_no_spare_token_is_refused_with_the_remedy(tmp_path):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    # an ordinary added token is text, however it is named
    d = llama3_dir(tmp_path / "bare", specials=specials, plain_tokens=("<|reserved_word|>",))
    with pytest.raises(FtloopError) as err:
        load(d)
    message = str(err.value)
    assert repr(str(d)) in message
    assert "no unk token" in message and "pad_token" in message and "tokenizer_config.json" in message


def test_spare_tokens_outside_the_models_embeddings_are_refused(tmp_path):
    d = llama3_dir(tmp_path / "small", config={"vocab_size": LLAMA3_SPECIALS.index("<|reserved_special_token_0|>")})
    with pytest.raises(FtloopError, match="no spare special token"):
        load(d)


def test_qwen2_base_pads_with_a_spare_pad_token(tmp_path):
    # Qwen2.5 base: pad == eos == <|endoftext|>, no unk; its vocabulary has <|vision_pad|> and <|fim_pad|>.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|fim_pad|>"]
    d = make_model_dir(tmp_path / "qwen-base", specials, CHATML_TEMPLATE, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok = load(d)
    assert tok.pad_token == "<|vision_pad|>"
    assert tok.pad_token_id not in stop_ids(tok)


def test_own_pad_distinct_from_eos_is_kept(tmp_path):
    # Qwen2.5-Instruct: pad <|endoftext|>, eos <|im_end|>: already distinct, so left alone.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|fim_pad|>"]
    d = make_model_dir(tmp_path / "qwen", specials, CHATML_TEMPLATE, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    assert load(d).pad_token == "<|endoftext|>"


@pytest.mark.parametrize("pad", [None, "<|endoftext|>"])
def test_unk_pads_as_before_even_with_spare_tokens(tmp_path, pad):
    # Phi-3: unk <unk>, eos <|endoftext|>; reserved tokens do not displace the unk rule.
    specials = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|reserved_special_token_0|>"]
    tokens = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "<|endoftext|>"}
    if pad is not None:
        tokens["pad_token"] = pad
    tok = load(make_model_dir(tmp_path / "phi3", specials, PHI3_TEMPLATE, **tokens))
    assert tok.pad_token == "<unk>" and tok.pad_token_id == 0


@pytest.mark.parametrize("unk", ["<|endoftext|>", "<|im_end|>"], ids=["unk-is-eos", "unk-is-turn-end"])
def test_an_unk_that_ends_answers_is_not_used(tmp_path, unk):
    # GPT-2 style (unk == bos == eos == <|endoftext|>) or an unk that is the template's turn end:
    # padding with it would pad with a stop token.
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reserved_special_token_0|>"]
    tokens = {"unk_token": unk, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    tok = load(make_model_dir(tmp_path / "gpt2", specials, CHATML_TEMPLATE, **tokens))
    assert tok.pad_token == "<|reserved_special_token_0|>"
