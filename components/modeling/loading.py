"""Loading base models, adapters and tokenizers: safetensors only, no remote code, hardware-dependent knobs."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ftloop.components.artifacts import read_model_meta
from ftloop.components.config import BUILTIN_MODEL_REFS, TINY_MODEL_REF, is_hub_id
from ftloop.components.errors import FtloopError
from ftloop.components.records import read_json

# No code from the hub at run time. transformers 5 depends on `kernels` and, unless told
# otherwise, loads every model with use_kernels=True: layers are swapped for kernels fetched
# from the hub (kernels-community/*) at load and again at model.train() (liger-kernels on CUDA),
# so an offline run crashes at its first training step and an online one runs unpinned remote
# code. Three locks, so that no single library default reopens it: every ftloop load passes
# use_kernels=False (tests/unit/test_hub_kernels.py checks the source); this process sets
# USE_HUB_KERNELS=NO, which transformers (and trl/peft, which load through it) read at each load
# and kernelize; and a loaded model that still has kernels on is refused (check_no_hub_kernels).
# Fused kernels come from the pinned liger-kernel package in the GPU image (pyproject's gpu
# extra), never from the hub.
USE_HUB_KERNELS_ENV = "USE_HUB_KERNELS"


def disable_hub_kernels() -> None:
    """Switch hub kernels off for everything in this process that reads USE_HUB_KERNELS."""
    os.environ[USE_HUB_KERNELS_ENV] = "NO"


disable_hub_kernels()  # at import: every ftloop path that loads a model imports this module


def hub_free_attention(attn: str) -> str:
    """``attn`` unless it would load attention code from the hub.

    transformers replaces flash_attention_2 with the hub kernel kernels-community/flash-attn2 when
    it finds the flash-attn package unusable; SDPA is used instead then. A hub repo id is refused.
    """
    if attn.startswith("flash_attention"):
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            return "sdpa"
    if "/" in attn:
        raise FtloopError(f"attention implementation {attn!r} is a hub kernel; ftloop runs no code from the hub")
    return attn


def check_no_hub_kernels(model: nn.Module, what: str = "model") -> nn.Module:
    """``model`` (a PeftModel is unwrapped), if it neither uses hub kernels nor would kernelize at train()."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = getattr(getattr(base, "config", None), "_attn_implementation", None) or ""
    if getattr(base, "use_kernels", False) or getattr(base, "kernels_mode", None) is not None or "/" in attn:
        raise FtloopError(f"{what} was loaded with hub kernels switched on; ftloop runs no code from the hub")
    return model


def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(spec: str) -> torch.dtype:
    """An explicit ``bfloat16`` or ``float32`` is honoured on any device; ``auto`` means bf16 where the GPU
    computes it natively, else fp32, so ``auto`` stays fp32 on every CPU.

    bf16 on CPU is not slow everywhere: on CPUs with AMX / avx512_bf16, SmolLM2-135M fine-tuned and
    scored faster in bf16 than in fp32 with the same test scores (configs/demo-smollm2.yaml asks for
    it). On CPUs without those instructions bf16 is emulated and slower; ``auto`` does not guess which.
    """
    if spec == "float32":
        return torch.float32
    if spec == "bfloat16":
        return torch.bfloat16
    if spec == "auto":
        return torch.bfloat16 if cuda_bf16() else torch.float32
    raise FtloopError(f"model.dtype: unsupported value {spec!r}")


def attn_implementation(dtype: torch.dtype, prefer_flash: bool = True) -> str:
    """FlashAttention-2 where it is wanted and can run (CUDA, half precision, package installed); SDPA elsewhere.

    Training and label scoring that run the shared prompt prefix once (components/modeling/prefix_cache.py)
    ask for SDPA: the prefix halves the tokens, while FlashAttention's padding-free batches only
    save the padding (a few percent after length grouping), and the cache path's equivalence
    tests cover SDPA and eager attention.
    """
    if (
        prefer_flash
        and torch.cuda.is_available()
        and dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence library tqdm bars (weight loading, dataset maps); the caller reports progress itself."""
    import datasets
    from transformers.utils import logging as tf_logging

    tf_was_on = tf_logging.is_progress_bar_enabled()
    ds_was_off = datasets.are_progress_bars_disabled()
    tf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if tf_was_on:
            tf_logging.enable_progress_bar()
        if not ds_was_off:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def peft_deprecation_silenced() -> Iterator[None]:
    """peft 0.21 reads a property transformers 5.24 deprecated; nothing for a user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


# A model this small is the offline tiny model, never a real base.
SMALL_MODEL_PARAMS = 50_000_000


@contextlib.contextmanager
def cpu_threads_for(model: nn.Module) -> Iterator[None]:
    """Run a tiny model single-threaded on CPU; restore the thread count afterwards.

    Its ops are too small to gain much from threads (2 threads: ~20 ms/step, 1: ~28 ms on
    2 cores), but with any other busy process on the machine, 2 threads on 2 cores made
    each step 1-4.5 s instead of 50-60 ms (OpenMP barriers waiting on a descheduled thread).
    """
    if torch.cuda.is_available() or sum(p.numel() for p in model.parameters()) > SMALL_MODEL_PARAMS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).is_dir()


def check_model_ref(name_or_path: str, key: str = "model.name_or_path") -> None:
    """Fail in seconds on a reference that cannot load: a ``builtin:`` placeholder (``ftloop run --local``
    replaces those by a model directory before anything loads), a missing or broken directory, or a
    value that is not a hub id either (instead of retrying the hub for a minute)."""
    if name_or_path == TINY_MODEL_REF:
        raise FtloopError(
            f"{key} {name_or_path!r} is a placeholder: build the tiny model first (the pipeline does this) and pass its directory"
        )
    if name_or_path in BUILTIN_MODEL_REFS:
        raise FtloopError(
            f"{key} {name_or_path!r} is a placeholder for a cached model directory: `ftloop run --local` "
            f"resolves it for model.name_or_path; elsewhere pass the directory `ftloop fetch-model {name_or_path}` prints"
        )
    if name_or_path.startswith("builtin:"):
        raise FtloopError(f"{key}: unknown built-in model {name_or_path!r}; known: {', '.join(BUILTIN_MODEL_REFS)}")
    if _is_local(name_or_path):
        check_model_dir(Path(name_or_path))
    elif name_or_path.startswith(("/", ".")):
        raise FtloopError(f"{key}: {name_or_path}: no such model directory")
    elif not is_hub_id(name_or_path):
        raise FtloopError(f"{key}: {name_or_path!r} is neither a local directory nor a valid hub id ('name' or 'org/name')")


SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


def check_model_dir(path: Path) -> None:
    """A local base-model directory has a readable config, a chat-template tokenizer and safetensors weights.

    Checked up front so a wrong path fails in seconds with the file named, not
    inside the fine-tune task after the data stages ran. Pickled weights are
    refused: loading them can execute code.
    """
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FtloopError(f"{path}: not a model directory: config.json is missing")
    config = read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise FtloopError(f"{config_path}: not a transformers model config: no 'model_type'")
    if not any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        pickled = [name for name in PICKLE_WEIGHTS if (path / name).is_file()]
        if pickled:
            raise FtloopError(
                f"{path}: weights are only in {pickled[0]} (pickle); ftloop loads safetensors only. "
                "Convert them with save_pretrained(safe_serialization=True)"
            )
        raise FtloopError(f"{path}: no model weights: expected {' or '.join(SAFETENSORS_WEIGHTS)}")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise FtloopError(f"{path}: no tokenizer files (tokenizer.json or tokenizer_config.json)")


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_dir(path: Path) -> None:
    """A LoRA adapter directory holds safetensors weights; checked before PeftModel.from_pretrained,
    which would otherwise fall back to a pickled adapter_model.bin (loading pickle can run code)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FtloopError(f"{path}: not an adapter directory: adapter_config.json is missing")
    if not (path / ADAPTER_WEIGHTS).is_file():
        pickled = [name for name in ("adapter_model.bin", "adapter_model.pt") if (path / name).is_file()]
        if pickled:
            raise FtloopError(
                f"{path}: adapter weights are only in {pickled[0]} (pickle); ftloop loads safetensors only. "
                "Convert them with save_pretrained(safe_serialization=True)"
            )
        raise FtloopError(f"{path}: no adapter weights: expected {ADAPTER_WEIGHTS}")


def quantization_config(quantization: str):
    """QLoRA's NF4 settings (double quantization, bf16 compute and storage), or None for unquantized weights."""
    if quantization == "none":
        return None
    if quantization != "nf4":
        raise FtloopError(f"model.quantization: unsupported value {quantization!r}")
    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise FtloopError("model.quantization: nf4 needs a CUDA GPU and the bitsandbytes package (the GPU image has both)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def load_base_model(
    name_or_path: str,
    revision: str | None,
    dtype_spec: str,
    quantization: str = "none",
    prefer_flash: bool = False,
    key: str = "model.name_or_path",
) -> torch.nn.Module:
    """Load the causal LM exactly as a hub model would be loaded: safetensors only, no remote code.

    ``prefer_flash``: FlashAttention-2 where available (``attn_implementation``), else SDPA.
    ``key`` is the config field the reference came from, named in errors.
    """
    from transformers import AutoModelForCausalLM

    check_model_ref(name_or_path, key)
    quant = quantization_config(quantization)
    dtype = torch.bfloat16 if quant is not None else resolve_dtype(dtype_spec)
    extra = {"quantization_config": quant, "device_map": {"": 0}} if quant is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=None if _is_local(name_or_path) else revision,
            dtype=dtype,
            attn_implementation=hub_free_attention(attn_implementation(dtype, prefer_flash)),
            trust_remote_code=False,
            use_safetensors=True,
            use_kernels=False,  # no hub kernels: see disable_hub_kernels
            **extra,
        )
    except FtloopError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt weights raise library-specific errors
        raise FtloopError(f"{key}: cannot load model {name_or_path!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    return check_no_hub_kernels(model, f"{key} {name_or_path!r}")


# Special tokens a vocabulary sets aside for no text: Llama-3's <|reserved_special_token_N|> and
# Llama-3.1's <|finetune_right_pad_id|>, Qwen2's <|vision_pad|> / <|fim_pad|>, Gemma's <unusedN>.
SPARE_TOKEN_MARKERS = ("reserved", "pad", "unused")
# A conversation with every role the prompts use: a template's tokens for all of them show in its rendering.
_SAMPLE_CONVERSATION = [
    {"role": "system", "content": "Classify the question."},
    {"role": "user", "content": "Where is my order?"},
    {"role": "assistant", "content": "shipping"},
]


def _template_renderings(tokenizer) -> list[str]:
    """The chat template's text for the sample conversation, with and without a system turn and a
    generation prompt (templates that refuse a system turn still render the rest)."""
    out = []
    for messages in (_SAMPLE_CONVERSATION, _SAMPLE_CONVERSATION[1:]):
        for prompt_only in (False, True):
            try:
                rendered = tokenizer.apply_chat_template(
                    messages[:-1] if prompt_only else messages, tokenize=False, add_generation_prompt=prompt_only
                )
            except Exception:  # noqa: BLE001 - jinja and template-specific errors (role order, no system turn)
                continue
            if isinstance(rendered, str):
                out.append(rendered)
    return out


def _local_config_value(name_or_path: str, filename: str, key: str):
    """``key`` of a local model directory's JSON file (config.json, generation_config.json), else None."""
    path = Path(name_or_path) / filename
    if not _is_local(name_or_path) or not path.is_file():
        return None
    try:
        data = read_json(path)
    except Exception:  # noqa: BLE001 - an unreadable optional file is left to the model loader
        return None
    if not isinstance(data, dict):
        return None
    if key not in data and isinstance(data.get("text_config"), dict):  # multimodal configs nest the language model's
        return data["text_config"].get(key)
    return data.get(key)


def _not_a_pad_ids(tokenizer, name_or_path: str) -> set[int]:
    """Ids a spare pad must not be: the named special tokens (bos, eos, unk, sep, cls, mask) and a local
    model's generation eos ids (Llama-3 stops on <|end_of_text|>, <|eom_id|> and <|eot_id|>)."""
    ids: set = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "sep", "cls", "mask")}
    generation_eos = _local_config_value(name_or_path, "generation_config.json", "eos_token_id")
    ids.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    return {i for i in ids if isinstance(i, int)}


def spare_pad_token(tokenizer, name_or_path: str, renderings: list[str] | None = None) -> str | None:
    """An existing special token that can pad without being trained on or scored, or None.

    Candidates are the vocabulary's special tokens named like a spare (``SPARE_TOKEN_MARKERS``) that
    are no named special token or generation eos (``_not_a_pad_ids``), fit a local model's embedding
    matrix and never appear in the chat template's renderings (``_template_renderings``). That also
    keeps every stop token out: eos is a named token, and the turn end ``generate_mode.stop_token_ids``
    adds is what the template writes after an answer. A token named as a pad wins (Llama-3.1 ships
    ``<|finetune_right_pad_id|>`` for this), then the lowest id, so the choice is deterministic. Nothing is added: a new token would resize the embeddings and make the adapter
    depend on a new, untrained row.
    """
    renderings = _template_renderings(tokenizer) if renderings is None else renderings
    if not renderings:
        return None  # what the template writes is unknown, so no token is known to be unused
    excluded = _not_a_pad_ids(tokenizer, name_or_path)
    vocab_size = _local_config_value(name_or_path, "config.json", "vocab_size")
    candidates = sorted(
        ("pad" not in added.content.lower(), token_id, added.content)
        for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items()
        if added.special
        and any(marker in added.content.lower() for marker in SPARE_TOKEN_MARKERS)
        and token_id not in excluded
        and (not isinstance(vocab_size, int) or token_id < vocab_size)
        and not any(added.content in text for text in renderings)
    )
    return candidates[0][2] if candidates else None


def load_tokenizer(name_or_path: str, revision: str | None = None, key: str = "model.name_or_path"):
    """The base model's tokenizer, with a pad token that is not eos (padding with eos would mask the
    end of every answer in collators that mask pad labels by id).

    A missing pad, or pad == eos, becomes the unknown token (as Microsoft's Phi-3 recipe does) unless
    that is eos too or the chat template writes it (a turn end), else a spare special token of the
    vocabulary (``spare_pad_token``: e.g. Llama-3's ``<|reserved_special_token_0|>``); a tokenizer with
    neither is refused. Padding is masked by position (attention mask 0, labels -100), so whichever
    token pads is never trained on or scored.
    """
    from transformers import AutoTokenizer

    check_model_ref(name_or_path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=None if _is_local(name_or_path) else revision, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - corrupt tokenizer files raise anything from OSError to Exception
        raise FtloopError(f"{key}: cannot load tokenizer {name_or_path!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    if tokenizer.chat_template is None:
        raise FtloopError(f"tokenizer of {name_or_path!r} has no chat template")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == eos makes label-masking collators hide the stop token (Microsoft's Phi-3 recipe uses unk).
        renderings = _template_renderings(tokenizer)
        unk = tokenizer.unk_token
        if unk is not None and tokenizer.unk_token_id != tokenizer.eos_token_id and not any(unk in t for t in renderings):
            tokenizer.pad_token = unk
        elif (spare := spare_pad_token(tokenizer, name_or_path, renderings)) is not None:
            tokenizer.pad_token = spare
        else:
            raise FtloopError(
                f"tokenizer of {name_or_path!r} has no pad token distinct from eos, no unk token usable as pad and no "
                "spare special token to pad with (one named reserved, pad or unused that its chat template never writes); set "
                "pad_token in its tokenizer_config.json to an existing special token other than eos and the end of turn"
            )
    return tokenizer


def chat_token_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a rendered conversation, via the same call TRL uses to tokenize training rows."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "trl", "peft"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def load_for_inference(model_dir: str | Path, base_model: str | None = None, merged: bool = False, merge_adapter: bool = True):
    """The trained model in eval mode: the base (loaded by the same rules as for training) plus the adapter,
    or, with ``merged``, the merged export written by ``train.export_merged``.

    ``base_model`` overrides the recorded base path, for when the base was built
    or mounted at a different path than during training (e.g. another KFP step).
    ``merge_adapter`` folds the adapter into the base weights in memory (W + BA once)
    so every forward pass runs one matmul per layer instead of three; an NF4 base
    cannot take the merge exactly and keeps the adapter applied.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    meta = read_model_meta(model_dir)
    base = meta.base_model
    with quiet_progress_bars(), peft_deprecation_silenced():
        if merged:
            from ftloop.components.artifacts import MERGED_DIR, merged_dir

            if not merged_dir(model_dir).is_dir():
                raise FtloopError(
                    f"eval.use_merged is set but {model_dir} has no {MERGED_DIR}/ export; train with train.export_merged: true"
                )
            model = load_base_model(str(merged_dir(model_dir)), None, meta.merged.dtype if meta.merged else base.dtype)
        else:
            check_adapter_dir(model_dir)  # before loading: PEFT would fall back to a pickled adapter_model.bin
            model = load_base_model(
                base_model or base.name_or_path,
                base.revision,
                base.dtype,
                base.quantization,
            )
            model = PeftModel.from_pretrained(model, str(model_dir), is_trainable=False)
            if merge_adapter and base.quantization == "none":
                model = model.merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    check_no_hub_kernels(model, str(model_dir))
    model.eval()
    if torch.cuda.is_available() and (merged or base.quantization == "none"):
        model.to("cuda")  # a 4-bit base is placed on the GPU while loading
    return model, tokenizer


def base_model_fallback(recorded: str, configured: str) -> str | None:
    """The configured base when the base path an adapter recorded is gone (artifacts move between
    pipeline steps and machines); None keeps the recorded one."""
    if Path(recorded).is_dir() or not Path(recorded).is_absolute():
        return None
    return configured
