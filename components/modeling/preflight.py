"""Pre-flight check for a fine-tune: what the device offers, what the config needs, refuse early if it cannot fit.

Failing after the 7.6 GB base model has been pulled and loaded (or an hour into
a run) is the expensive way to learn that a batch does not fit on an L4. The
estimate needs only the model's config: parameters are counted on the meta
device, without weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ftloop.components.config import RunConfig
from ftloop.components.errors import FtloopError

GIB = 1024**3
# Leave room for the CUDA context, allocator fragmentation and the odd temporary.
USABLE_FRACTION = 0.9
CUDA_CONTEXT_BYTES = 0.6 * GIB


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str
    memory_bytes: int
    bf16: bool
    flash_attn: bool
    bitsandbytes: bool


def detect_device() -> DeviceInfo:
    flash = importlib.util.find_spec("flash_attn") is not None
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo("cuda", props.name, int(props.total_memory), torch.cuda.is_bf16_supported(), flash, bnb)
    return DeviceInfo("cpu", "cpu", _available_ram(), True, flash, bnb)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class MemoryEstimate:
    total_params: int
    lora_params: int
    weights_bytes: int
    trainable_state_bytes: int
    activation_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.trainable_state_bytes + self.activation_bytes + self.overhead_bytes


def meta_model(model_config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def count_params(model_config, target_modules: list[str], lora_r: int) -> tuple[int, int]:
    """(base parameters, LoRA parameters) for this architecture, counted without allocating weights."""
    from torch import nn

    model = meta_model(model_config)
    total = sum(p.numel() for p in model.parameters())
    lora = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            lora += lora_r * (module.in_features + module.out_features)
    return total, lora


def estimate_training_memory(
    model_config, config: RunConfig, target_modules: list[str], device_kind: str, weight_dtype: torch.dtype
) -> MemoryEstimate:
    """Peak-memory estimate for LoRA training of a batch of `batch_size` rows of `max_length` tokens (worst case).

    Weights at their storage width (NF4 ~0.5 byte/param plus scales); LoRA params,
    grads and AdamW moments in fp32 (16 bytes/param); activations ~34*hidden bytes
    per token per layer in 16-bit without checkpointing (x2 in fp32), about a
    tenth of that with checkpointing plus one layer recomputed (back-of-envelope figures, not measured).
    """
    total, lora = count_params(model_config, target_modules, config.lora.r)
    if config.model.quantization == "nf4":
        weights = int(total * 0.55)
    else:
        weights = total * torch.finfo(weight_dtype).bits // 8
    width = 2 if weight_dtype in (torch.bfloat16, torch.float16) or config.model.quantization == "nf4" else 4
    hidden = int(getattr(model_config, "hidden_size", 0) or 0)
    layers = int(getattr(model_config, "num_hidden_layers", 0) or 0)
    tokens = config.train.batch_size * config.train.max_length
    per_token_layer = 17 * hidden * width  # 34*d bytes at 2 bytes/element
    if config.train.gradient_checkpointing:
        activations = tokens * hidden * width * layers + tokens * per_token_layer
    else:
        activations = tokens * per_token_layer * layers
    vocab = int(getattr(model_config, "vocab_size", 0) or 0)
    activations += tokens * vocab * 4 // 8  # logits for the completion tokens only (TRL), generous
    overhead = int(CUDA_CONTEXT_BYTES) if device_kind == "cuda" else 0
    return MemoryEstimate(total, lora, weights, lora * 16, int(activations), overhead)


def preflight(config: RunConfig, model_config, target_modules: list[str], device: DeviceInfo, weight_dtype: torch.dtype) -> dict[str, Any]:
    """Refuse a config the device cannot run; otherwise return the report that goes into the model metadata."""
    if config.model.quantization == "nf4":
        if device.kind != "cuda":
            raise FtloopError(
                "model.quantization: nf4 (QLoRA) needs a CUDA GPU; this machine has none. Use model.quantization: none (bf16/fp32 LoRA)"
            )
        if not device.bitsandbytes:
            raise FtloopError(
                "model.quantization: nf4 (QLoRA) needs the bitsandbytes package, which is not installed "
                "(it is in the GPU image: pip install 'ftloop[gpu]')"
            )
    if weight_dtype == torch.bfloat16 and device.kind == "cuda" and not device.bf16:
        raise FtloopError(f"model.dtype: bfloat16 is not supported on {device.name}; use float32")
    estimate = estimate_training_memory(model_config, config, target_modules, device.kind, weight_dtype)
    usable = int(device.memory_bytes * USABLE_FRACTION)
    report = {
        "device": asdict(device),
        "estimate_gib": round(estimate.total_bytes / GIB, 3),
        "usable_gib": round(usable / GIB, 3),
        "estimate": asdict(estimate),
    }
    if estimate.total_bytes > usable:
        raise FtloopError(
            f"preflight: this config needs about {estimate.total_bytes / GIB:.1f} GiB "
            f"(weights {estimate.weights_bytes / GIB:.1f}, activations {estimate.activation_bytes / GIB:.1f}, "
            f"LoRA state {estimate.trainable_state_bytes / GIB:.1f}) but {device.name} has "
            f"{device.memory_bytes / GIB:.1f} GiB ({usable / GIB:.1f} usable). Lower train.batch_size or "
            "train.max_length, set train.gradient_checkpointing: true, or use model.quantization: nf4"
        )
    return report


def describe(report: dict[str, Any]) -> str:
    device = report["device"]
    extras = [f"bf16 {'yes' if device['bf16'] else 'no'}", f"flash-attn {'yes' if device['flash_attn'] else 'no'}"]
    return (
        f"preflight: {device['name']} ({device['memory_bytes'] / GIB:.1f} GiB, {', '.join(extras)}); "
        f"estimated peak {report['estimate_gib']:.2f} GiB of {report['usable_gib']:.1f} usable"
    )
