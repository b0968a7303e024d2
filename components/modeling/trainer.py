"""The configured TRL SFTTrainer: data checks, preflight, LoRA, early stopping on dev, shared prompt prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ftloop.components.artifacts import read_labels, read_split, split_path
from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError
from ftloop.components.modeling.loading import (
    _first_line,
    _is_local,
    chat_token_ids,
    load_base_model,
    load_tokenizer,
    peft_deprecation_silenced,
    resolve_dtype,
)
from ftloop.components.modeling.lora import resolve_target_modules
from ftloop.components.progress import Progress


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


def _stop_on_request_callback(stop: Any):
    """Once ``stop.requested`` is set (the fine-tune stage sets it on SIGTERM): checkpoint at this step's end, then stop.

    ``stop`` carries ``requested``, ``training``, ``checkpoint`` (save before stopping: only
    worth it when checkpoints are mirrored), ``at_step``, and ``finish(step)``, which raises.
    Place it after the mirror callback: its ``on_save`` raises once the stop checkpoint is mirrored.
    """
    from transformers import TrainerCallback

    class StopOnRequest(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stop.training = True

        def on_step_end(self, args, state, control, **kwargs):
            if stop.requested and stop.at_step is None:
                stop.at_step = state.global_step
                if not stop.checkpoint:
                    stop.finish(state.global_step)
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            if stop.at_step is not None and stop.at_step == state.global_step:
                stop.finish(state.global_step)  # saved, and mirrored by the callback before this one
            return control

        def on_train_end(self, args, state, control, **kwargs):
            stop.training = False

    return StopOnRequest()


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


def _dev_scoring_trainer(
    base: type, labels: list[str], dev_rows: list[dict[str, Any]], batch_size: int, batch_tokens: int | None = None
) -> type:
    """SFTTrainer whose evaluation also label-scores the dev split, so early stopping can watch macro-F1.

    Dev loss covers only the label tokens and can keep falling while the argmax
    label stops changing; macro-F1 is the number the run is judged on.
    """
    from sklearn.metrics import f1_score

    from ftloop.components.modeling.scoring import score_labels

    prompts = [r["prompt"] for r in dev_rows]
    gold = [r["label"] for r in dev_rows]

    class DevScoringSFTTrainer(base):
        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            was_training = self.model.training
            self.model.eval()
            try:
                with _eager():  # compiled layers would recompile for every layer's slot in the prefix cache
                    probabilities = score_labels(self.model, self.processing_class, prompts, labels, batch_size, batch_tokens=batch_tokens)
            finally:
                self.model.train(was_training)
            predicted = [max(p, key=p.get) for p in probabilities]
            output.metrics[f"{metric_key_prefix}_macro_f1"] = float(
                f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)
            )
            output.metrics[f"{metric_key_prefix}_accuracy"] = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
            return output

    return DevScoringSFTTrainer


def _eager():
    """Run compiled modules eagerly inside the block (torch >= 2.6; a no-op before)."""
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def resolve_compile(setting: str | bool, cuda: bool, shares_prefix: bool, gradient_checkpointing: bool, quantized: bool) -> bool:
    """Whether ``train.compile`` compiles the decoder layers (see TrainConfig.compile).

    auto stays off on CPU: compiling the tiny demo model's layers (tens of seconds) costs more than
    its whole training. On a GPU it stays off where it would give up the shared prompt prefix, which
    halves the tokens, until a GPU measurement says compiling wins over sharing.
    """
    if isinstance(setting, bool):
        return setting
    return cuda and not shares_prefix and not gradient_checkpointing and not quantized


def compile_decoder_layers(model) -> int:
    """torch.compile each decoder layer in place, LoRA adapters included; returns how many.

    Regional compilation: the layers share one compiled graph (parameters are graph inputs), so
    compile time is one layer's, not the whole stack's. In place (``Module.compile``), so state-dict
    keys, the saved adapter and PEFT's module tree are unchanged.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


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

    from ftloop.components.modeling.prefix_cache import SharedPrefixCollator, shared_prefix_trainer, supports_prefix_cache
    from ftloop.components.modeling.preflight import describe, detect_device, meta_model, preflight

    formatted_dir, output_dir = Path(formatted_dir), Path(output_dir)
    labels = read_labels(formatted_dir)
    rows = read_split(formatted_dir, "train", labels)
    if not rows:
        raise FtloopError(f"{split_path(formatted_dir, 'train')}: the train split is empty")
    dev_rows = read_split(formatted_dir, "dev", labels) if split_path(formatted_dir, "dev").exists() else []

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
    # Compiled layers cannot share it: each layer's cache slot would be a separate compiled graph.
    try_sharing = train.share_prompt_prefix and not train.gradient_checkpointing and train.compile is not True
    compile_layers = resolve_compile(
        train.compile, torch.cuda.is_available(), try_sharing, train.gradient_checkpointing, config.model.quantization != "none"
    )
    model = load_base_model(name, config.model.revision, config.model.dtype, config.model.quantization, prefer_flash=not try_sharing)

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
            trainer_cls = _dev_scoring_trainer(SFTTrainer, labels, dev_rows, config.eval.batch_size, config.eval.batch_tokens)
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
    compiled = compile_decoder_layers(trainer.model) if compile_layers else 0
    info = {
        "labels": labels,
        "n_train_rows": len(rows),
        "n_dev_rows": len(dev_rows),
        "target_modules": targets,
        "preflight": report,
        "padding_free": padding_free,
        "shared_prefix": share_prefix,
        "compiled_layers": compiled,
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
