"""Aten ops per optimizer step: a measure of kernel launches that needs no GPU.

On a GPU, a LoRA fine-tune of a small model is launch-bound: every aten op the CPU dispatches is at
least one kernel launch, and a Phi-3 layer's RMSNorms, rotary embeddings, SiLU, residual adds and
LoRA scale-and-add are dozens of tiny elementwise ops around each matmul. This counts them on the
CPU with torch.profiler, through ftloop's own trainer (``build_trainer``: TRL SFTTrainer, all-linear
LoRA, completion-only loss, fused AdamW, grad clipping), for a 32-layer Phi-3-shaped stack with
small dimensions, so the count is the real training step's and the matmuls are cheap.

One optimizer step = forward + backward + clip + optimizer step + zero_grad, bracketed by the
trainer's on_step_begin / on_step_end callbacks; ``--warmup`` steps first (compilation, recompiles
for the second sequence length), then ``--steps`` profiled steps, averaged. Reported per step:
``aten``: every aten:: event (nested ones too, e.g. aten::linear -> aten::t + aten::addmm);
``top_level``: aten:: events with no aten:: parent, each one dispatch from Python or autograd,
the closest CPU count of kernel launches; ``fused``: inductor's generated kernels (with
train.compile; each one launch); ``launches`` = top_level + fused.

Configurations, in one run: ``eager_shared`` (ftloop's default: eager, shared prompt prefix),
``eager`` (eager, every row whole), ``compiled`` (train.compile: true, which runs every row whole).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ops_per_step.py --json /tmp/ops_per_step.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.fixtures.ml holds the synthetic data

# Phi-3's structure (fused qkv and gate_up, SwiGLU, RMSNorm, RoPE) and depth (32 layers), small widths.
STACK = {"num_hidden_layers": 32, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512}
CONFIGS = {
    "eager_shared": {"compile": False, "share_prompt_prefix": True},
    "eager": {"compile": False, "share_prompt_prefix": False},
    "compiled": {"compile": True, "share_prompt_prefix": True},  # compile switches sharing off
}
REDUCTION_TARGET = 3.0


def build_stack(workdir: Path, rows_per_label: int, seed: int = 0, **size: int) -> tuple[Path, Path]:
    """Synthetic formatted data and a random-init Phi-3 stack (components/modeling/tiny.py) trained on its texts."""
    from tests.fixtures.ml import build_tiny, write_formatted

    formatted = write_formatted(workdir / "formatted", n_train=rows_per_label, n_dev=1, n_test=1, seed=seed)
    model_dir = build_tiny(workdir / "model", formatted, seed=seed, **{**STACK, **size})
    return model_dir, formatted


def is_top_level(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def is_fused_kernel(name: str) -> bool:
    """Kernels inductor generated, e.g. graph_3_cpp_fused_add_mul_0 (recorded with
    torch._inductor.config.cpp.enable_kernel_profile; on a GPU, triton_* kernels)."""
    return "cpp_fused" in name or name.startswith("triton_")


def summarize(events, steps: int) -> dict[str, Any]:
    aten = [e for e in events if e.name.startswith("aten::")]
    top = [e for e in aten if is_top_level(e)]
    fused = [e for e in events if is_fused_kernel(e.name)]
    return {
        "aten": len(aten) / steps,
        "top_level": len(top) / steps,
        "fused": len(fused) / steps,
        "launches": (len(top) + len(fused)) / steps,
        "most_common_top_level": collections.Counter(e.name for e in top).most_common(8),
    }


def count_ops_per_step(trainer, warmup: int, steps: int) -> dict[str, Any]:
    """Train ``warmup + steps`` optimizer steps and profile the last ``steps`` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    state: dict[str, Any] = {"seconds": []}

    class ProfileSteps(TrainerCallback):
        def on_step_begin(self, args, st, control, **kwargs):
            if st.global_step == warmup:
                state["profiler"] = profile(activities=[ProfilerActivity.CPU])
                state["profiler"].__enter__()
            state["start"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kwargs):
            if st.global_step > warmup:
                state["seconds"].append(time.perf_counter() - state["start"])
            if st.global_step == warmup + steps:
                state["profiler"].__exit__(None, None, None)

    trainer.args.max_steps = warmup + steps
    trainer.args.save_strategy = "no"
    trainer.add_callback(ProfileSteps())
    start = time.perf_counter()
    result = trainer.train()
    out = summarize(state["profiler"].events(), steps)
    out.update(
        steps=steps,
        warmup=warmup,
        train_seconds=time.perf_counter() - start,
        seconds_per_profiled_step=sorted(state["seconds"])[len(state["seconds"]) // 2],
        train_loss=float(result.training_loss),
    )
    return out


def measure(model_dir: Path, formatted: Path, out: Path, warmup: int, steps: int, batch_size: int, **train: Any) -> dict[str, Any]:
    """Ops per step of ftloop's trainer (demo settings, dev evaluation off) with these ``train`` settings."""
    from ftloop.components.modeling.loading import cpu_threads_for, peft_deprecation_silenced, quiet_progress_bars
    from ftloop.components.modeling.trainer import build_trainer
    from tests.fixtures.ml import demo_config

    config = demo_config(model_dir, epochs=100, batch_size=batch_size, early_stopping_metric="none", **train)
    with quiet_progress_bars(), peft_deprecation_silenced():
        trainer, info = build_trainer(config, formatted, out, progress=lambda line: None)
        with cpu_threads_for(trainer.model):
            result = count_ops_per_step(trainer, warmup, steps)
    return {
        **result,
        "shared_prefix": info["shared_prefix"],
        "compiled_layers": info["compiled_layers"],
        "target_modules": info["target_modules"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=STACK["num_hidden_layers"])
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps before profiling (compilation happens here)")
    p.add_argument("--steps", type=int, default=4, help="profiled optimizer steps, averaged")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    args = p.parse_args(argv)

    import torch
    import torch._inductor.config as inductor_config
    import transformers

    inductor_config.cpp.enable_kernel_profile = True  # inductor's CPU kernels appear in the profile
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    rows = -(-(args.warmup + args.steps) * args.batch_size // 8) + 1  # 8 labels; enough rows for every step
    results: dict[str, Any] = {
        "args": vars(args),
        "stack": {**STACK, "num_hidden_layers": args.layers},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="ftloop-ops-per-step-") as tmp:
        model_dir, formatted = build_stack(Path(tmp), rows, num_hidden_layers=args.layers)
        for name in names:
            run = measure(model_dir, formatted, Path(tmp) / f"out-{name}", args.warmup, args.steps, args.batch_size, **CONFIGS[name])
            results["runs"][name] = run
            print(
                f"{name:<13} aten/step {run['aten']:>9,.0f}  top-level {run['top_level']:>8,.0f}  fused {run['fused']:>6,.0f}"
                f"  launches {run['launches']:>8,.0f}  s/step {run['seconds_per_profiled_step']:.2f}"
                f"  (train {run['train_seconds']:.0f} s, shared prefix {run['shared_prefix']},"
                f" compiled layers {run['compiled_layers']})",
                flush=True,
            )
    runs = results["runs"]
    if "compiled" in runs:
        for before in ("eager_shared", "eager"):
            if before in runs:
                ratio = {k: runs[before][k] / runs["compiled"][k] for k in ("aten", "top_level", "launches")}
                results[f"reduction_vs_{before}"] = ratio
                print(
                    f"{before} / compiled: aten {ratio['aten']:.1f}x, top-level {ratio['top_level']:.1f}x, "
                    f"launches {ratio['launches']:.1f}x  ({'PASS' if ratio['launches'] >= REDUCTION_TARGET else 'FAIL'}"
                    f" >= {REDUCTION_TARGET:g}x fewer launches)"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
