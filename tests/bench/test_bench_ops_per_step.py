"""bench/ops_per_step.py's op counting, and train.compile: fewer ops, the same training.

Compiling runs inductor's C++ code generation on the CPU; it is cached under /tmp between runs, so
a second run of this module is several times faster than the first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import ops_per_step  # noqa: E402


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A 2-layer stack of the benchmark's shape and enough rows for 6 steps of 4."""
    return ops_per_step.build_stack(tmp_path_factory.mktemp("stack"), rows_per_label=4, num_hidden_layers=2)


def test_resolve_compile():
    from ftloop.components.modeling.trainer import resolve_compile

    assert resolve_compile(True, cuda=False, shares_prefix=True, gradient_checkpointing=True, quantized=True)
    assert not resolve_compile(False, cuda=True, shares_prefix=False, gradient_checkpointing=False, quantized=False)
    assert not resolve_compile("auto", cuda=False, shares_prefix=False, gradient_checkpointing=False, quantized=False)
    assert not resolve_compile("auto", cuda=True, shares_prefix=True, gradient_checkpointing=False, quantized=False)
    assert resolve_compile("auto", cuda=True, shares_prefix=False, gradient_checkpointing=False, quantized=False)


def test_summarize_counts_top_level_aten_ops_and_fused_kernels():
    class Event:
        def __init__(self, name, parent=None):
            self.name, self.cpu_parent = name, parent

    linear = Event("aten::linear", Event("Phi3MLP"))
    events = [
        linear,
        Event("aten::t", linear),
        Event("aten::addmm", linear),
        Event("aten::mul"),
        Event("graph_0_cpp_fused_mul_silu_0", Event("CompiledFunction")),
        Event("Optimizer.step"),
    ]
    got = ops_per_step.summarize(events, steps=2)
    assert (got["aten"], got["top_level"], got["fused"], got["launches"]) == (2.0, 1.0, 0.5, 1.5)


@pytest.mark.slow  # inductor compiles C++: 1-2 min with a cold cache (14-30 s warm)
def test_compiled_layers_dispatch_fewer_ops_per_step(stack, tmp_path):
    """The counting works end to end, and train.compile cuts the ops of a 2-layer stack (32 layers: bench/README.md)."""
    model_dir, formatted = stack
    eager = ops_per_step.measure(
        model_dir, formatted, tmp_path / "eager", warmup=2, steps=2, batch_size=4, compile=False, share_prompt_prefix=False
    )
    compiled = ops_per_step.measure(model_dir, formatted, tmp_path / "compiled", warmup=2, steps=2, batch_size=4, compile=True)
    assert eager["compiled_layers"] == 0 and compiled["compiled_layers"] == 2
    assert not compiled["shared_prefix"]  # compile switches sharing off
    assert eager["top_level"] > 500 and eager["fused"] == 0
    assert compiled["top_level"] * 2 < eager["top_level"]
    assert compiled["aten"] < eager["aten"]


def _train(model_dir, formatted, out, steps, **train):
    from ftloop.components.modeling.loading import peft_deprecation_silenced, quiet_progress_bars
    from ftloop.components.modeling.trainer import build_trainer
    from tests.fixtures.ml import demo_config

    config = demo_config(model_dir, epochs=100, batch_size=4, early_stopping_metric="none", **train)
    with quiet_progress_bars(), peft_deprecation_silenced():
        trainer, info = build_trainer(config, formatted, out, progress=lambda line: None)
        trainer.args.max_steps = steps
        trainer.args.save_strategy = "no"
        losses = []
        trainer.add_callback(_LossLog(losses))
        trainer.args.logging_steps = 1
        trainer.train()
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return losses, lora, info


def _LossLog(losses):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    return LossLog()


@pytest.mark.slow  # inductor compiles C++: 1-2 min with a cold cache (14-30 s warm)
def test_compiled_training_matches_eager(stack, tmp_path):
    """Same LoRA adapters and completion-only loss: 6 steps compiled give eager's losses and adapter weights."""
    model_dir, formatted = stack
    torch.manual_seed(0)
    eager, eager_lora, _ = _train(model_dir, formatted, tmp_path / "eager", 6, compile=False, share_prompt_prefix=False)
    shared, _, shared_info = _train(model_dir, formatted, tmp_path / "shared", 6, compile=False)
    compiled, compiled_lora, info = _train(model_dir, formatted, tmp_path / "compiled", 6, compile=True)
    assert info["compiled_layers"] == 2 and shared_info["shared_prefix"]
    assert len(eager) == len(compiled) == len(shared) == 6
    assert eager[-1] < eager[0]  # it learns
    assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-3)
    assert compiled == pytest.approx(shared, rel=1e-3, abs=1e-3)  # ftloop's default path
    assert eager_lora.keys() == compiled_lora.keys() and len(eager_lora) == 2 * 4 * 2  # 2 layers x 4 targets x A, B
    for name, weight in eager_lora.items():
        torch.testing.assert_close(compiled_lora[name], weight, rtol=1e-3, atol=1e-4)
