"""LoRA supervised fine-tuning of the base model on the formatted train split.

One recipe for laptop and cluster: TRL's SFTTrainer on conversational
prompt/completion rows (so the loss covers only the answer and its end tokens),
all-linear LoRA resolved to the architecture's concrete module names, no
quantization, and the prompt prefix every row shares run once per batch
(components/prefix_cache.py). Only the hardware-dependent knobs (bf16, attention
kernel, device) switch automatically.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ftloop.components.config import RunConfig, is_hub_id
from ftloop.components.errors import FtloopError
from ftloop.components.records import content_hash, read_json, read_jsonl, write_json

MODEL_META = "ftloop_model.json"
Progress = Callable[[str], None]


# ------------------------------------------------------------------ hardware


def cuda_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(spec: str) -> torch.dtype:
    """'auto' means bf16 where the GPU computes it natively, else fp32 (bf16 on CPU is slow and lossy)."""
    if spec == "float32":
        return torch.float32
    if spec == "bfloat16":
        return torch.bfloat16
    if spec == "auto":
        return torch.bfloat16 if cuda_bf16() else torch.float32
    raise FtloopError(f"model.dtype: unsupported value {spec!r}")


def attn_implementation(dtype: torch.dtype, prefer_flash: bool = True) -> str:
    """FlashAttention-2 where it is wanted and can run (CUDA, half precision, package installed); SDPA elsewhere.

    Training and label scoring that run the shared prompt prefix once (components/prefix_cache.py)
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


# -------------------------------------------------------------------- loading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).is_dir()


def check_model_ref(name_or_path: str, key: str = "model.name_or_path") -> None:
    """Fail in seconds on a reference that cannot load: a placeholder, a missing or broken
    directory, or a value that is not a hub id either (instead of retrying the hub for a minute)."""
    if name_or_path.startswith("builtin:"):
        raise FtloopError(
            f"{key} {name_or_path!r} is a placeholder: build the tiny model first "
            "(the pipeline does this) and pass its directory"
        )
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
            raise FtloopError(f"{path}: adapter weights are only in {pickled[0]} (pickle); ftloop loads safetensors only. "
                              "Convert them with save_pretrained(safe_serialization=True)")
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
        return AutoModelForCausalLM.from_pretrained(
            name_or_path,
            revision=None if _is_local(name_or_path) else revision,
            dtype=dtype,
            attn_implementation=attn_implementation(dtype, prefer_flash),
            trust_remote_code=False,
            use_safetensors=True,
            **extra,
        )
    except FtloopError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt weights raise library-specific errors
        raise FtloopError(
            f"{key}: cannot load model {name_or_path!r}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None


def load_tokenizer(name_or_path: str, revision: str | None = None, key: str = "model.name_or_path"):
    from transformers import AutoTokenizer

    check_model_ref(name_or_path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, revision=None if _is_local(name_or_path) else revision, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - corrupt tokenizer files raise anything from OSError to Exception
        raise FtloopError(f"{key}: cannot load tokenizer {name_or_path!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # pad == eos makes label-masking collators hide the stop token (Microsoft's Phi-3 recipe uses unk).
        if tokenizer.unk_token is None:
            raise FtloopError(f"tokenizer of {name_or_path!r} has no pad or unk token distinct from eos")
        tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.chat_template is None:
        raise FtloopError(f"tokenizer of {name_or_path!r} has no chat template")
    return tokenizer


def chat_token_ids(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a rendered conversation, via the same call TRL uses to tokenize training rows."""
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


# ------------------------------------------------------------ target modules


def _linear_classes() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def resolve_target_modules(model: nn.Module, spec: str | list[str]) -> list[str]:
    """Concrete LoRA target names, so the adapter config says what was trained.

    'all-linear' becomes the leaf names of every linear layer except the output
    head (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj). An explicit list is
    checked against the model, because names copied from other architectures
    (q_proj/v_proj on Phi-3's fused layers) would otherwise fail late or match nothing.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    available: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _linear_classes()) and module is not head:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in available:
                available.append(leaf)
    if isinstance(spec, str):
        if spec.lower() != "all-linear":
            raise FtloopError(f"lora.target_modules: expected 'all-linear' or a list of names, got {spec!r}")
        if not available:
            raise FtloopError("lora.target_modules: the model has no linear layers to adapt")
        return sorted(available)
    names = list(dict.fromkeys(spec))
    missing = [n for n in names if n not in available]
    if missing or not names:
        raise FtloopError(
            f"lora.target_modules: {missing or names} not found among the model's linear layers; "
            f"available: {sorted(available)}"
        )
    return names


# ----------------------------------------------------------------------- data


def read_labels(formatted_dir: Path) -> list[str]:
    path = formatted_dir / "labels.json"
    labels = read_json(path)
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise FtloopError(f"{path}: expected a JSON list of at least two label strings")
    return labels


def read_split(formatted_dir: Path, split: str, labels: list[str]) -> list[dict[str, Any]]:
    """Rows of one formatted split, checked for the fields training and scoring rely on."""
    path = formatted_dir / f"{split}.jsonl"
    rows = read_jsonl(path)
    allowed = set(labels)
    for row in rows:
        where = f"{path}:{row.get('__line__')}"
        prompt, completion = row.get("prompt"), row.get("completion")
        if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
            raise FtloopError(f"{where}: 'prompt' must be a non-empty list of chat messages")
        if not (isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict)):
            raise FtloopError(f"{where}: 'completion' must be a list with one assistant message")
        if row.get("label") not in allowed or completion[0].get("content") != row.get("label"):
            raise FtloopError(f"{where}: label {row.get('label')!r} is not in labels.json or differs from the completion")
    return rows


# ------------------------------------------------------------------- training


def _progress_callback(progress: Progress):
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        """One console line per logging step instead of tqdm bars or raw dicts."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                progress(
                    f"train epoch {state.epoch or 0:.2f}/{args.num_train_epochs:g} "
                    f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.3f}"
                )

    return ProgressCallback()


def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "trl", "peft"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _checkpointing_args(config_cls: type, enabled: bool) -> dict[str, bool]:
    # SFTConfig defaults gradient checkpointing to True; transformers >= 5.24 renamed it
    # activation_checkpointing and warns on the old name.
    if "activation_checkpointing" in getattr(config_cls, "__dataclass_fields__", {}):
        return {"activation_checkpointing": enabled}
    return {"gradient_checkpointing": enabled}


def _evaluation_args(config: RunConfig, has_dev: bool) -> dict[str, Any]:
    """Evaluate on dev and checkpoint at the same cadence, so the best checkpoint by the dev metric can be kept."""
    train = config.train
    strategy = "steps" if train.eval_every_steps else "epoch"
    cadence = {"save_strategy": strategy, "save_total_limit": train.keep_checkpoints, "save_only_model": False}
    if train.eval_every_steps:
        cadence["save_steps"] = train.eval_every_steps
    if train.early_stopping_metric == "none" or not has_dev:
        return {**cadence, "eval_strategy": "no", "load_best_model_at_end": False}
    if train.eval_every_steps:
        cadence["eval_steps"] = train.eval_every_steps
    metric, greater = ("eval_macro_f1", True) if train.early_stopping_metric == "dev_macro_f1" else ("eval_loss", False)
    return {
        **cadence,
        "eval_strategy": strategy,
        "load_best_model_at_end": True,
        "metric_for_best_model": metric,
        "greater_is_better": greater,
    }


def _dev_scoring_trainer(base: type, labels: list[str], dev_rows: list[dict[str, Any]], batch_size: int) -> type:
    """SFTTrainer whose evaluation also label-scores the dev split, so early stopping can watch macro-F1.

    Dev loss covers only the label tokens and can keep falling while the argmax
    label stops changing; macro-F1 is the number the run is judged on.
    """
    from sklearn.metrics import f1_score

    from ftloop.components.evaluate import score_labels

    prompts = [r["prompt"] for r in dev_rows]
    gold = [r["label"] for r in dev_rows]

    class DevScoringSFTTrainer(base):
        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            was_training = self.model.training
            self.model.eval()
            try:
                probabilities = score_labels(self.model, self.processing_class, prompts, labels, batch_size)
            finally:
                self.model.train(was_training)
            predicted = [max(p, key=p.get) for p in probabilities]
            output.metrics[f"{metric_key_prefix}_macro_f1"] = float(
                f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)
            )
            output.metrics[f"{metric_key_prefix}_accuracy"] = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
            return output

    return DevScoringSFTTrainer


def _fits(tokenizer, rows: list[dict[str, Any]], max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Rows whose whole conversation fits max_length, and the longest such row in tokens.

    Truncation would cut the answer off (TRL keeps the start), leaving a row with no loss.
    """
    kept, longest = [], 0
    for row in rows:
        n = len(chat_token_ids(tokenizer, row["prompt"] + row["completion"]))
        if n <= max_length:
            kept.append(row)
            longest = max(longest, n)
    return kept, longest


def build_trainer(
    config: RunConfig,
    formatted_dir: str | Path,
    output_dir: str | Path,
    progress: Progress = print,
    callbacks: list[Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The configured SFTTrainer and facts about its inputs, before training; split out so tests can inspect it.

    ``output_dir`` is where the trainer writes its checkpoints.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, EarlyStoppingCallback, PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from ftloop.components.prefix_cache import SharedPrefixCollator, shared_prefix_trainer, supports_prefix_cache
    from ftloop.components.preflight import describe, detect_device, meta_model, preflight

    formatted_dir, output_dir = Path(formatted_dir), Path(output_dir)
    labels = read_labels(formatted_dir)
    rows = read_split(formatted_dir, "train", labels)
    if not rows:
        raise FtloopError(f"{formatted_dir / 'train.jsonl'}: the train split is empty")
    dev_rows = read_split(formatted_dir, "dev", labels) if (formatted_dir / "dev.jsonl").exists() else []

    set_seed(config.seed)
    name, train = config.model.name_or_path, config.train
    tokenizer = load_tokenizer(name, config.model.revision)
    kept, longest = _fits(tokenizer, rows, train.max_length)
    if len(kept) < len(rows):
        progress(f"warning: dropped {len(rows) - len(kept)} train rows longer than train.max_length={train.max_length} tokens")
    if not kept:
        raise FtloopError(f"every train row is longer than train.max_length={train.max_length} tokens")
    rows = kept
    dev_rows, _ = _fits(tokenizer, dev_rows, train.max_length)
    if train.early_stopping_metric != "none" and not dev_rows:
        progress("warning: no dev rows, so no dev evaluation or early stopping")

    try:
        model_config = AutoConfig.from_pretrained(
            name, revision=None if _is_local(name) else config.model.revision, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001 - as in load_base_model
        raise FtloopError(f"cannot load the config of base model {name!r}: {type(exc).__name__}: {_first_line(exc)}") from None
    dtype = resolve_dtype(config.model.dtype)
    # Targets and memory are worked out on a weightless copy, before gigabytes of weights load.
    targets = resolve_target_modules(meta_model(model_config), config.lora.target_modules)
    sized = config.model_copy(update={"train": train.model_copy(update={"max_length": longest})})
    report = preflight(sized, model_config, targets, detect_device(), dtype)
    progress(describe(report))
    # Sharing the prompt prefix needs padded batches on SDPA; without it (switched off, or under
    # gradient checkpointing) FlashAttention-2's padding-free batches are the next best thing.
    try_sharing = train.share_prompt_prefix and not train.gradient_checkpointing
    model = load_base_model(
        name, config.model.revision, config.model.dtype, config.model.quantization, prefer_flash=not try_sharing
    )

    # With FlashAttention the batch is flattened without pad tokens (TRL's padding-free mode);
    # TRL then wants max_length=None, which the length filter above makes safe. Otherwise
    # rows of similar length are batched together so dynamic padding wastes little.
    padding_free = model.config._attn_implementation.startswith("flash_attention")
    use_cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=train.epochs,
        learning_rate=train.learning_rate,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=None if padding_free else train.max_length,
        padding_free=padding_free,
        train_sampling_strategy="random" if padding_free else "group_by_length",
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a ratio of total steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        lr_scheduler_type=train.lr_scheduler,
        **_checkpointing_args(SFTConfig, train.gradient_checkpointing),
        **_evaluation_args(config, bool(dev_rows)),
        logging_steps=train.logging_steps,
        logging_first_step=True,
        bf16=dtype == torch.bfloat16 and use_cuda,
        fp16=False,
        use_cpu=not use_cuda,
        seed=config.seed,
        data_seed=config.seed,
        completion_only_loss=True,
        packing=False,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )

    def as_dataset(items):
        return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in items])

    trainer_cls = SFTTrainer
    all_callbacks = [_progress_callback(progress), *(callbacks or [])]
    if args.eval_strategy != "no":
        all_callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
        if train.early_stopping_metric == "dev_macro_f1":
            trainer_cls = _dev_scoring_trainer(SFTTrainer, labels, dev_rows, config.eval.batch_size)
    # (gradient checkpointing's recomputed forwards would append to the cache twice)
    share_prefix = try_sharing and not padding_free and supports_prefix_cache(model, longest)
    if share_prefix:
        trainer_cls = shared_prefix_trainer(trainer_cls)
    with peft_deprecation_silenced():
        trainer = trainer_cls(
            model=model,
            args=args,
            train_dataset=as_dataset(rows),
            eval_dataset=as_dataset(dev_rows) if args.eval_strategy != "no" else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=all_callbacks,
        )
    trainer.remove_callback(PrinterCallback)  # it would print every raw log dict
    if share_prefix:
        trainer.data_collator = SharedPrefixCollator(trainer.data_collator)
    info = {
        "labels": labels,
        "n_train_rows": len(rows),
        "n_dev_rows": len(dev_rows),
        "target_modules": targets,
        "preflight": report,
        "padding_free": padding_free,
        "shared_prefix": share_prefix,
    }
    return trainer, info


def _peak_memory() -> dict[str, int]:
    import resource

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available():
        out["peak_gpu_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _shared_prefix_stats(trainer) -> dict[str, Any] | None:
    """How much of the prompt the batches shared (None: every row ran whole)."""
    collator = trainer.data_collator
    if not hasattr(collator, "shared_tokens"):
        return None
    return {
        "batches": collator.batches,
        "shared_batches": collator.shared_batches,
        "tokens_not_recomputed": collator.shared_tokens,
    }


def _dev_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("epoch", "step", "eval_loss", "eval_macro_f1", "eval_accuracy")
    return [{k: e[k] for k in keys if k in e} for e in log_history if "eval_loss" in e]


# A full, read-only or forbidden disk is for the user (or the cluster) to fix, not a bug in ftloop.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _disk_error_reason(exc: BaseException) -> str | None:
    """Why a write failed, when ``exc`` is a failed write rather than a bug; None otherwise.

    A full disk surfaces three ways: OSError (Python writes), safetensors' own error
    with the OS error inside its message (adapter weights), and torch.save's
    RuntimeError from its zip writer, which carries no errno at all (optimizer state).
    """
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return exc.strerror or os.strerror(exc.errno)
    text = str(exc)
    if type(exc).__name__ == "SafetensorError" and "os error" in text:
        return text.split("I/O error: ", 1)[-1]
    if isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
        return f"torch.save failed ({_first_line(exc)})"
    return None


@contextlib.contextmanager
def _writes_to(location: Path, what: str, hint: str = "") -> Iterator[None]:
    """Turn a failed write under ``location`` into one clear line naming it, how full its disk is, and what to do."""
    try:
        yield
    except Exception as exc:
        reason = _disk_error_reason(exc)
        if reason is None:
            raise
        try:
            free = f"; {shutil.disk_usage(location).free / 2**20:,.1f} MiB free there"
        except OSError:
            free = ""
        raise FtloopError(f"{location}: cannot write {what}: {reason}{free}{hint}") from None


@contextlib.contextmanager
def _removed_on_failure(directory: Path) -> Iterator[None]:
    """On any failure, remove what this block added to ``directory``, so a half-written artifact never looks finished."""
    before = set(directory.iterdir())
    try:
        yield
    except BaseException:
        for entry in set(directory.iterdir()) - before:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        raise


def finetune(
    config: RunConfig,
    formatted_dir: str | Path,
    output_dir: str | Path,
    progress: Progress = print,
) -> dict[str, Any]:
    """Train a LoRA adapter (resuming from a mirrored checkpoint if there is one); write the model artifact.

    The artifact holds the adapter and tokenizer, ftloop_model.json (metadata),
    README.md (the model card) and, when asked for, merged/ (adapter merged into the base).
    """
    start = time.perf_counter()
    formatted_dir, output_dir = Path(formatted_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _removed_on_failure(output_dir):
        return _train_and_write(config, formatted_dir, output_dir, progress, start)


def _train_and_write(
    config: RunConfig, formatted_dir: Path, output_dir: Path, progress: Progress, start: float
) -> dict[str, Any]:
    from ftloop.components.checkpoints import mirror_callback, open_store, restore_latest, training_fingerprint
    from ftloop.components.model_export import export_merged, write_model_card

    inputs = [formatted_dir / "labels.json", formatted_dir / "train.jsonl"]
    inputs += [formatted_dir / "dev.jsonl"] if (formatted_dir / "dev.jsonl").exists() else []
    data_sha256 = content_hash(inputs)
    fingerprint = training_fingerprint(config, data_sha256)
    store = open_store(config.train.checkpoint_uri, fingerprint) if config.train.checkpoint_uri else None
    staging = Path(tempfile.mkdtemp(prefix="ftloop-checkpoints-"))
    try:
        with quiet_progress_bars():
            callbacks = [mirror_callback(store, progress)] if store else []
            trainer, info = build_trainer(config, formatted_dir, staging, progress, callbacks)
            resume = restore_latest(store, staging, progress) if store else None
            trainable, total = trainer.model.get_nb_trainable_parameters()
            progress(
                f"train {info['n_train_rows']} rows on {device_description()}: LoRA r={config.lora.r} on "
                f"{', '.join(info['target_modules'])} ({trainable:,} of {total:,} params trainable)"
            )
            with cpu_threads_for(trainer.model), _writes_to(
                staging, "training checkpoints", " (checkpoints are staged in the temp dir: point TMPDIR at a larger disk)"
            ):
                result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            with _writes_to(output_dir, "the model artifact"):
                trainer.model.save_pretrained(str(output_dir))
                trainer.processing_class.save_pretrained(str(output_dir))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    state = trainer.state
    logged = [entry for entry in state.log_history if "loss" in entry]
    last = logged[-1] if logged else {}
    stopped_early = state.global_step < state.max_steps
    meta: dict[str, Any] = {
        "format": "ftloop-lora-adapter/1",
        "base_model": {
            "name_or_path": config.model.name_or_path,
            "revision": None if _is_local(config.model.name_or_path) else config.model.revision,
            "dtype": config.model.dtype,
            "quantization": config.model.quantization,
        },
        "labels": info["labels"],
        "target_modules": info["target_modules"],
        "lora": {"r": config.lora.r, "alpha": config.lora.alpha, "dropout": config.lora.dropout},
        "train": config.train.model_dump(),
        "seed": config.seed,
        "data_sha256": data_sha256,
        "training_fingerprint": fingerprint,
        "n_train_rows": info["n_train_rows"],
        "n_dev_rows": info["n_dev_rows"],
        "train_loss": float(result.training_loss),
        "final_loss": float(last["loss"]) if "loss" in last else None,
        "final_token_accuracy": float(last["mean_token_accuracy"]) if "mean_token_accuracy" in last else None,
        "tokens_seen": int(last["num_tokens"]) if "num_tokens" in last else None,
        "steps": int(state.global_step),
        "max_steps": int(state.max_steps),
        "epochs_completed": round(float(state.epoch or 0.0), 3),
        "stopped_early": stopped_early,
        "resumed_from": resume.name if resume else None,
        "dev": {
            "metric": config.train.early_stopping_metric,
            "best_metric": state.best_metric,
            "best_step": getattr(state, "best_global_step", None),
            "history": _dev_history(state.log_history),
        },
        "checkpoints": store.uri if store else None,
        "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 3),
        "wall_time_s": None,
        "device": device_description(),
        "preflight": info["preflight"],
        "padding_free": info["padding_free"],
        "shared_prefix": _shared_prefix_stats(trainer),
        "bf16": bool(trainer.args.bf16),
        "attn_implementation": trainer.model.get_base_model().config._attn_implementation,
        "trainable_params": int(trainable),
        "total_params": int(total),
        **_peak_memory(),
        "versions": library_versions(),
    }
    if stopped_early:
        progress(f"stopped early at step {state.global_step}/{state.max_steps}: no dev improvement in "
                 f"{config.train.early_stopping_patience} evaluations")
    if state.best_metric is not None:
        progress(f"kept the best checkpoint: step {meta['dev']['best_step']}, {config.train.early_stopping_metric} {state.best_metric:.4f}")
    with _writes_to(output_dir, "the model artifact"):
        if config.train.export_merged:
            meta["merged"] = export_merged(output_dir, meta, progress)
        meta["wall_time_s"] = round(time.perf_counter() - start, 3)
        write_model_card(output_dir, meta)
        write_json(output_dir / MODEL_META, meta)
    progress(f"train done: mean loss {meta['train_loss']:.3f}, {meta['steps']} steps in {meta['wall_time_s']:.1f}s")
    return meta
