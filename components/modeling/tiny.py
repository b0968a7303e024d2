"""Tiny, random-init models built offline: a Phi-3 (the default) and a Llama with a ChatML template.

CI and laptops cannot download Phi-3-mini (7.6 GB) and could not train it on a
CPU anyway. This builds a model with the *same architecture classes, special
tokens, chat template and generation config* as Phi-3, so every code path that
later runs on the real model (loading via ``Auto*``, TRL SFT, PEFT all-linear
LoRA, label scoring) is exercised for real, just small enough to fine-tune in
seconds. Its tokenizer is trained on the fly on the project's own texts.

``architecture="llama"`` builds the other family the project runs (the local demo's
SmolLM2-135M-Instruct, components/modeling/builtin.py): ``LlamaForCausalLM`` with separate
q/k/v and gate/up projections and SmolLM2's ChatML template (``<|im_start|>role\n...<|im_end|>\n``),
so tests can check that nothing assumes Phi-3's fused layers or ``<|end|>`` tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    set_seed,
)

from ftloop.components.errors import FtloopError
from ftloop.components.modeling.loading import quiet_progress_bars
from ftloop.components.prompts import system_instruction

# Verbatim copy of trl/chat_templates/phi3.jinja (trl 1.16). Keeping it byte-identical
# lets TRL recognise it (e.g. to swap in its {% generation %} variant).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

UNK, BOS, EOS, PAD = "<unk>", "<s>", "<|endoftext|>", "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Fixed order so ids are stable: <unk>=0 and <s>=1 as in Phi-3 (its config's bos_token_id is 1).
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, *CHAT_TOKENS]

# SmolLM2-135M-Instruct's chat template, verbatim: ChatML, with a default system turn when the
# conversation has none, and nothing after the last turn (no eos).
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The tiny Llama's eos is the document end, not the turn end: as in Qwen2.5's and Llama-3's base
# tokenizers (SmolLM2-Instruct's eos happens to be <|im_end|>). A runtime that stops on eos only, or
# on Phi-3's <|end|>, then runs past the answer, so the tests catch code that assumes either.
# Ids in SmolLM2's order (<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2), then a distinct pad.
LLAMA_SPECIAL_TOKENS = [EOS, IM_START, IM_END, PAD]

ARCHITECTURES = ("phi3", "llama")

# Query/key weights start this much smaller than the rest, so attention starts close to
# uniform (a bag of words at the answer position) yet stays learnable. With full-size
# random q/k, runs sometimes stayed on the "predict one label" plateau (measured on
# synthetic 8-label data, 6 seeds: worst test macro-F1 0.70 vs 0.82 with 0.3, and
# 3 of 6 collapsed to < 0.3 in cosine/3-layer variants). 0 freezes attention: worse.
ATTENTION_QK_INIT_SCALE = 0.3

# Chosen by measurement (2 CPU cores, 240 train rows, 20 epochs, batch 8, lr 5e-3, r 16):
# ~0.25 M parameters, ~18 s per fine-tune; test macro-F1 0.89 on synthetic questions that
# share vocabulary with training, 0.28 on the WebBizz demo split (TF-IDF+LR: 0.28-0.31).
# Wider (96/128) or deeper (3 layers) random bases learned *worse* with adapters alone; a
# small BPE vocabulary shares subwords between seen and unseen words (2048 gave 0.22 there).
DEFAULT_SIZE: dict[str, int] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 256,
    "vocab_size": 512,  # BPE target; the model's vocab is len(tokenizer) rounded up to 64
    "max_position_embeddings": 4096,
}


def _train_tokenizer(corpus: list[str], labels: list[str], vocab_size: int, architecture: str = "phi3") -> PreTrainedTokenizerFast:
    # Byte-level BPE never needs <unk>, so any user text round-trips.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS if architecture == "phi3" else LLAMA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    if architecture == "phi3":
        special: dict[str, Any] = {"unk_token": UNK, "bos_token": BOS, "additional_special_tokens": CHAT_TOKENS}
        template = PHI3_CHAT_TEMPLATE
    else:  # no <unk> (byte-level BPE); bos is <|im_start|> as in SmolLM2, never added by the tokenizer
        special = {"bos_token": IM_START, "additional_special_tokens": [IM_START, IM_END]}
        template = CHATML_CHAT_TEMPLATE
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        # Distinct from eos: collators that mask pad labels must not mask the stop token.
        pad_token=PAD,
        padding_side="right",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        **special,
    )
    # Whole-word added tokens make every label exactly one token wherever it appears,
    # so label scoring needs a single forward pass.
    tokenizer.add_tokens([AddedToken(label, single_word=True, normalized=False) for label in labels])
    tokenizer.chat_template = template
    return tokenizer


MARKER = "ftloop_tiny_model.json"
# Bump when the build changes what it writes for the same inputs, so older models are rebuilt.
BUILD_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER)


def tiny_model_fingerprint(texts: list[str], labels: list[str], seed: int, dims: dict[str, int], architecture: str = "phi3") -> str:
    """What decides the built model: its texts (the tokenizer's corpus), labels, seed, size and architecture."""
    corpus = hashlib.sha256()
    for text in texts:
        corpus.update(text.encode("utf-8") + b"\0")
    identity = {"build": BUILD_VERSION, "seed": seed, "labels": list(labels), "size": dims, "corpus": corpus.hexdigest()}
    if architecture != "phi3":  # a Phi-3's fingerprint stays what it was, so its cached builds stay valid
        identity["architecture"] = architecture
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def reusable_tiny_model(
    output_dir: str | Path, texts: list[str], labels: list[str], seed: int = 0, architecture: str = "phi3", **size: Any
) -> bool:
    """True if ``output_dir`` holds a completely written tiny model built from exactly these inputs."""
    output_dir = Path(output_dir)
    if not all((output_dir / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        recorded = json.loads((output_dir / MARKER).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == tiny_model_fingerprint(texts, labels, seed, {**DEFAULT_SIZE, **size}, architecture)


def _write_error(directory: Path, exc: BaseException) -> FtloopError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    return FtloopError(f"{directory}: cannot write the tiny model: {reason}")


def build_tiny_model(
    output_dir: str | Path,
    texts: list[str],
    labels: list[str],
    seed: int = 0,
    replace: bool = False,
    architecture: str = "phi3",
    **size: Any,
) -> Path:
    """Write a loadable tiny Phi-3 (weights, tokenizer, generation config) to ``output_dir``.

    ``architecture="llama"`` writes a tiny Llama with a ChatML template instead (see the module
    docstring). ``size`` overrides keys of ``DEFAULT_SIZE``. Same inputs and seed give the same model.
    The model is built in a temporary directory beside ``output_dir`` and renamed into
    place when complete, so a full disk or a crash never leaves a directory that looks like
    a model. An existing ``output_dir`` must be empty or an earlier tiny model (any
    directory with ``replace``, for a path the caller owns).
    """
    unknown = set(size) - set(DEFAULT_SIZE)
    if unknown:
        raise TypeError(f"unknown size keys: {sorted(unknown)}; allowed: {sorted(DEFAULT_SIZE)}")
    if not labels:
        raise ValueError("labels must not be empty")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    dims = {**DEFAULT_SIZE, **size}
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FtloopError(f"{output_dir}: exists and is not a directory; choose a directory for the tiny model")
    if output_dir.is_dir() and not replace and any(output_dir.iterdir()) and not (output_dir / MARKER).is_file():
        raise FtloopError(f"{output_dir}: directory is not empty and holds no tiny model; choose a new or empty directory")
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.building-"))
    except OSError as exc:
        raise _write_error(output_dir.parent, exc) from None
    try:
        _build(building, texts, labels, seed, dims, architecture)
        _move_into_place(building, output_dir)
    except BaseException as exc:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":  # safetensors' own I/O error
            raise _write_error(output_dir, exc) from None
        raise
    return output_dir


def _move_into_place(building: Path, output_dir: Path) -> None:
    """Swap the finished build in for whatever was at ``output_dir`` (nothing, empty, an older model)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(building, 0o777 & ~umask)  # mkdtemp makes it 0700
    if not output_dir.exists():
        building.rename(output_dir)
        return
    old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.old-"))
    output_dir.rename(old / "model")
    building.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def _build(output_dir: Path, texts: list[str], labels: list[str], seed: int, dims: dict[str, int], architecture: str = "phi3") -> None:
    # The system instruction starts every training row, so weight it like that: its words
    # become whole tokens instead of eating most of each sequence as characters.
    instruction = system_instruction(sorted(labels))
    corpus = [*texts, *labels, *[instruction] * max(1, len(texts))]
    if architecture == "llama":  # ChatML writes the roles as text: make them whole tokens too
        corpus += ["system\nuser\nassistant\n"] * max(1, len(texts))
    tokenizer = _train_tokenizer(corpus, list(labels), dims["vocab_size"], architecture)
    if architecture == "phi3":
        model = _phi3_model(tokenizer, dims, seed)
    else:
        model = _llama_model(tokenizer, dims, seed)
    with quiet_progress_bars():
        model.save_pretrained(output_dir)  # safetensors is the only format transformers 5 writes
        tokenizer.save_pretrained(output_dir)
    # Written last: with the fingerprint it marks a complete model built from these inputs.
    meta = {
        "seed": seed,
        "size": dims,
        "labels": list(labels),
        "n_texts": len(texts),
        "fingerprint": tiny_model_fingerprint(texts, labels, seed, dims, architecture),
    }
    if architecture != "phi3":
        meta["architecture"] = architecture
    with open(output_dir / MARKER, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(meta, indent=2) + "\n")


def _phi3_model(tokenizer: PreTrainedTokenizerFast, dims: dict[str, int], seed: int) -> Phi3ForCausalLM:
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in [*SPECIAL_TOKENS]}
    hidden = dims["hidden_size"]
    config = Phi3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # padded like Phi-3's 32064 > 32011 tokens
        hidden_size=hidden,
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"],
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=dims["max_position_embeddings"],
        original_max_position_embeddings=dims["max_position_embeddings"],
        # Phi-3 uses 0.02 for width 3072 (~1/sqrt(d)); keep that scale at tiny width. With 0.02
        # the frozen random lm_head caps every logit near 0, so the loss cannot fall far below
        # ln(vocab) even once the ranking is right.
        initializer_range=hidden**-0.5,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )
    set_seed(seed)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        q_and_k = 2 * config.num_attention_heads * (hidden // config.num_attention_heads)
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[:q_and_k] *= ATTENTION_QK_INIT_SCALE
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        # Phi-3 ends a turn with <|end|> and a document with <|endoftext|>; stop on both.
        eos_token_id=[ids[EOS], ids["<|end|>"]],
        pad_token_id=ids[PAD],
    )
    return model


def _llama_model(tokenizer: PreTrainedTokenizerFast, dims: dict[str, int], seed: int) -> LlamaForCausalLM:
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in LLAMA_SPECIAL_TOKENS}
    hidden = dims["hidden_size"]
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=hidden,
        intermediate_size=dims["intermediate_size"],
        num_hidden_layers=dims["num_hidden_layers"],
        num_attention_heads=dims["num_attention_heads"],
        # Grouped-query attention as in SmolLM2 (9 query heads, 3 key/value heads): k/v narrower than q.
        num_key_value_heads=max(1, dims["num_attention_heads"] // 2),
        max_position_embeddings=dims["max_position_embeddings"],
        initializer_range=hidden**-0.5,  # see _phi3_model
        bos_token_id=ids[IM_START],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )
    set_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= ATTENTION_QK_INIT_SCALE
            layer.self_attn.k_proj.weight *= ATTENTION_QK_INIT_SCALE
    # eos only, as in SmolLM2's and Qwen2.5-base's generation config: the turn end must come from the template.
    model.generation_config = GenerationConfig(bos_token_id=ids[IM_START], eos_token_id=ids[EOS], pad_token_id=ids[PAD])
    return model
