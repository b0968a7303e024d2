"""A real pretrained base for the speed benchmarks (``--model``), next to the random-init tiny one.

The tiny model's decode steps and matmuls cost almost nothing, so its speed ratios say little
about a model whose steps cost what they cost. ``--model builtin:smollm2-135m-instruct`` (or a
model directory) runs the same comparison on a real model with the local demo's recipe
(configs/demo-smollm2.yaml: LoRA rank, learning rate, batch size, max_length, dtype).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REAL_RECIPE = REPO / "configs" / "demo-smollm2.yaml"


def resolve_model(ref: str) -> Path:
    """A ``builtin:`` reference becomes its cached directory (fetched once); anything else must be a directory."""
    from ftloop.components.modeling.builtin import ensure_builtin_model, is_builtin_ref

    if is_builtin_ref(ref):
        return Path(ensure_builtin_model(ref, progress=lambda line: print(line, flush=True)))
    path = Path(ref)
    if not path.is_dir():
        raise SystemExit(f"--model {ref}: not a directory and not a builtin: reference")
    return path


def recipe_config(model_dir: Path, recipe: Path = REAL_RECIPE, **train: Any):
    """The recipe's run config pointed at ``model_dir``, with ``train`` overrides (e.g. epochs)."""
    from ftloop.components.config import load_config

    config = load_config(recipe)
    model = config.model.model_copy(update={"name_or_path": str(model_dir), "revision": None})
    return config.model_copy(update={"model": model, "train": config.train.model_copy(update=train)})
