"""LoRA target-module resolution, per architecture."""

from __future__ import annotations

from torch import nn

from ftloop.components.errors import FtloopError


def _linear_classes() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def resolve_target_modules(model: nn.Module, spec: str | list[str]) -> list[str]:
    """Concrete LoRA target names, so the adapter config says what was trained.

    'all-linear' becomes the leaf names of every linear layer except the output
    head, whatever the architecture (Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj;
    Llama/SmolLM2: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). An explicit
    list is checked against the model, because names copied from other architectures
    (q_proj/v_proj on Phi-3's fused layers, qkv_proj on Llama) would otherwise fail late or
    match nothing. tests/unit/test_architectures.py checks both families.
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
            f"lora.target_modules: {missing or names} not found among the model's linear layers; available: {sorted(available)}"
        )
    return names
